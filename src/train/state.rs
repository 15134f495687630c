//! Resumable run checkpoints: `checkpoints/step-N/` holds the adapter (PEFT layout), the projector,
//! the optimizer moments and `trainer_state.json`. Data order and dropout masks derive from the seed
//! and the step, so the step number is the whole position. Written into `step-N.tmp/`, synced,
//! then renamed. The run's arguments ride along, so a resume with other settings is caught.

use crate::model::gemma3::Gemma3Text;
use crate::model::projector::Projector;
use crate::peft::adapter;
use crate::peft::lora::LoraSpec;
use crate::safetensors_out::{save_tensors_atomic, sync_dir, write_atomic};
use crate::train::optimizer::AdamW;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: usize,
    pub total_steps: usize,
    pub seed: u64,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Rows of the training split after skips: the data order depends on it.
    pub train_rows: usize,
    /// Data-parallel ranks (checkpoints of older versions: 1). A resume may change it when the
    /// global micro-batch, ranks x per-device batch, stays the same.
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join("checkpoints").join(format!("step-{step}"))
}

/// The checkpoints in `output_dir/checkpoints` with their steps, newest (highest step) first.
/// Half-written `step-N.tmp/` and set-aside `step-N.unusable/` directories are not checkpoints.
pub fn candidates_with_steps(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let dir = output_dir.join("checkpoints");
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step: usize = name.strip_prefix("step-")?.parse().ok()?;
            e.path().is_dir().then_some((step, e.path()))
        })
        .collect();
    found.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    found
}

/// The checkpoints, newest first.
pub fn candidates(output_dir: &Path) -> Vec<PathBuf> {
    candidates_with_steps(output_dir).into_iter().map(|(_, p)| p).collect()
}

/// The newest checkpoint at or before `step` (the run's own latest, when a resume started from
/// an older one).
pub fn latest_up_to(output_dir: &Path, step: usize) -> Option<PathBuf> {
    candidates_with_steps(output_dir).into_iter().find(|(s, _)| *s <= step).map(|(_, p)| p)
}

/// Deletes all but the newest `keep` checkpoints at or before `step` (the Trainer's
/// `save_total_limit`). Newer ones, left by a resume from an older checkpoint, are not counted:
/// the run rewrites them as it gets there.
pub fn prune(output_dir: &Path, keep: usize, step: usize) -> Result<()> {
    let older = candidates_with_steps(output_dir).into_iter().filter(|(s, _)| *s <= step);
    for (_, old) in older.skip(keep) {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("--save-total-limit: cannot remove {}", old.display()))?;
    }
    Ok(())
}

/// Renames a checkpoint that failed to load to `step-N.unusable`, so no later resume or pruning
/// takes it for one (it stays on disk for a look).
pub fn set_aside(dir: &Path) -> Result<PathBuf> {
    let to = dir.with_extension("unusable");
    if to.exists() {
        std::fs::remove_dir_all(&to).with_context(|| format!("cannot clear {}", to.display()))?;
    }
    std::fs::rename(dir, &to).with_context(|| format!("cannot rename {} to {}", dir.display(), to.display()))?;
    Ok(to)
}

fn to_cpu(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
}

/// Whether every value of every tensor is finite (one device sync). A non-finite sum means a NaN
/// or an infinity somewhere, or values near f32's limit: none of them belong in a checkpoint.
pub fn all_finite<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<bool> {
    let mut sums = vec![];
    for t in tensors {
        sums.push(t.to_dtype(DType::F32)?.sum_all()?.to_device(&Device::Cpu)?);
    }
    if sums.is_empty() {
        return Ok(true);
    }
    Ok(Tensor::stack(&sums, 0)?.to_vec1::<f32>()?.iter().all(|x| x.is_finite()))
}

/// Everything a checkpoint holds besides the model.
pub struct Snapshot<'a> {
    pub opt: &'a AdamW,
    pub names: &'a [String],
    pub state: &'a TrainerState,
    /// The run's arguments (`TrainArgs` as JSON), compared on resume.
    pub args: &'a serde_json::Value,
}

/// Writes `dir` (checkpoints/step-N) durably: everything goes into `step-N.tmp/`, each file and the
/// directory are synced, then it is renamed into place. A failure (a full disk) removes the
/// temporary directory; non-finite weights are never written.
pub fn save(
    dir: &Path,
    llm: &mut Gemma3Text,
    projector: &Projector,
    spec: &LoraSpec,
    base_model: &str,
    snap: &Snapshot,
) -> Result<()> {
    if !all_finite(snap.opt.vars.iter().map(|v| v.as_tensor()))? {
        bail!("step {}: the weights are not finite; no checkpoint written", snap.state.global_step);
    }
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    let written = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        adapter::save(&tmp, llm, spec, base_model)?;
        projector.save(&tmp.join("projector.safetensors"))?;
        let mut moments = HashMap::new();
        for (i, n) in snap.names.iter().enumerate() {
            moments.insert(format!("exp_avg.{n}"), to_cpu(&snap.opt.m[i])?);
            moments.insert(format!("exp_avg_sq.{n}"), to_cpu(&snap.opt.v[i])?);
        }
        save_tensors_atomic(&moments, &tmp.join("optimizer.safetensors"))?;
        let json = serde_json::json!({"trainer": snap.state, "optimizer_step": snap.opt.step, "args": snap.args});
        write_atomic(&tmp.join("trainer_state.json"), (serde_json::to_string_pretty(&json)? + "\n").as_bytes())?;
        sync_dir(&tmp)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    sync_dir(dir.parent().unwrap_or(Path::new(".")))
}

fn set_from(path: &Path, vars: &[(String, Var)], key: impl Fn(&str) -> String) -> Result<()> {
    let dev = vars.first().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
    let map = candle_core::safetensors::load(path, &dev).with_context(|| format!("cannot read {}", path.display()))?;
    for (n, v) in vars {
        let k = key(n);
        let t = map.get(&k).with_context(|| format!("{}: tensor `{k}` is missing", path.display()))?;
        if t.dims() != v.dims() {
            bail!("{}: `{k}` has shape {:?}, the model needs {:?}", path.display(), t.dims(), v.dims());
        }
        v.set(&t.to_dtype(DType::F32)?)?;
    }
    Ok(())
}

/// What a checkpoint says about itself: its trainer state and the arguments of the run that wrote
/// it (None for checkpoints of older versions).
pub struct Loaded {
    pub state: TrainerState,
    pub args: Option<serde_json::Value>,
}

/// Restores adapter, projector and optimizer from a checkpoint after checking it is whole and
/// consistent (every tensor present with the model's shape, finite, the step counts agreeing);
/// every failure names the file at fault.
pub fn load(
    dir: &Path,
    llm: &mut Gemma3Text,
    projector: &Projector,
    opt: &mut AdamW,
    names: &[String],
) -> Result<Loaded> {
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", state_path.display()))?;
    let state: TrainerState = serde_json::from_value(v["trainer"].clone())
        .with_context(|| format!("{}: no trainer state", state_path.display()))?;
    let opt_step =
        v["optimizer_step"].as_u64().with_context(|| format!("{}: no optimizer_step", state_path.display()))?;
    if state.global_step > state.total_steps || opt_step != state.global_step as u64 || state.global_step == 0 {
        bail!(
            "{}: inconsistent state (global_step {}, total_steps {}, optimizer_step {opt_step})",
            state_path.display(),
            state.global_step,
            state.total_steps
        );
    }
    set_from(&dir.join(adapter::WEIGHTS_NAME), &adapter::lora_vars(llm), |n| n.to_string())?;
    set_from(&dir.join("projector.safetensors"), &projector.vars(), |n| n.to_string())?;
    let dev = opt.vars.first().map(|v| v.device().clone()).unwrap_or(Device::Cpu);
    let path = dir.join("optimizer.safetensors");
    let map = candle_core::safetensors::load(&path, &dev).with_context(|| format!("cannot read {}", path.display()))?;
    for (i, n) in names.iter().enumerate() {
        let want = opt.vars[i].dims().to_vec();
        for (slot, prefix) in [(&mut opt.m[i], "exp_avg"), (&mut opt.v[i], "exp_avg_sq")] {
            let k = format!("{prefix}.{n}");
            let t = map.get(&k).with_context(|| format!("{}: tensor `{k}` is missing", path.display()))?;
            if t.dims() != want.as_slice() {
                bail!("{}: `{k}` has shape {:?}, the parameter has {want:?}", path.display(), t.dims());
            }
            *slot = t.to_dtype(DType::F32)?;
        }
    }
    if !all_finite(opt.vars.iter().map(|v| v.as_tensor()).chain(opt.m.iter()).chain(opt.v.iter()))? {
        bail!("{}: holds non-finite weights or moments", dir.display());
    }
    opt.step = opt_step;
    Ok(Loaded { state, args: v.get("args").cloned() })
}
