//! Resumable run checkpoints: `checkpoints/step-N/` holds the adapter (PEFT layout), the projector,
//! the optimizer moments and `trainer_state.json`. Data order and dropout masks derive from the seed
//! and the step, so the step number is the whole position. Written into `step-N.tmp/`, then renamed.

use crate::model::gemma3::Gemma3Text;
use crate::model::projector::Projector;
use crate::peft::adapter;
use crate::peft::lora::LoraSpec;
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
}

pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join("checkpoints").join(format!("step-{step}"))
}

/// The checkpoint with the highest step in `output_dir/checkpoints`, if any.
pub fn latest(output_dir: &Path) -> Option<PathBuf> {
    let dir = output_dir.join("checkpoints");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step: usize = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join("trainer_state.json").is_file().then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
        .map(|(_, p)| p)
}

fn save_tensors(path: &Path, map: &HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(map, path).with_context(|| format!("cannot write {}", path.display()))
}

fn to_cpu(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
}

#[allow(clippy::too_many_arguments)]
pub fn save(
    dir: &Path,
    llm: &mut Gemma3Text,
    projector: &Projector,
    spec: &LoraSpec,
    base_model: &str,
    opt: &AdamW,
    names: &[String],
    state: &TrainerState,
) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    adapter::save(&tmp, llm, spec, base_model)?;
    projector.save(&tmp.join("projector.safetensors"))?;
    let mut moments = HashMap::new();
    for (i, n) in names.iter().enumerate() {
        moments.insert(format!("exp_avg.{n}"), to_cpu(&opt.m[i])?);
        moments.insert(format!("exp_avg_sq.{n}"), to_cpu(&opt.v[i])?);
    }
    save_tensors(&tmp.join("optimizer.safetensors"), &moments)?;
    let json = serde_json::json!({"trainer": state, "optimizer_step": opt.step});
    std::fs::write(tmp.join("trainer_state.json"), serde_json::to_string_pretty(&json)? + "\n")?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))
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

/// Restores adapter, projector and optimizer from a checkpoint; returns its trainer state.
pub fn load(
    dir: &Path,
    llm: &mut Gemma3Text,
    projector: &Projector,
    opt: &mut AdamW,
    names: &[String],
) -> Result<TrainerState> {
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", state_path.display()))?;
    let state: TrainerState = serde_json::from_value(v["trainer"].clone())
        .with_context(|| format!("{}: no trainer state", state_path.display()))?;
    set_from(&dir.join(adapter::WEIGHTS_NAME), &adapter::lora_vars(llm), |n| n.to_string())?;
    set_from(&dir.join("projector.safetensors"), &projector.vars(), |n| n.to_string())?;
    let dev = opt.vars.first().map(|v| v.device().clone()).unwrap_or(Device::Cpu);
    let path = dir.join("optimizer.safetensors");
    let map = candle_core::safetensors::load(&path, &dev).with_context(|| format!("cannot read {}", path.display()))?;
    for (i, n) in names.iter().enumerate() {
        for (slot, prefix) in [(&mut opt.m[i], "exp_avg"), (&mut opt.v[i], "exp_avg_sq")] {
            let k = format!("{prefix}.{n}");
            *slot = map.get(&k).with_context(|| format!("{}: tensor `{k}` is missing", path.display()))?.clone();
        }
    }
    opt.step = v["optimizer_step"].as_u64().with_context(|| format!("{}: no optimizer_step", state_path.display()))?;
    Ok(state)
}
