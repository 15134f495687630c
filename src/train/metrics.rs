//! The run's metrics log (`metrics.jsonl`, one JSON object per logged step).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub samples_per_s: f64,
    pub tokens_per_s: f64,
    /// Peak device memory of the logging window (GPU only).
    pub peak_memory_gib: Option<f64>,
}

pub fn append(path: &Path, r: &Record) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(r)?).with_context(|| format!("cannot write {}", path.display()))
}

pub fn read(path: &Path) -> Result<Vec<Record>> {
    if !path.exists() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{} line {}: bad record", path.display(), i + 1)))
        .collect()
}

/// Keeps only records up to `step` (a resumed run rewrites what came after its checkpoint).
pub fn truncate_after(path: &Path, step: usize) -> Result<()> {
    let kept: Vec<Record> = read(path)?.into_iter().filter(|r| r.step <= step).collect();
    let mut text = String::new();
    for r in &kept {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    crate::safetensors_out::write_atomic(path, text.as_bytes())
}
