//! `gemmaclip train`: the loop, top to bottom. Loading, batching, logging and checkpointing are the
//! small functions around it.

use crate::data::batch::collate;
use crate::data::image::{Aspect, ImageProcessor};
use crate::data::prompt::{encode, Target};
use crate::data::scienceqa::{read_split, split_file, Problem};
use crate::device;
use crate::hub;
use crate::infer::{load_base, load_tokenizer, Base, ModelArgs};
use crate::model::projector::Projector;
use crate::model::vlm::Vlm;
use crate::peft::adapter;
use crate::peft::lora::LoraSpec;
use crate::train::metrics::{self, Record};
use crate::train::optimizer::{clip_grad_norm, AdamW, AdamWConfig};
use crate::train::schedule::{factor, warmup_steps, Schedule};
use crate::train::state::{self, TrainerState};
use crate::train::step::{loss_and_grads, Batch, StepOptions};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Everything a run is given; saved as `args.json` in the output directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainArgs {
    pub output_dir: PathBuf,
    pub model: String,
    pub vision_model: String,
    pub data: String,
    pub preset_tiny: bool,
    pub num_train_epochs: f64,
    pub max_steps: Option<usize>,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub lr_scheduler_type: Schedule,
    pub warmup_ratio: f64,
    pub max_grad_norm: f64,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    pub lora_target_modules: Vec<String>,
    pub four_bit: bool,
    pub bf16: bool,
    pub gradient_checkpointing: bool,
    pub max_train_samples: Option<usize>,
    pub max_seq_len: usize,
    pub target: Target,
    pub image_aspect: Aspect,
    pub seed: u64,
    pub save_steps: usize,
    pub logging_steps: usize,
    pub loss_chunk: usize,
    /// Stop after this many optimizer steps in this invocation (the run stays resumable); for tests
    /// and for splitting a run over sessions.
    pub stop_after: Option<usize>,
}

/// The model pieces a run trains.
struct Loaded {
    vlm: Vlm,
    spec: LoraSpec,
    names: Vec<String>,
    vars: Vec<Var>,
    tokenizer: tokenizers::Tokenizer,
    images: ImageProcessor,
    llm_dir: PathBuf,
}

fn load(a: &TrainArgs, dev: &Device, dtype: DType) -> Result<Loaded> {
    let model = ModelArgs {
        preset_tiny: a.preset_tiny,
        model: a.model.clone(),
        vision_model: a.vision_model.clone(),
        four_bit: a.four_bit,
    };
    let Base { mut llm, vision, cfg, vcfg, llm_dir, vis_dir } = load_base(&model, dtype, dev)?;
    let spec =
        LoraSpec { r: a.lora_r, alpha: a.lora_alpha, dropout: a.lora_dropout, targets: a.lora_target_modules.clone() };
    adapter::attach_new(&mut llm, &spec, a.seed)?;
    let projector = Projector::init(vcfg.hidden_size, cfg.text.hidden_size, a.seed, dev)?;
    let mut named = adapter::lora_vars(&mut llm);
    if named.is_empty() {
        bail!("--lora-target-modules {:?} matches no linear of the model", a.lora_target_modules);
    }
    named.extend(projector.vars().into_iter().map(|(n, v)| (format!("projector.{n}"), v)));
    let tokenizer = load_tokenizer(&llm_dir)?;
    let images = ImageProcessor::from_dir(&vis_dir, vcfg.image_size, a.image_aspect)?;
    Ok(Loaded {
        vlm: Vlm { vision, projector, llm, cfg },
        spec,
        names: named.iter().map(|(n, _)| n.clone()).collect(),
        vars: named.into_iter().map(|(_, v)| v).collect(),
        tokenizer,
        images,
        llm_dir,
    })
}

/// The order of the rows in `epoch`: a seeded shuffle, the same for a given seed on any machine.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = crate::rng::SplitMix64::new(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for i in (1..n).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    order
}

/// Micro-batch `k` of the endless stream of epochs: the rows it holds.
fn micro_batch_rows(k: usize, n_rows: usize, batch: usize, seed: u64) -> Vec<usize> {
    let per_epoch = n_rows.div_ceil(batch);
    let (epoch, pos) = (k / per_epoch, k % per_epoch);
    let order = epoch_order(n_rows, seed, epoch);
    order[pos * batch..((pos + 1) * batch).min(n_rows)].to_vec()
}

fn make_batch(m: &Loaded, rows: &[&Problem], a: &TrainArgs, dev: &Device) -> Result<(Batch, usize)> {
    let n_img = m.vlm.vision.cfg.num_patches();
    let mut enc = vec![];
    let mut imgs = vec![];
    for p in rows {
        let img = match &p.image {
            Some(b) => Some(m.images.process_bytes(b).with_context(|| format!("row {}", p.pid))?),
            None => None,
        };
        let e =
            encode(&m.tokenizer, p, img.as_ref().map(|_| n_img), m.vlm.cfg.image_token_index, a.target, a.max_seq_len)?;
        if e.truncated && img.is_some() && e.ids.iter().filter(|&&i| i == m.vlm.cfg.image_token_index).count() != n_img
        {
            bail!("row {}: --max-seq-len {} cuts into the image block; raise it", p.pid, a.max_seq_len);
        }
        enc.push(e);
        imgs.push(img);
    }
    let tokens = enc.iter().map(|e| e.ids.len()).sum();
    Ok((collate(&enc, &imgs, m.images.size, m.vlm.cfg.text.pad_token_id, dev)?, tokens))
}

fn write_outputs(m: &mut Loaded, a: &TrainArgs) -> Result<()> {
    adapter::save(&a.output_dir.join("lora_adapter"), &mut m.vlm.llm, &m.spec, &base_model_name(a))?;
    m.vlm.projector.save(&a.output_dir.join("projector.safetensors"))?;
    let tok_dir = a.output_dir.join("tokenizer");
    std::fs::create_dir_all(&tok_dir)?;
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        let src = m.llm_dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, tok_dir.join(f)).with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    Ok(())
}

fn base_model_name(a: &TrainArgs) -> String {
    if a.preset_tiny {
        "gemmaclip/tiny".into()
    } else {
        a.model.clone()
    }
}

/// Runs training. Returns (optimizer steps done, steps the run has in all).
pub fn train(a: &TrainArgs, resume: Option<Option<PathBuf>>, interrupted: Arc<AtomicBool>) -> Result<(usize, usize)> {
    let dev = device::best_device()?;
    let dtype = if a.bf16 || dev.is_cuda() { DType::BF16 } else { DType::F32 };
    device::keep_pool_memory(&dev)?;
    std::fs::create_dir_all(&a.output_dir).with_context(|| format!("cannot create {}", a.output_dir.display()))?;
    let data_dir = if a.preset_tiny { hub::sample_dataset()? } else { hub::resolve_dataset(&a.data, "--data")? };
    let split = read_split(&split_file(&data_dir, "train")?, "train")?;
    for s in &split.skipped {
        eprintln!("skipped {}: {}", s.pid, s.reason);
    }
    let mut problems = split.problems;
    if let Some(n) = a.max_train_samples {
        problems.truncate(n);
    }
    if problems.is_empty() {
        bail!("no training rows left (of {} skipped)", split.skipped.len());
    }
    let mut m = load(a, &dev, dtype)?;
    let n_batches = problems.len().div_ceil(a.per_device_train_batch_size);
    let total = a.max_steps.unwrap_or_else(|| {
        ((a.num_train_epochs * n_batches as f64) / a.gradient_accumulation_steps as f64).ceil().max(1.0) as usize
    });
    let warmup = warmup_steps(a.warmup_ratio, total);
    let mut opt = AdamW::new(m.vars.clone(), AdamWConfig { weight_decay: a.weight_decay, ..Default::default() })?;
    let mut state = TrainerState {
        global_step: 0,
        total_steps: total,
        seed: a.seed,
        per_device_train_batch_size: a.per_device_train_batch_size,
        gradient_accumulation_steps: a.gradient_accumulation_steps,
        train_rows: problems.len(),
    };
    let metrics_path = a.output_dir.join("metrics.jsonl");
    if let Some(which) = resume {
        let dir = match which {
            Some(p) => p,
            None => state::latest(&a.output_dir).with_context(|| {
                format!("--resume: no checkpoint in {}", a.output_dir.join("checkpoints").display())
            })?,
        };
        let saved = state::load(&dir, &mut m.vlm.llm, &m.vlm.projector, &mut opt, &m.names)?;
        let same = TrainerState { global_step: saved.global_step, ..state.clone() };
        if saved != same {
            bail!("--resume {}: saved with other settings ({saved:?}); this run has {same:?}", dir.display());
        }
        state = saved;
        metrics::truncate_after(&metrics_path, state.global_step)?;
        eprintln!("resumed from {} at step {}", dir.display(), state.global_step);
    } else {
        std::fs::write(&metrics_path, b"")?;
    }
    let args_path = a.output_dir.join("args.json");
    crate::safetensors_out::write_atomic(&args_path, (serde_json::to_string_pretty(a)? + "\n").as_bytes())?;

    let bar = device::progress_bar(total, state.global_step);
    let ga = a.gradient_accumulation_steps;
    let (mut window_loss, mut window_n, mut window_samples, mut window_tokens) = (0f64, 0usize, 0usize, 0usize);
    let mut window_start = Instant::now();
    device::reset_peak_memory(&dev)?;
    let stop_at = a.stop_after.map_or(total, |s| (state.global_step + s).min(total));
    let (mut step_times, mut step_tokens, mut peak_bytes) = (vec![], vec![], 0u64);
    while state.global_step < stop_at {
        let step = state.global_step;
        let step_start = Instant::now();
        let tokens_before = window_tokens;
        let lr = a.learning_rate * factor(a.lr_scheduler_type, step, warmup, total);
        let mut grads: Vec<Option<Tensor>> = vec![None; m.vars.len()];
        let mut step_loss = 0f64;
        for micro in 0..ga {
            let k = step * ga + micro;
            let rows = micro_batch_rows(k, problems.len(), a.per_device_train_batch_size, a.seed);
            let picked: Vec<&Problem> = rows.iter().map(|&i| &problems[i]).collect();
            let (batch, tokens) = make_batch(&m, &picked, a, &dev)?;
            let opts = StepOptions {
                checkpointing: a.gradient_checkpointing,
                dropout_seed: Some(a.seed ^ (k as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407)),
                loss_chunk: a.loss_chunk,
            };
            let g = loss_and_grads(&m.vlm, &batch, &m.vars, &opts)?;
            for (acc, g) in grads.iter_mut().zip(g.grads) {
                if let Some(g) = g {
                    let g = (g / ga as f64)?;
                    *acc = Some(match acc.take() {
                        Some(a) => (a + g)?,
                        None => g,
                    });
                }
            }
            step_loss += g.loss as f64 / ga as f64;
            window_samples += picked.len();
            window_tokens += tokens;
        }
        let grad_norm = clip_grad_norm(&mut grads, a.max_grad_norm)?;
        opt.step(&grads, lr)?;
        device::synchronize(&dev)?;
        step_times.push(step_start.elapsed().as_secs_f64());
        step_tokens.push(window_tokens - tokens_before);
        state.global_step += 1;
        window_loss += step_loss;
        window_n += 1;
        bar.set_position(state.global_step as u64);
        bar.set_message(format!("loss {step_loss:.4} lr {lr:.2e}"));

        let last = state.global_step == total;
        if state.global_step.is_multiple_of(a.logging_steps) || last {
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let mem = device::memory(&dev)?;
            peak_bytes = peak_bytes.max(mem.peak.unwrap_or(0));
            let rec = Record {
                step: state.global_step,
                epoch: (state.global_step * ga) as f64 / n_batches as f64,
                loss: window_loss / window_n as f64,
                lr,
                grad_norm,
                samples_per_s: window_samples as f64 / secs,
                tokens_per_s: window_tokens as f64 / secs,
                peak_memory_gib: mem.peak.map(|b| b as f64 / (1u64 << 30) as f64),
            };
            metrics::append(&metrics_path, &rec)?;
            if bar.is_hidden() {
                eprintln!(
                    "step {}/{total} epoch {:.2} loss {:.4} lr {:.3e} grad_norm {:.3} {:.2} samples/s {:.0} tokens/s",
                    rec.step, rec.epoch, rec.loss, rec.lr, rec.grad_norm, rec.samples_per_s, rec.tokens_per_s
                );
            }
            (window_loss, window_n, window_samples, window_tokens) = (0.0, 0, 0, 0);
            window_start = Instant::now();
            device::reset_peak_memory(&dev)?;
        }
        let stop = interrupted.load(Ordering::SeqCst);
        if (a.save_steps > 0 && state.global_step.is_multiple_of(a.save_steps)) || stop || state.global_step == stop_at
        {
            let dir = state::checkpoint_dir(&a.output_dir, state.global_step);
            state::save(&dir, &mut m.vlm.llm, &m.vlm.projector, &m.spec, &base_model_name(a), &opt, &m.names, &state)?;
        }
        if stop {
            bar.abandon_with_message(format!("interrupted at step {}; resume with --resume", state.global_step));
            return Ok((state.global_step, total));
        }
    }
    bar.finish_and_clear();
    if !step_times.is_empty() {
        let mut sorted = step_times.clone();
        sorted.sort_by(f64::total_cmp);
        let med = sorted[sorted.len() / 2];
        let tokens: usize = step_tokens.iter().sum();
        let secs: f64 = step_times.iter().sum();
        eprintln!(
            "{} steps on {}: median step {:.1} ms, {:.0} tokens/s{}",
            step_times.len(),
            device::device_name(&dev),
            med * 1e3,
            tokens as f64 / secs,
            if dev.is_cuda() {
                format!(", peak memory {:.2} GiB", peak_bytes as f64 / (1u64 << 30) as f64)
            } else {
                String::new()
            }
        );
    }
    if state.global_step == total {
        write_outputs(&mut m, a)?;
        crate::train::plot::loss_curve(&metrics::read(&metrics_path)?, &a.output_dir.join("loss_curve.png"))?;
    }
    Ok((state.global_step, total))
}
