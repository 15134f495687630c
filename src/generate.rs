//! Generation with a KV cache: prompts right-padded into one block, prefill, then one token per
//! step until `<end_of_turn>`/`<eos>` or the token budget. Greedy at temperature 0 (chosen on the
//! device), otherwise temperature / top-k / top-p sampling from a seeded generator: the draws on
//! the host, the choice on the GPU (model/device_sampling.rs) or the host (sampling.rs).

use crate::model::decode::first_max;
use crate::model::vlm::Vlm;
use crate::rng::SplitMix64;
use crate::sampling::{sample, Sampling};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// 0 = no limit.
    pub top_k: usize,
    pub seed: u64,
    pub stop_ids: Vec<u32>,
    /// New-token columns the KV cache starts with (`CACHE_ROOM`); a generation that runs past
    /// them doubles them, so a large `max_new_tokens` costs memory only as the tokens come.
    pub cache_room: usize,
}

/// The KV cache's first room for new tokens: more than a ScienceQA answer takes, so the usual
/// generation allocates once and replays one CUDA graph throughout.
pub const CACHE_ROOM: usize = 512;

impl GenerateOptions {
    /// Greedy decoding of at most `max_new_tokens`, stopping at `stop_ids`.
    pub fn greedy(max_new_tokens: usize, stop_ids: Vec<u32>) -> Self {
        Self { max_new_tokens, temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0, stop_ids, cache_room: CACHE_ROOM }
    }
}

/// KV cache columns for a prompt block of `prompt` columns: the first allocation (`room` new
/// tokens at most) and each growth after `capacity` filled up (twice the room), never past what
/// the whole generation needs (the last new token is never fed back) nor `max_pos`.
pub fn cache_columns(prompt: usize, max_new: usize, room: usize, capacity: Option<usize>, max_pos: usize) -> usize {
    let need = prompt.saturating_add(max_new.saturating_sub(1));
    let room = match capacity {
        None => room.max(1),
        Some(c) => c.saturating_sub(prompt).max(1).saturating_mul(2),
    };
    need.min(prompt.saturating_add(room)).min(max_pos)
}

#[derive(Debug, Clone, Default)]
pub struct Generated {
    /// New tokens, the stop token excluded.
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// Stopped on a stop token (rather than the budget).
    pub stopped: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Prompt in -> first new token out (vision tower, projector and prefill included).
    pub time_to_first_token_s: f64,
    /// The remaining tokens.
    pub decode_s: f64,
    pub decode_steps: usize,
}

/// Next-token logits [B, V] (f32, on the CPU) from the last position of `hidden` [B, L, H].
fn last_logits(vlm: &Vlm, hidden: &Tensor) -> Result<Vec<Vec<f32>>> {
    let l = hidden.dim(1)?;
    let last = hidden.narrow(1, l - 1, 1)?.squeeze(1)?;
    Ok(vlm.llm.logits(&last)?.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// Whether the greedy decode step may be captured and replayed as a CUDA graph.
fn graph_allowed(vlm: &Vlm, o: &GenerateOptions) -> bool {
    vlm.llm.device().is_cuda()
        && cfg!(feature = "cuda")
        && o.temperature <= 0.0
        && o.max_new_tokens >= 3
        && crate::fused_ops::allowed(crate::fused_ops::FusedOp::DecodeGraph)
}

/// Generates for a batch of prompts (token ids with their image-token blocks; `pixels` holds the
/// batch's images in order). `on_token(row, token)` sees each new token as it comes. Prompts are
/// right-padded into one block; the KV cache is allocated for the block and up to `cache_room` new
/// tokens, and moved into a wider one when a generation runs past them.
/// Greedy decoding chooses on the device and, on a GPU, replays its step as a CUDA graph; sampling
/// chooses on the GPU too (model/device_sampling.rs), on the CPU in sampling.rs.
pub fn generate(
    vlm: &Vlm,
    prompts: &[Vec<u32>],
    pixels: Option<&Tensor>,
    o: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<(Vec<Generated>, Timings)> {
    let b = prompts.len();
    if b == 0 {
        return Ok((vec![], Timings::default()));
    }
    if let Some(r) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {r} of the batch has no tokens");
    }
    let l = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_pos = vlm.cfg.text.max_position_embeddings;
    let too_long = |n: usize| anyhow::anyhow!("{n} positions exceed the model's max_position_embeddings ({max_pos})");
    if l > max_pos {
        return Err(too_long(l));
    }
    let pad = vlm.cfg.text.pad_token_id;
    let mut ids = vec![];
    let mut valid = vec![];
    for p in prompts {
        let n = l - p.len();
        ids.push(p.iter().copied().chain(std::iter::repeat_n(pad, n)).collect::<Vec<_>>());
        valid.push((0..l).map(|t| t < p.len()).collect::<Vec<_>>());
    }
    let start = Instant::now();
    let greedy = o.temperature <= 0.0;
    let columns = |capacity| cache_columns(l, o.max_new_tokens, o.cache_room, capacity, max_pos);
    let mut cache = vlm.llm.new_cache(b, columns(None))?;
    // rows the NF4 GEMV does not take: dequantize the base once, not at every step (2 GiB kept free
    // for the step's activations, and room for the cache to grow: at its last move the old and
    // the whole one meet)
    let whole = cache_columns(l, o.max_new_tokens, usize::MAX, None, max_pos);
    let per_column = (cache.bytes() / cache.capacity.max(1)) as u64;
    let growth = if whole > cache.capacity { per_column * (2 * whole - cache.capacity) as u64 } else { 0 };
    let _dense = if b > crate::peft::nf4::GEMV_MAX_ROWS { vlm.llm.keep_dequantized((2 << 30) + growth)? } else { None };
    // answering builds no graph: the projector's Vars stop here
    let embeds = vlm.input_embeds(&ids, pixels)?.detach();
    let last = vlm.llm.prefill(&embeds, &valid, &mut cache)?;
    let logits = vlm.llm.logits(&last)?;
    let mut out: Vec<Generated> =
        prompts.iter().map(|p| Generated { prompt_tokens: p.len(), ..Default::default() }).collect();
    let mut rng = SplitMix64::new(o.seed);
    let finished = |g: &Generated| g.stopped || g.tokens.len() >= o.max_new_tokens;
    // the next token of every row (a finished row's is fed on, unread: rows never mix)
    let mut choose =
        |logits: &Tensor, out: &[Generated], cache: &crate::model::kv_cache::KvCache| -> Result<Vec<u32>> {
            if greedy {
                let next = first_max(logits, &cache.vocab_index)?;
                cache.ids.slice_set(&next.reshape((b, 1))?, 0, 0)?;
                return Ok(next.to_vec1::<u32>()?);
            }
            // the draws in row order (the seed gives the same tokens at any thread count), then
            // the rows side by side
            let draws: Vec<Option<f64>> = out.iter().map(|g| (!finished(g)).then(|| rng.next_f64())).collect();
            let s = Sampling { temperature: o.temperature, top_k: o.top_k, top_p: o.top_p };
            #[cfg(feature = "cuda")]
            if logits.device().is_cuda() {
                let next = crate::model::device_sampling::sample_rows(logits, &draws, s, pad)?;
                cache.ids.slice_set(&next.reshape((b, 1))?, 0, 0)?;
                return Ok(next.to_vec1::<u32>()?);
            }
            let rows = logits.to_vec2::<f32>()?;
            let next: Vec<u32> =
                rows.par_iter().zip(&draws).map(|(row, u)| u.map_or(pad, |u| sample(row, s, u))).collect();
            cache.ids.slice_set(&Tensor::from_vec(next.clone(), (b, 1), logits.device())?, 0, 0)?;
            Ok(next)
        };
    let mut next = choose(&logits, &out, &cache)?;
    drop((logits, last, embeds));
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut, unused_variables))]
    let mut use_graph = graph_allowed(vlm, o);
    #[cfg(feature = "cuda")]
    let mut graph: Option<crate::model::cuda_graph::DecodeGraph> = None;
    let mut timings = Timings::default();
    let mut decode_start = None;
    for step in 0..o.max_new_tokens {
        for (r, g) in out.iter_mut().enumerate() {
            if finished(g) {
                continue;
            }
            let t = next[r];
            if o.stop_ids.contains(&t) {
                g.stopped = true;
            } else {
                g.tokens.push(t);
                on_token(r, t);
            }
        }
        if step == 0 {
            timings.time_to_first_token_s = start.elapsed().as_secs_f64();
            decode_start = Some(Instant::now());
        }
        if out.iter().all(finished) || step + 1 == o.max_new_tokens {
            break;
        }
        if l + step >= cache.capacity {
            let wider = columns(Some(cache.capacity));
            if wider <= cache.capacity {
                return Err(too_long(l + step + 1));
            }
            cache = vlm.llm.grow_cache(cache, wider)?;
            // the captured step reads and writes the old cache's buffers: capture again
            #[cfg(feature = "cuda")]
            {
                graph = None;
            }
        }
        cache.set_step(step + 1)?;
        if greedy {
            #[cfg(feature = "cuda")]
            if use_graph {
                match &graph {
                    Some(g) => g.launch()?,
                    // step 1 runs eagerly inside, then the step is captured for the rest
                    None => {
                        graph = crate::model::cuda_graph::DecodeGraph::warm_up_and_capture(&vlm.llm, &cache)?;
                        use_graph = graph.is_some();
                    }
                }
            } else {
                vlm.llm.greedy_step(&cache)?;
            }
            #[cfg(not(feature = "cuda"))]
            vlm.llm.greedy_step(&cache)?;
            next = cache.ids.flatten_all()?.to_vec1::<u32>()?;
        } else {
            let logits = vlm.llm.decode_logits(&cache)?;
            next = choose(&logits, &out, &cache)?;
        }
        timings.decode_steps += 1;
    }
    timings.decode_s = decode_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
    Ok((out, timings))
}

/// Greedy decoding that recomputes the whole sequence at every step, without a cache: the
/// reference the cached path must equal. One prompt.
pub fn greedy_without_cache(
    vlm: &Vlm,
    prompt: &[u32],
    pixels: Option<&Tensor>,
    max_new: usize,
    stop: &[u32],
) -> Result<Vec<u32>> {
    let mut ids = prompt.to_vec();
    let mut new = vec![];
    for _ in 0..max_new {
        let embeds = vlm.input_embeds(std::slice::from_ref(&ids), pixels)?.detach();
        let hidden = vlm.llm.forward_embeds(&embeds, None)?;
        let logits = last_logits(vlm, &hidden)?;
        let t =
            logits[0].iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0 as u32;
        if stop.contains(&t) {
            break;
        }
        new.push(t);
        ids.push(t);
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::cache_columns;

    #[test]
    fn the_cache_starts_with_its_room_doubles_it_and_stops_at_what_the_generation_or_model_takes() {
        // 100 prompt columns, 2000 new tokens: 1999 columns fed back at most
        assert_eq!(cache_columns(100, 2000, 512, None, 131_072), 612);
        assert_eq!(cache_columns(100, 2000, 512, Some(612), 131_072), 1124);
        assert_eq!(cache_columns(100, 2000, 512, Some(1124), 131_072), 2099);
        assert_eq!(cache_columns(100, 64, 512, None, 131_072), 163);
        assert_eq!(cache_columns(100, 1, 512, None, 131_072), 100);
        assert_eq!(cache_columns(100, usize::MAX, 512, Some(131_000), 131_072), 131_072);
        assert_eq!(cache_columns(100, usize::MAX, 512, Some(131_072), 131_072), 131_072);
        assert_eq!(cache_columns(usize::MAX, usize::MAX, 512, None, 131_072), 131_072);
    }
}
