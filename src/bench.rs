//! `gemmaclip bench train-step`: one QLoRA training step (forward, backward, gradient clipping,
//! AdamW) on a synthetic 1-sample batch with the shapes of tools/bench/hf_stack.py train-step
//! (1024 tokens = <bos> + 576 image tokens + text, loss on the last 256), so the two print
//! comparable JSON lines on the same GPU.

use crate::config::LlmConfig;
use crate::device::{self, memory, reset_peak_memory, synchronize};
use crate::load::{load_base, Base, ModelArgs};
use crate::model::projector::Projector;
use crate::model::vlm::{Supervised, Vlm};
use crate::peft::adapter;
use crate::peft::lora::{LoraSpec, DEFAULT_TARGETS};
use crate::train::data_parallel::Ranks;
use crate::train::optimizer::{AdamW, AdamWConfig};
use crate::train::step::{loss_and_grads, Batch, StepOptions};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `gemmaclip bench train-step`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainStepArgs {
    /// Gemma-3 checkpoint directory (hub layout), e.g. OUT/llm from `init`.
    #[arg(long)]
    pub model: PathBuf,
    /// CLIP checkpoint directory, e.g. OUT/vision from `init`.
    #[arg(long)]
    pub vision_model: PathBuf,
    /// Keep the base in bf16 instead of NF4.
    #[arg(long)]
    pub no_4bit: bool,
    /// Gradient checkpointing: on, off, or both (two JSON lines).
    #[arg(long, value_parser = ["on", "off", "both"], default_value = "both")]
    pub checkpointing: String,
    /// Tokens of the synthetic row (image block included).
    #[arg(long, default_value_t = 1024)]
    pub seq: usize,
    /// Supervised tokens at the end of the row.
    #[arg(long, default_value_t = 256)]
    pub label_tokens: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[command(flatten)]
    pub lora: crate::train::args::LoraArgs,
    /// Supervised rows per lm_head / log-softmax chunk.
    #[arg(long, default_value_t = 256)]
    pub loss_chunk: usize,
    /// Rows per step (each `--seq` tokens with its own image), as `train`'s
    /// `--per-device-train-batch-size`.
    #[arg(long, default_value_t = 1, alias = "per-device-train-batch-size")]
    pub batch_size: usize,
    /// `--nproc-per-node N`: the step of a data-parallel run on N GPUs (each rank `--batch-size`
    /// rows, gradients summed over NCCL), timed on rank 0; tokens/s counts every rank's rows.
    #[command(flatten)]
    pub launch: crate::dist::env::LaunchArgs,
    /// As `train`'s: with several ranks, sum the gradients in buckets of this many megabytes
    /// while the backward goes on (0: after it).
    #[arg(long, default_value_t = 0.0)]
    pub ddp_bucket_cap_mb: f64,
}

impl TrainStepArgs {
    fn checkpointing_modes(&self) -> Vec<bool> {
        match self.checkpointing.as_str() {
            "on" => vec![true],
            "off" => vec![false],
            _ => vec![false, true],
        }
    }
}

fn gib(b: Option<u64>) -> serde_json::Value {
    b.map_or(serde_json::Value::Null, |b| json!((b as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0))
}

/// The synthetic batch: <bos>, the image block, random text; labels on the last `label_tokens`.
fn batch(cfg: &LlmConfig, n_image: usize, image_size: usize, a: &TrainStepArgs, dev: &Device) -> Result<Batch> {
    if a.seq < n_image + 2 || a.label_tokens >= a.seq - n_image {
        bail!(
            "--seq {} must exceed {} image tokens + 1 and leave room for --label-tokens {}",
            a.seq,
            n_image,
            a.label_tokens
        );
    }
    let mut rng = crate::rng::SplitMix64::new(1234);
    let hi = cfg.boi_token_index.min(200_000) as u64;
    let (mut rows, mut labels) = (vec![], vec![]);
    for _ in 0..a.batch_size {
        let mut ids = vec![cfg.text.bos_token_id];
        ids.extend(std::iter::repeat_n(cfg.image_token_index, n_image));
        while ids.len() < a.seq {
            ids.push((10 + rng.next_u64() % (hi - 10)) as u32);
        }
        labels.push(
            ids.iter().enumerate().map(|(t, &id)| if t >= a.seq - a.label_tokens { id as i64 } else { -100 }).collect(),
        );
        rows.push(ids);
    }
    let pixels = Tensor::randn(0f32, 1.0, (a.batch_size, 3, image_size, image_size), dev)?;
    Ok(Batch {
        supervised: Supervised::from_labels(&labels),
        ids: rows,
        valid: vec![vec![true; a.seq]; a.batch_size],
        pixels: Some(pixels),
    })
}

/// The device (pool kept cached) and the frozen base, as train and infer load it.
fn load(model: &Path, vision_model: &Path, four_bit: bool) -> Result<(Device, Base)> {
    let dev = device::best_device()?;
    device::keep_pool_memory(&dev)?;
    let args = ModelArgs {
        preset_tiny: false,
        model: model.display().to_string(),
        vision_model: vision_model.display().to_string(),
        four_bit,
    };
    let base = load_base(&args, device::default_dtype(&dev), &dev)?;
    Ok((dev, base))
}

pub fn train_step(a: &TrainStepArgs) -> Result<()> {
    if a.steps == 0 || a.batch_size == 0 {
        bail!("--steps and --batch-size must be at least 1");
    }
    if a.launch.nproc_per_node.is_some() && std::env::var_os("WORLD_SIZE").is_none() {
        if crate::dist::launch::run(&a.launch)? != 0 {
            bail!("interrupted");
        }
        return Ok(());
    }
    let t = Instant::now();
    let (dev, base) = load(&a.model, &a.vision_model, !a.no_4bit)?;
    let load_s = t.elapsed().as_secs_f64();
    // the settings, not where each host sits in the launch
    let settings = format!("{:?}", TrainStepArgs { launch: Default::default(), ..a.clone() });
    let timeout = std::time::Duration::from_secs(a.launch.rendezvous_timeout);
    crate::dist::worker::as_worker(
        &dev,
        &settings,
        timeout,
        crate::dist::worker::Nccl::for_buckets(a.ddp_bucket_cap_mb),
        |worker| {
            let ranks = Ranks { worker };
            ranks.start_watch(std::time::Duration::from_secs(a.launch.collective_timeout))?;
            train_steps(a, &dev, base, load_s, ranks)
        },
    )
}

/// The timed steps of `train_step`, as one rank of `ranks`.
fn train_steps(a: &TrainStepArgs, dev: &Device, base: Base, load_s: f64, ranks: Ranks) -> Result<()> {
    let dev = dev.clone();
    let Base { mut llm, vision, cfg, vcfg, .. } = base;
    let after_load = memory(&dev)?;

    a.lora.validate()?;
    let spec = a.lora.spec(&DEFAULT_TARGETS.map(String::from));
    adapter::attach_new(&mut llm, &spec, 0)?;
    let projector = Projector::init(vcfg.hidden_size, cfg.text.hidden_size, 0, &dev)?;
    let named = adapter::lora_vars(&mut llm);
    let mut layers: Vec<Option<usize>> = named.iter().map(|(n, _)| crate::train::grad_buckets::layer_of(n)).collect();
    let mut vars: Vec<Var> = named.into_iter().map(|(_, v)| v).collect();
    vars.extend(projector.vars().into_iter().map(|(_, v)| v));
    layers.resize(vars.len(), None);
    // as `train` does: bf16 working copies of A and B unless GEMMACLIP_CAST_LORA=1 (casts per call)
    let compute = device::default_dtype(&dev);
    let cast_per_call = std::env::var_os("GEMMACLIP_CAST_LORA").is_some();
    let mut work = adapter::working_copies(&mut llm, if cast_per_call { DType::F32 } else { compute })?;
    work.resize(vars.len(), None);
    let trainable: usize = vars.iter().map(|v| v.elem_count()).sum();
    let frozen_gib = llm.frozen_bytes() as f64 / (1u64 << 30) as f64;
    let vlm = Vlm { vision, projector, llm, cfg: cfg.clone() };
    let batch = batch(&cfg, vcfg.num_patches(), vcfg.image_size, a, &dev)?;

    // each mode starts from the same weights (the first mode's steps update the shared vars), so
    // that both modes' first-step loss and gradient norm describe the same step; a host copy (on
    // the device it would count in the steps' peak; on the CPU to_device alone shares the storage)
    let initial: Vec<Tensor> =
        vars.iter().map(|v| v.as_tensor().to_device(&Device::Cpu)?.copy()).collect::<candle_core::Result<_>>()?;
    for ckpt in a.checkpointing_modes() {
        for (v, t) in vars.iter().zip(&initial) {
            v.set(&t.to_device(&dev)?)?;
        }
        let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
        opt.work = work.clone();
        opt.refresh_work()?;
        let graph_vars = opt.graph_vars();
        let world = ranks.world();
        let mut grad_sum = crate::train::optimizer::GradSum::new(&opt, 1, world > 1)?;
        let buckets = ranks.buckets(&mut grad_sum, &layers, &vars, a.ddp_bucket_cap_mb)?;
        // each rank's loss is its part of the mean over every rank's supervised tokens
        let opts = StepOptions {
            checkpointing: ckpt,
            loss_chunk: a.loss_chunk,
            loss_denominator: Some(world * batch.supervised.rows.len()),
            ..Default::default()
        };
        let mut times = vec![];
        let mut loss = 0f32;
        let mut first = (0f32, 0f64);
        let mut peak = 0u64;
        for step in 0..a.warmup + a.steps {
            reset_peak_memory(&dev)?;
            synchronize(&dev)?;
            let t = Instant::now();
            let seed = step as u64 ^ (ranks.rank() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let opts = StepOptions { dropout_seed: Some(seed), ..opts.clone() };
            let mut g = match &buckets {
                Some(b) => ranks.last_micro_batch(b, &mut grad_sum, &opt, &vlm, &batch, &graph_vars, &opts)?,
                None => loss_and_grads(&vlm, &batch, &graph_vars, &opts)?,
            };
            // as `train` does: one rank's sums in a flat buffer, reduced across the ranks
            grad_sum.add(std::mem::take(&mut g.grads))?;
            let (grads, summed) = ranks.reduce_step(&mut grad_sum, &opt, g.loss as f64)?;
            (g.grads, g.loss) = (grads, summed as f32);
            ranks.progress();
            let clip = opt.grad_norm(&mut g.grads, 1.0)?;
            if step == 0 {
                // the first step starts from the same weights and dropout seed in every build and
                // attention mode: what `GEMMACLIP_COMPOSED=attention,lora` is compared on
                first = (g.loss, clip.norm);
            }
            opt.step_clipped(&mut g.grads, clip, 1e-4)?;
            synchronize(&dev)?;
            if step >= a.warmup {
                times.push(t.elapsed().as_secs_f64());
                peak = peak.max(memory(&dev)?.peak.unwrap_or(0));
            }
            loss = g.loss;
        }
        // one more step with the device synchronized between phases, for the split (untimed)
        let split = loss_and_grads(&vlm, &batch, &graph_vars, &StepOptions { phases: true, ..opts.clone() })?.phases;
        let split: Vec<serde_json::Value> = split
            .iter()
            .map(|p| json!({"phase": p.name, "ms": (p.ms * 10.0).round() / 10.0, "host_ms": (p.host_ms * 10.0).round() / 10.0, "peak_alloc_gib": gib(p.peak)}))
            .collect();
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        let after = memory(&dev)?;
        if !ranks.is_main() {
            continue;
        }
        println!(
            "{}",
            json!({
                "what": "gemmaclip_train_step", "four_bit": !a.no_4bit, "grad_ckpt": ckpt, "fused_optimizer": opt.fused, "lora_working_copies": !cast_per_call,
                "seq": a.seq, "batch_size": a.batch_size, "world": world, "ddp_bucket_cap_mb": a.ddp_bucket_cap_mb, "label_tokens": a.label_tokens, "lora_r": a.lora.lora_r,
                "trainable_params": trainable, "step_ms_median": (med * 1e4).round() / 10.0,
                "step_ms_min": (times[0] * 1e4).round() / 10.0,
                "tokens_per_s": ((world * a.batch_size * a.seq) as f64 / med * 10.0).round() / 10.0,
                "phases": split,
                "loss": loss, "step1_loss": first.0, "step1_grad_norm": first.1,
                "attention": if crate::model::fused_attention::enabled(&dev, compute) { "cudnn" } else { "composed" },
                "gpu": device::device_name(&dev), "load_s": (load_s * 10.0).round() / 10.0,
                "frozen_weights_gib": (frozen_gib * 100.0).round() / 100.0,
                "resident_after_load_gib": gib(after_load.used),
                "resident_with_adapters_and_optimizer_gib": gib(after.used),
                "peak_alloc_gib": gib(if dev.is_cuda() { Some(peak) } else { None }),
                "device_used_gib": gib(after.device_used),
            })
        );
    }
    ranks.barrier()
}

/// `gemmaclip bench generate`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Gemma-3 checkpoint directory (hub layout).
    #[arg(long)]
    pub model: PathBuf,
    /// CLIP checkpoint directory.
    #[arg(long)]
    pub vision_model: PathBuf,
    /// Keep the base in bf16 instead of NF4.
    #[arg(long)]
    pub no_4bit: bool,
    /// Prompt length in tokens, image block included.
    #[arg(long, default_value_t = 800)]
    pub prompt: usize,
    /// New tokens to generate (at least 2).
    #[arg(long, default_value_t = 256)]
    pub new: usize,
    /// Attach fresh LoRA adapters of this rank (0: the base model alone, as hf_reference.py infer
    /// measures it).
    #[arg(long, default_value_t = 0)]
    pub lora_r: usize,
    /// Prompts generated together (each with its own image); decode tokens/s counts every row.
    /// Several (`1,8,32`) give one JSON line each from one load of the model.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch_size: Vec<usize>,
    /// Also check exactness over this many greedy tokens (0: no check): one prompt answered with
    /// the captured decode step, with eager steps, and by recomputing the sequence every token.
    #[arg(long, default_value_t = 0)]
    pub compare: usize,
    /// Sample at this temperature instead of choosing greedily (0, the default).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// When sampling, keep only the k most likely tokens (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// When sampling, keep the smallest set of most likely tokens whose probability reaches p.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
}

/// Time to first token for `--batch-size` `prompt`-token prompts (<bos> + image block + text) and
/// decode speed over every row, measured as tools/bench/hf_stack.py generate does (best of 3 and
/// of 2 runs).
pub fn generate(a: &GenerateArgs) -> Result<()> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        bail!("--temperature must be a number of at least 0, got {}", a.temperature);
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    if a.new < 2 {
        bail!("--new must be at least 2");
    }
    if a.batch_size.is_empty() || a.batch_size.contains(&0) {
        bail!("--batch-size must be at least 1");
    }
    let (dev, Base { mut llm, vision, cfg, vcfg, .. }) = load(&a.model, &a.vision_model, !a.no_4bit)?;
    if a.lora_r > 0 {
        let spec = LoraSpec {
            r: a.lora_r,
            alpha: 2.0 * a.lora_r as f64,
            dropout: 0.0,
            targets: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
        };
        adapter::attach_new(&mut llm, &spec, 0)?;
        // GEMMACLIP_CAST_LORA=1: cast A and B per call, as before the resident copies
        let cast_per_call = std::env::var_os("GEMMACLIP_CAST_LORA").is_some();
        let dtype = llm.dtype();
        llm.freeze_adapters(if cast_per_call { DType::F32 } else { dtype })?;
    }
    let projector = Projector::init(vcfg.hidden_size, cfg.text.hidden_size, 0, &dev)?;
    let vlm = Vlm { vision, projector, llm, cfg: cfg.clone() };
    let n_img = vcfg.num_patches();
    if a.prompt < n_img + 3 {
        bail!("--prompt {} must exceed the image block ({} tokens)", a.prompt, n_img + 2);
    }
    let mut rng = crate::rng::SplitMix64::new(7);
    let hi = cfg.boi_token_index.min(200_000) as u64;
    let mut ids = vec![cfg.text.bos_token_id, cfg.boi_token_index];
    ids.extend(std::iter::repeat_n(cfg.image_token_index, n_img));
    ids.push(cfg.eoi_token_index);
    while ids.len() < a.prompt {
        ids.push((10 + rng.next_u64() % (hi - 10)) as u32);
    }
    for &batch in &a.batch_size {
        let pixels = Tensor::randn(0f32, 1.0, (batch, 3, vcfg.image_size, vcfg.image_size), &dev)?;
        let prompts = vec![ids.clone(); batch];
        time_generation(&vlm, &prompts, &pixels, a, &dev)?;
    }
    if a.compare > 0 {
        let pixels = Tensor::randn(0f32, 1.0, (1, 3, vcfg.image_size, vcfg.image_size), &dev)?;
        compare_paths(&vlm, &ids, &pixels, a.compare)?;
    }
    Ok(())
}

/// One JSON line: how many of `n` greedy tokens the captured decode step, eager decode steps and
/// recomputation without a cache agree on (the first difference ends the count).
fn compare_paths(vlm: &Vlm, prompt: &[u32], pixels: &Tensor, n: usize) -> Result<()> {
    use crate::fused_ops::{force_composed, FusedOp};
    use crate::generate::{generate, greedy_without_cache, GenerateOptions};
    let o = GenerateOptions::greedy(n, vec![]);
    let cached = |graph: bool| -> Result<Vec<u32>> {
        force_composed(FusedOp::DecodeGraph, !graph);
        let r = generate(vlm, std::slice::from_ref(&prompt.to_vec()), Some(pixels), &o, &mut |_, _| {});
        force_composed(FusedOp::DecodeGraph, false);
        Ok(r?.0.remove(0).tokens)
    };
    let (replayed, eager) = (cached(true)?, cached(false)?);
    let recomputed = greedy_without_cache(vlm, prompt, Some(pixels), n, &[])?;
    let agree = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    println!(
        "{}",
        json!({
            "what": "gemmaclip_generate_exactness", "tokens": n, "graph_vs_eager": agree(&replayed, &eager),
            "graph_vs_recomputed": agree(&replayed, &recomputed), "eager_vs_recomputed": agree(&eager, &recomputed),
        })
    );
    Ok(())
}

/// One JSON line: time to first token and decode tokens/s (every row) for `prompts`.
fn time_generation(vlm: &Vlm, prompts: &[Vec<u32>], pixels: &Tensor, a: &GenerateArgs, dev: &Device) -> Result<()> {
    use crate::generate::{generate, GenerateOptions};
    let batch = prompts.len();
    let run = |n: usize| -> Result<(f64, f64, usize)> {
        let o = GenerateOptions {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            ..GenerateOptions::greedy(n, vec![])
        };
        synchronize(dev)?;
        let t = Instant::now();
        let (_, tm) = generate(vlm, prompts, Some(pixels), &o, &mut |_, _| {})?;
        synchronize(dev)?;
        Ok((t.elapsed().as_secs_f64(), tm.time_to_first_token_s, tm.decode_steps))
    };
    run(4)?;
    reset_peak_memory(dev)?;
    let first = (0..3).map(|_| run(1).map(|r| r.0)).collect::<Result<Vec<_>>>()?.into_iter().fold(f64::MAX, f64::min);
    let full =
        (0..2).map(|_| run(a.new).map(|r| r.0)).collect::<Result<Vec<_>>>()?.into_iter().fold(f64::MAX, f64::min);
    let mem = memory(dev)?;
    println!(
        "{}",
        json!({
            "what": "gemmaclip_generate", "four_bit": !a.no_4bit, "lora_r": a.lora_r,
            "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p,
            "cuda_graph": dev.is_cuda() && a.temperature <= 0.0 && crate::fused_ops::allowed(crate::fused_ops::FusedOp::DecodeGraph),
            "prompt_tokens": a.prompt, "new_tokens": a.new, "batch_size": batch,
            "time_to_first_token_ms": (first * 1e4).round() / 10.0,
            "decode_tokens_per_s": ((batch * (a.new - 1)) as f64 / (full - first) * 10.0).round() / 10.0,
            "gpu": device::device_name(dev), "peak_alloc_gib": gib(mem.peak),
        })
    );
    Ok(())
}
