//! Generation with a KV cache: prompts right-padded into one block, prefill, then one token per
//! step until `<end_of_turn>`/`<eos>` or the token budget. Greedy at temperature 0 (chosen on the
//! device), otherwise temperature / top-k / top-p sampling from a seeded generator on the host.

use crate::model::decode::first_max;
use crate::model::vlm::Vlm;
use crate::rng::SplitMix64;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
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

fn sample(logits: &[f32], o: &GenerateOptions, rng: &mut SplitMix64) -> u32 {
    let argmax =
        || logits.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0 as u32;
    if o.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if o.top_k > 0 {
        idx.truncate(o.top_k);
    }
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - max) / o.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if o.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|&p| {
            acc += p;
            acc >= o.top_p
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        idx.truncate(keep);
        let t: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= t);
    }
    let u = rng.next_f64();
    let mut acc = 0.0;
    for (p, &i) in probs.iter().zip(&idx) {
        acc += p;
        if u < acc {
            return i as u32;
        }
    }
    *idx.last().expect("non-empty") as u32
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
/// right-padded into one block; the KV cache is allocated once for the block and the new tokens.
/// Greedy decoding chooses on the device and, on a GPU, replays its step as a CUDA graph;
/// sampling brings each step's logits to the host.
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
    let l = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if l == 0 {
        bail!("empty prompt");
    }
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
    // the last new token is never fed back
    let capacity = (l + o.max_new_tokens.saturating_sub(1)).min(max_pos);
    let mut cache = vlm.llm.new_cache(b, capacity)?;
    // rows the NF4 GEMV does not take: dequantize the base once, not at every step (2 GiB kept free
    // for the step's activations)
    let _dense = if b > crate::peft::nf4::GEMV_MAX_ROWS { vlm.llm.keep_dequantized(2 << 30)? } else { None };
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
            let rows = logits.to_vec2::<f32>()?;
            let next: Vec<u32> =
                rows.iter().zip(out).map(|(row, g)| if finished(g) { pad } else { sample(row, o, &mut rng) }).collect();
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
        if l + step >= capacity {
            return Err(too_long(l + step + 1));
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
