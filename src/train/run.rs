//! `gemmaclip train`: the loop, top to bottom. Loading, batching, logging and checkpointing are the
//! small functions around it.

use crate::data::batch::collate;
use crate::data::image::ImageProcessor;
use crate::data::prompt::encode;
use crate::data::scienceqa::{read_split, report_skipped, split_file, Problem, Skipped};
use crate::device;
use crate::hub;
use crate::load::{load_base, load_tokenizer, Base, ModelArgs};
use crate::model::projector::Projector;
use crate::model::vlm::Vlm;
use crate::peft::adapter;
use crate::peft::lora::LoraSpec;
pub use crate::train::args::TrainArgs;
use crate::train::data_parallel::Ranks;
use crate::train::grad_buckets::layer_of;
use crate::train::metrics::{self, Record};
use crate::train::optimizer::{AdamW, AdamWConfig, GradSum};
use crate::train::resume::{check_output_dir, check_resume_settings, claim_output_dir, restore};
use crate::train::schedule::{factor, warmup_steps};
use crate::train::state::{self, Snapshot, TrainerState};
use crate::train::step::{loss_and_grads, Batch, StepOptions};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Var};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The model pieces a run trains.
struct Loaded {
    vlm: Vlm,
    spec: LoraSpec,
    names: Vec<String>,
    vars: Vec<Var>,
    /// `vars[i]`'s working copy in the compute dtype, if it has one (see `AdamW::work`).
    work: Vec<Option<Var>>,
    tokenizer: tokenizers::Tokenizer,
    images: ImageProcessor,
    llm_dir: PathBuf,
    vis_dir: PathBuf,
}

fn load(a: &TrainArgs, dev: &Device, dtype: DType) -> Result<Loaded> {
    let model = ModelArgs {
        preset_tiny: a.preset_tiny(),
        model: a.model.clone(),
        vision_model: a.vision_model.clone(),
        four_bit: a.four_bit(),
    };
    let Base { mut llm, vision, cfg, vcfg, llm_dir, vis_dir } = load_base(&model, dtype, dev)?;
    let spec = a.lora.spec(&a.lora_target_modules);
    adapter::attach_new(&mut llm, &spec, a.seed)?;
    let projector = Projector::init(vcfg.hidden_size, cfg.text.hidden_size, a.seed, dev)?;
    let mut named = adapter::lora_vars(&mut llm);
    if named.is_empty() {
        bail!("--lora-target-modules {:?} matches no linear of the model", a.lora_target_modules);
    }
    let mut work = adapter::working_copies(&mut llm, dtype)?;
    named.extend(projector.vars().into_iter().map(|(n, v)| (format!("projector.{n}"), v)));
    work.resize(named.len(), None);
    let tokenizer = load_tokenizer(&llm_dir)?;
    let images = ImageProcessor::from_dir(&vis_dir, vcfg.image_size, a.image_aspect)?;
    Ok(Loaded {
        vlm: Vlm { vision, projector, llm, cfg },
        spec,
        names: named.iter().map(|(n, _)| n.clone()).collect(),
        vars: named.into_iter().map(|(_, v)| v).collect(),
        work,
        tokenizer,
        images,
        llm_dir,
        vis_dir,
    })
}

/// Encodes every row once, as the batches will, and keeps those a step can train on: a row whose
/// image block or whole model turn falls past --max-seq-len would otherwise stop the run at the
/// step that first reaches it.
fn trainable_rows(m: &Loaded, problems: Vec<Problem>, a: &TrainArgs) -> Result<(Vec<Problem>, Vec<Skipped>)> {
    use rayon::prelude::*;
    let n_img = m.vlm.vision.cfg.num_patches();
    let image_id = m.vlm.cfg.image_token_index;
    let verdicts: Vec<Result<Option<String>>> = problems
        .par_iter()
        .map(|p| {
            let e = encode(&m.tokenizer, p, p.image.as_ref().map(|_| n_img), image_id, a.target, a.max_seq_len)
                .with_context(|| format!("row {}", p.pid))?;
            let kept_img = e.ids.iter().filter(|&&i| i == image_id).count();
            Ok(if p.image.is_some() && kept_img != n_img {
                Some(format!("--max-seq-len {} cuts into its image block", a.max_seq_len))
            } else if e.labels.iter().all(|&l| l < 0) {
                Some(format!("--max-seq-len {} leaves no supervised token", a.max_seq_len))
            } else {
                None
            })
        })
        .collect();
    let (mut kept, mut skipped) = (vec![], vec![]);
    for (p, v) in problems.into_iter().zip(verdicts) {
        match v? {
            Some(reason) => skipped.push(Skipped { pid: p.pid.clone(), reason }),
            None => kept.push(p),
        }
    }
    Ok((kept, skipped))
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
        enc.push(encode(
            &m.tokenizer,
            p,
            img.as_ref().map(|_| n_img),
            m.vlm.cfg.image_token_index,
            a.target,
            a.max_seq_len,
        )?);
        imgs.push(img);
    }
    let tokens = enc.iter().map(|e| e.ids.len()).sum();
    Ok((collate(&enc, &imgs, m.images.size, m.vlm.cfg.text.pad_token_id, dev)?, tokens))
}

fn write_outputs(m: &mut Loaded, a: &TrainArgs) -> Result<()> {
    if !state::all_finite(m.vars.iter().map(|v| v.as_tensor()))? {
        bail!("the trained weights are not finite; no adapter or projector written");
    }
    adapter::save(&a.output_dir.join("lora_adapter"), &mut m.vlm.llm, &m.spec, &base_model_name(a))?;
    m.vlm.projector.save(&a.output_dir.join("projector.safetensors"))?;
    let tok_dir = a.output_dir.join("tokenizer");
    std::fs::create_dir_all(&tok_dir).with_context(|| format!("cannot create {}", tok_dir.display()))?;
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        let src = m.llm_dir.join(f);
        if src.is_file() {
            let bytes = std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
            crate::safetensors_out::write_atomic(&tok_dir.join(f), &bytes)?;
        }
    }
    Ok(())
}

fn base_model_name(a: &TrainArgs) -> String {
    if a.preset_tiny() {
        "gemmaclip/tiny".into()
    } else {
        a.model.clone()
    }
}

/// What every rank of a run must agree on: the training settings, without where things are on
/// each host.
fn rank_settings(a: &TrainArgs) -> Result<String> {
    let mut v = serde_json::to_value(a)?;
    if let Some(o) = v.as_object_mut() {
        for k in ["output_dir", "model", "vision_model", "data"] {
            o.remove(k);
        }
        // not a training setting (args.json leaves it out), but the ranks' buckets, and so their
        // collectives, must be the same
        o.insert("ddp_bucket_cap_mb".into(), a.ddp_bucket_cap_mb.into());
    }
    Ok(v.to_string())
}

/// Runs training (or continues it with `a.resume`). Returns (optimizer steps done, steps the run has in all).
/// As a worker of a run of several (WORLD_SIZE set), it first meets the others; if it then fails,
/// they stop too, naming it.
pub fn train(a: &TrainArgs, interrupted: Arc<AtomicBool>) -> Result<(usize, usize)> {
    a.validate()?;
    let dev = device::best_device()?;
    let timeout = std::time::Duration::from_secs(a.launch.rendezvous_timeout);
    crate::dist::worker::as_worker(
        &dev,
        &rank_settings(a)?,
        timeout,
        crate::dist::worker::Nccl::for_buckets(a.ddp_bucket_cap_mb),
        |worker| run(a, interrupted, dev.clone(), Ranks { worker }),
    )
}

fn run(a: &TrainArgs, interrupted: Arc<AtomicBool>, dev: Device, ranks: Ranks) -> Result<(usize, usize)> {
    let main = ranks.is_main();
    if a.resume.is_none() && main {
        check_output_dir(a)?;
    }
    // candle's CPU matmul has no bf16: --bf16 (the Trainer's flag) is what a GPU does anyway
    let dtype = device::default_dtype(&dev);
    device::keep_pool_memory(&dev)?;
    if main {
        std::fs::create_dir_all(&a.output_dir).with_context(|| format!("cannot create {}", a.output_dir.display()))?;
    }
    let data_dir = if a.preset_tiny() { hub::sample_dataset()? } else { hub::resolve_dataset(&a.data, "--data")? };
    let split = read_split(&split_file(&data_dir, "train")?, "train")?;
    if main {
        split.report_skipped();
    }
    let mut m = load(a, &dev, dtype)?;
    let (mut problems, too_long) = trainable_rows(&m, split.problems, a)?;
    if main {
        report_skipped(&too_long, "cut by --max-seq-len");
    }
    if let Some(n) = a.max_train_samples {
        problems.truncate(n);
    }
    if problems.is_empty() {
        bail!("no training rows left (skipped {})", split.skipped.len() + too_long.len());
    }
    // micro-batches of the global batch: each rank reads its share of every one
    let (world, rank) = (ranks.world(), ranks.rank());
    let n_batches = problems.len().div_ceil(world * a.per_device_train_batch_size);
    let total = a.max_steps.unwrap_or_else(|| {
        ((a.num_train_epochs * n_batches as f64) / a.gradient_accumulation_steps as f64).ceil().max(1.0) as usize
    });
    let warmup = warmup_steps(a.warmup_ratio, total);
    let mut opt = AdamW::new(m.vars.clone(), AdamWConfig { weight_decay: a.weight_decay, ..Default::default() })?;
    opt.work = m.work.clone();
    let mut state = TrainerState {
        global_step: 0,
        total_steps: total,
        seed: a.seed,
        per_device_train_batch_size: a.per_device_train_batch_size,
        gradient_accumulation_steps: a.gradient_accumulation_steps,
        train_rows: problems.len(),
        world_size: world,
    };
    let metrics_path = a.output_dir.join("metrics.jsonl");
    let steps_path = a.output_dir.join("steps.jsonl");
    let recorded = recorded_args(a, &m, &data_dir)?;
    let args_json = serde_json::to_value(&recorded)?;
    if let (Some(which), true) = (&a.resume, main) {
        let (dir, loaded) = restore(a, which, (&mut m.vlm.llm, &m.vlm.projector, &m.names), &mut opt)?;
        opt.refresh_work()?;
        check_resume_settings(&recorded, &dir, loaded.args, &loaded.state, &state)?;
        // the layout may change with the number of ranks (checked above); later checkpoints record this one's
        state = TrainerState {
            world_size: state.world_size,
            per_device_train_batch_size: state.per_device_train_batch_size,
            ..loaded.state
        };
        if state.global_step == total {
            eprintln!("{}: the run is finished ({total} of {total} steps); writing its outputs again", dir.display());
        } else {
            eprintln!("resumed from {} at step {}", dir.display(), state.global_step);
        }
        metrics::truncate_after(&metrics_path, state.global_step)?;
        metrics::truncate_after(&steps_path, state.global_step)?;
    } else if main {
        claim_output_dir(a)?;
        crate::safetensors_out::write_atomic(&metrics_path, b"")?;
        crate::safetensors_out::write_atomic(&steps_path, b"")?;
    }
    ranks.share_start(&mut opt, &mut state)?;
    if main {
        let args_path = a.output_dir.join("args.json");
        crate::safetensors_out::write_atomic(&args_path, (serde_json::to_string_pretty(&recorded)? + "\n").as_bytes())?;
        let skipped = split.skipped.len() + too_long.len();
        print_summary(a, &m, &dev, dtype, (problems.len(), skipped), (total, n_batches), world);
    }

    let graph_vars = opt.graph_vars();
    let bar = if main { device::progress_bar(total, state.global_step) } else { indicatif::ProgressBar::hidden() };
    let ga = a.gradient_accumulation_steps;
    let mut grad_sum = GradSum::new(&opt, ga, world > 1)?;
    let layers: Vec<Option<usize>> = m.names.iter().map(String::as_str).map(layer_of).collect();
    let buckets = ranks.buckets(&mut grad_sum, &layers, &m.vars, a.ddp_bucket_cap_mb)?;
    // --max-grad-norm 0 turns clipping off, as in the Trainer
    let max_norm = if a.max_grad_norm > 0.0 { a.max_grad_norm } else { f64::INFINITY };
    let (mut window_loss, mut window_n, mut window_samples, mut window_tokens) = (0f64, 0usize, 0usize, 0usize);
    let mut window_start = Instant::now();
    device::reset_peak_memory(&dev)?;
    let stop_at = a.stop_after.map_or(total, |s| (state.global_step + s).min(total));
    ranks.same_plan(&[
        ("the number of steps", total),
        ("the step to stop at", stop_at),
        ("the number of usable training rows", problems.len()),
        ("the fused optimizer (0 or 1)", opt.fused as usize),
        ("the gradient buckets (--ddp-bucket-cap-mb)", buckets.as_ref().map_or(0, |b| b.len())),
    ])?;
    // every rank has loaded and agreed: from here a step that never ends is a hang
    ranks.start_watch(std::time::Duration::from_secs(a.launch.collective_timeout))?;
    let (mut step_times, mut step_tokens, mut peak_bytes) = (vec![], vec![], 0u64);
    while state.global_step < stop_at {
        let step = state.global_step;
        let step_start = Instant::now();
        let tokens_before = window_tokens;
        let lr = a.learning_rate * factor(a.lr_scheduler_type, step, warmup, total);
        let mut local_loss = 0f64;
        // The step's loss is the mean over the supervised tokens of all its micro-batches, so the
        // batches are built first to count them.
        let mut micro_batches = vec![];
        // this rank's supervised tokens, tokens and rows, then summed over the ranks
        let mut counts = [0f32; 3];
        for micro in 0..ga {
            let k = step * ga + micro;
            let rows =
                crate::data::order::rank_rows(k, problems.len(), a.per_device_train_batch_size, a.seed, world, rank);
            // an epoch's last micro-batch may leave a rank without rows: it adds nothing
            if rows.is_empty() {
                continue;
            }
            let picked: Vec<&Problem> = rows.iter().map(|&i| &problems[i]).collect();
            let (batch, tokens) = make_batch(&m, &picked, a, &dev)?;
            counts[0] += batch.supervised.rows.len() as f32;
            counts[1] += tokens as f32;
            counts[2] += picked.len() as f32;
            micro_batches.push((k, batch));
        }
        ranks.sum(&mut counts)?;
        let supervised = counts[0] as usize;
        window_tokens += counts[1] as usize;
        window_samples += counts[2] as usize;
        // the buckets' sums start inside the step's last micro-batch, on every rank alike: only
        // when every rank has rows in it
        let last_k = step * ga + ga - 1;
        let everyone_last = (0..world).all(|r| {
            !crate::data::order::rank_rows(last_k, problems.len(), a.per_device_train_batch_size, a.seed, world, r)
                .is_empty()
        });
        for (k, batch) in micro_batches {
            let opts = StepOptions {
                checkpointing: a.gradient_checkpointing,
                dropout_seed: Some(ranks.dropout_seed(a.seed, k)),
                loss_chunk: a.loss_chunk,
                loss_denominator: Some(supervised),
                phases: false,
            };
            let g = match &buckets {
                Some(b) if k == last_k && everyone_last => {
                    ranks.last_micro_batch(b, &mut grad_sum, &opt, &m.vlm, &batch, &graph_vars, &opts)?
                }
                _ => loss_and_grads(&m.vlm, &batch, &graph_vars, &opts)?,
            };
            local_loss += g.loss as f64;
            grad_sum.add(g.grads)?;
        }
        let (mut grads, step_loss) = ranks.reduce_step(&mut grad_sum, &opt, local_loss)?;
        let clip = opt.grad_norm(&mut grads, max_norm)?;
        let grad_norm = clip.norm;
        if !(step_loss.is_finite() && grad_norm.is_finite()) {
            bar.abandon();
            let last = state::latest_up_to(&a.output_dir, step)
                .map_or("no checkpoint was written".to_string(), |d| format!("the last checkpoint is {}", d.display()));
            bail!(
                "step {}: the loss is {step_loss} and the gradient norm {grad_norm}; training diverged (try a lower --learning-rate); this step was not applied and nothing after step {step} was written; {last}",
                step + 1
            );
        }
        opt.step_clipped(&mut grads, clip, lr)?;
        device::synchronize(&dev)?;
        step_times.push(step_start.elapsed().as_secs_f64());
        step_tokens.push(window_tokens - tokens_before);
        state.global_step += 1;
        window_loss += step_loss;
        window_n += 1;
        let secs = step_times.last().copied().unwrap_or(0.0).max(1e-9);
        let step_tokens_per_s = *step_tokens.last().unwrap_or(&0) as f64 / secs;
        let epoch = (state.global_step * ga) as f64 / n_batches as f64;
        // every step goes to steps.jsonl (the loss curve); metrics.jsonl keeps the logging windows
        if main {
            metrics::append(
                &steps_path,
                &Record {
                    step: state.global_step,
                    epoch,
                    loss: step_loss,
                    lr,
                    grad_norm,
                    samples_per_s: (ga * world * a.per_device_train_batch_size) as f64 / secs,
                    tokens_per_s: step_tokens_per_s,
                    peak_memory_gib: None,
                },
            )?;
        }
        bar.set_position(state.global_step as u64);
        bar.set_message(format!(
            "loss {step_loss:.4} lr {lr:.2e} grad-norm {grad_norm:.3} {step_tokens_per_s:.0} tokens/s {secs:.2} s/step"
        ));

        let last = state.global_step == total;
        if main && (state.global_step.is_multiple_of(a.logging_steps) || last) {
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let mem = device::memory(&dev)?;
            peak_bytes = peak_bytes.max(mem.peak.unwrap_or(0));
            let rec = Record {
                step: state.global_step,
                epoch,
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
        // every rank stops at the same step when any was interrupted
        let stop = ranks.any(interrupted.load(Ordering::SeqCst))?;
        ranks.progress();
        let save = (a.save_steps > 0 && state.global_step.is_multiple_of(a.save_steps))
            || stop
            || state.global_step == stop_at;
        if save && main {
            let dir = state::checkpoint_dir(&a.output_dir, state.global_step);
            let snap = Snapshot { opt: &opt, names: &m.names, state: &state, args: &args_json };
            state::save(&dir, &mut m.vlm.llm, &m.vlm.projector, &m.spec, &base_model_name(a), &snap)?;
            if let Some(keep) = a.save_total_limit {
                state::prune(&a.output_dir, keep, state.global_step)?;
            }
        }
        if stop {
            bar.abandon_with_message(format!("interrupted at step {}; resume with --resume", state.global_step));
            ranks.barrier()?;
            return Ok((state.global_step, total));
        }
    }
    bar.finish_and_clear();
    if main {
        report_and_write(a, &mut m, &dev, &state, total, (&step_times, &step_tokens, peak_bytes, world), &steps_path)?;
    }
    ranks.barrier()?;
    Ok((state.global_step, total))
}

/// Rank 0 at the end of a run: the speed summary, and the outputs once the run is complete.
fn report_and_write(
    a: &TrainArgs,
    m: &mut Loaded,
    dev: &Device,
    state: &TrainerState,
    total: usize,
    timing: (&[f64], &[usize], u64, usize),
    steps_path: &Path,
) -> Result<()> {
    let (step_times, step_tokens, peak_bytes, world) = timing;
    if !step_times.is_empty() {
        let mut sorted = step_times.to_vec();
        sorted.sort_by(f64::total_cmp);
        let med = sorted[sorted.len() / 2];
        let tokens: usize = step_tokens.iter().sum();
        let secs: f64 = step_times.iter().sum();
        eprintln!(
            "{} steps on {}{}: median step {:.1} ms, {:.0} tokens/s{}",
            step_times.len(),
            device::device_name(dev),
            if world > 1 { format!(" x {world} ranks") } else { String::new() },
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
        write_outputs(m, a)?;
        let curve = a.output_dir.join("loss_curve.png");
        crate::train::plot::loss_curve(&metrics::read(steps_path)?, &curve)?;
        let o = |f: &str| a.output_dir.join(f).display().to_string();
        eprintln!("adapter (PEFT): {}", o("lora_adapter"));
        eprintln!("projector:      {}", o("projector.safetensors"));
        eprintln!("tokenizer:      {}", o("tokenizer"));
        eprintln!("metrics:        {} (every step: {})", o("metrics.jsonl"), o("steps.jsonl"));
        eprintln!("loss curve:     {}", curve.display());
        if let Some(c) = state::latest_up_to(&a.output_dir, state.global_step) {
            eprintln!("checkpoint:     {}", c.display());
        }
    }
    Ok(())
}

/// The arguments as the run really used them: the tiny preset's model and data directories in
/// place of the flags it ignores, and the identities of the model, vision tower and training split.
fn recorded_args(a: &TrainArgs, m: &Loaded, data_dir: &Path) -> Result<TrainArgs> {
    let mut r = a.clone();
    if a.preset_tiny() {
        r.model = m.llm_dir.display().to_string();
        r.vision_model = m.vis_dir.display().to_string();
        r.data = data_dir.display().to_string();
    }
    r.sources = Some(serde_json::json!({
        "model_sha256": crate::sha::model_dir_sha256(&m.llm_dir)?,
        "vision_model_sha256": crate::sha::model_dir_sha256(&m.vis_dir)?,
        "train_split_sha256": crate::sha::file_sha256(&split_file(data_dir, "train")?)?,
    }));
    Ok(r)
}

/// One paragraph before the first step: what is trained on what, and how.
fn print_summary(
    a: &TrainArgs,
    m: &Loaded,
    dev: &Device,
    dtype: DType,
    rows: (usize, usize),
    steps: (usize, usize),
    world: usize,
) {
    let ((used, skipped), (total, n_batches)) = (rows, steps);
    let trainable: usize = m.vars.iter().map(|v| v.elem_count()).sum();
    let per_step = world * a.per_device_train_batch_size * a.gradient_accumulation_steps;
    let ranks = if world > 1 { format!("{world} ranks x ") } else { String::new() };
    eprintln!(
        "training on {used} rows ({skipped} skipped): {total} steps of {per_step} rows ({ranks}{} x {} accumulation), {:.2} epochs",
        a.per_device_train_batch_size,
        a.gradient_accumulation_steps,
        (total * a.gradient_accumulation_steps) as f64 / n_batches as f64
    );
    eprintln!(
        "{:.2}M trainable parameters (LoRA r={} alpha={} on {}; projector); device {}, {} compute, {} base, gradient checkpointing {}",
        trainable as f64 / 1e6,
        a.lora.lora_r,
        a.lora.lora_alpha,
        a.lora_target_modules.join(","),
        device::device_name(dev),
        if dtype == DType::BF16 { "bf16" } else { "f32" },
        if a.four_bit() { "NF4" } else { "bf16" },
        if a.gradient_checkpointing { "on" } else { "off" }
    );
}
