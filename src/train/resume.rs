//! Where a run starts: a fresh run's claim on its output directory (never over an earlier run
//! unless told), or the checkpoint a resume continues from and the checks that it belongs to this
//! run (same model, data, schedule and global batch).

use crate::model::gemma3::Gemma3Text;
use crate::model::projector::Projector;
use crate::train::args::TrainArgs;
use crate::train::optimizer::AdamW;
use crate::train::state::{self, TrainerState};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// What a run directory holds that a fresh run would overwrite.
pub(super) const RUN_FILES: [&str; 8] = [
    "args.json",
    "metrics.jsonl",
    "steps.jsonl",
    "checkpoints",
    "lora_adapter",
    "projector.safetensors",
    "tokenizer",
    "loss_curve.png",
];

/// A fresh run never writes over an earlier one unless told to: the files `claim_output_dir`
/// would delete, checked before anything is loaded.
pub(super) fn check_output_dir(a: &TrainArgs) -> Result<()> {
    let dir = &a.output_dir;
    let present: Vec<&str> = RUN_FILES.iter().copied().filter(|f| dir.join(f).exists()).collect();
    if present.is_empty() || a.overwrite_output_dir {
        return Ok(());
    }
    let resumable = !state::candidates(dir).is_empty();
    if resumable {
        bail!(
            "--output-dir {} holds a run ({}): continue it with --resume, or start over with --overwrite-output-dir",
            dir.display(),
            present.join(", ")
        );
    }
    bail!(
        "--output-dir {} holds an earlier run that saved no checkpoint ({}), so there is nothing to resume: start over with --overwrite-output-dir, or use another directory",
        dir.display(),
        present.join(", ")
    )
}

/// With --overwrite-output-dir, deletes the earlier run's files; called once the new run has
/// loaded, so a typo in a flag never costs the old run.
pub(super) fn claim_output_dir(a: &TrainArgs) -> Result<()> {
    if !a.overwrite_output_dir {
        return Ok(());
    }
    for f in RUN_FILES {
        let p = a.output_dir.join(f);
        if !p.exists() {
            continue;
        }
        let removed = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        removed.with_context(|| format!("--overwrite-output-dir: cannot remove {}", p.display()))?;
    }
    Ok(())
}

/// Restores the checkpoint `--resume` names, or else the newest one in the output directory that
/// loads and validates (saying which were passed over and why). Returns its directory and contents.
pub(super) fn restore(
    a: &TrainArgs,
    which: &Option<PathBuf>,
    (llm, projector, names): (&mut Gemma3Text, &Projector, &[String]),
    opt: &mut AdamW,
) -> Result<(PathBuf, state::Loaded)> {
    if let Some(dir) = which {
        let loaded =
            state::load(dir, llm, projector, opt, names).with_context(|| format!("--resume {}", dir.display()))?;
        return Ok((dir.clone(), loaded));
    }
    let candidates = state::candidates(&a.output_dir);
    if candidates.is_empty() {
        bail!("--resume: no checkpoint in {}", a.output_dir.join("checkpoints").display());
    }
    let mut unusable = vec![];
    for dir in &candidates {
        match state::load(dir, llm, projector, opt, names) {
            Ok(loaded) => {
                // set aside what was passed over, so neither pruning nor a later resume counts it
                for bad in unusable {
                    let to = state::set_aside(bad)?;
                    eprintln!("warning: set aside as {}", to.display());
                }
                return Ok((dir.clone(), loaded));
            }
            Err(e) => {
                let why: Vec<String> = e.chain().map(|c| c.to_string()).collect();
                eprintln!("warning: skipping checkpoint {}: {}", dir.display(), why.join(": "));
                unusable.push(dir);
            }
        }
    }
    bail!(
        "--resume: none of the {} checkpoints in {} is usable (see the warnings above)",
        candidates.len(),
        a.output_dir.join("checkpoints").display()
    )
}

/// The checkpoint must come from a run with the same model, data and schedule settings.
pub(super) fn check_resume_settings(
    a: &TrainArgs,
    dir: &Path,
    saved_args: Option<serde_json::Value>,
    saved: &TrainerState,
    now: &TrainerState,
) -> Result<()> {
    let saved_args: Option<TrainArgs> = match saved_args {
        Some(v) => Some(serde_json::from_value(v).with_context(|| {
            format!("{}: the saved arguments are unreadable", dir.join("trainer_state.json").display())
        })?),
        // Checkpoints of older versions carry no arguments; the run's args.json stands in when
        // it is of this version's shape (the trainer state below is checked either way).
        None => {
            let path = a.output_dir.join("args.json");
            let parsed = std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok());
            if parsed.is_none() {
                eprintln!("warning: {} carries no arguments to compare with this run's", dir.display());
            }
            parsed
        }
    };
    if let Some(saved_args) = saved_args {
        // the length of the run is judged by the steps it comes to, below
        let diff = a.resume_conflicts(&saved_args)?;
        if !diff.is_empty() {
            bail!(
                "--resume {}: the run was started with other settings ({}); resume with the same ones (only {} may change) or start a new run",
                dir.display(),
                diff.join(", "),
                crate::train::args::RESUMABLE_CHANGES.iter().map(|f| format!("--{}", f.replace('_', "-"))).collect::<Vec<_>>().join(", ")
            );
        }
    }
    if saved.train_rows != now.train_rows {
        bail!("--resume {}: the checkpoint was trained on {} usable rows, the data now gives {}; the data order would differ", dir.display(), saved.train_rows, now.train_rows);
    }
    if saved.total_steps != now.total_steps {
        bail!(
            "--resume {}: the run was planned for {} steps and these settings give {}; a run cannot be lengthened or shortened, because its learning-rate schedule ({}, warmup ratio {}) is laid out over the planned steps and would change under the steps already taken; resume with the original --num-train-epochs/--max-steps, or start a new run",
            dir.display(),
            saved.total_steps,
            now.total_steps,
            format!("{:?}", a.lr_scheduler_type).to_lowercase(),
            a.warmup_ratio
        );
    }
    let (was, is) =
        (saved.world_size * saved.per_device_train_batch_size, now.world_size * now.per_device_train_batch_size);
    if was != is {
        bail!(
            "--resume {}: the run read micro-batches of {was} rows ({} rank(s) x {} per device); this run has {is} ({} x {}); the data order and the batches would differ; resume with ranks x --per-device-train-batch-size = {was}",
            dir.display(),
            saved.world_size,
            saved.per_device_train_batch_size,
            now.world_size,
            now.per_device_train_batch_size
        );
    }
    // the global micro-batch decides the data order, not how the ranks share it
    let same = TrainerState {
        global_step: saved.global_step,
        world_size: saved.world_size,
        per_device_train_batch_size: saved.per_device_train_batch_size,
        ..now.clone()
    };
    if *saved != same {
        bail!("--resume {}: saved with other batch settings (batch {} x {} accumulation, seed {}); this run has {} x {}, seed {}", dir.display(),
            saved.per_device_train_batch_size, saved.gradient_accumulation_steps, saved.seed,
            now.per_device_train_batch_size, now.gradient_accumulation_steps, now.seed);
    }
    Ok(())
}
