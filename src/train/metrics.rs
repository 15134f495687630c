//! The run's metrics log (`metrics.jsonl`, one JSON object per logged step).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub step: usize,
    pub epoch: f64,
    // JSON has no NaN: serde_json writes a non-finite number as null, which reads back as NaN.
    #[serde(deserialize_with = "number_or_null")]
    pub loss: f64,
    #[serde(deserialize_with = "number_or_null")]
    pub lr: f64,
    #[serde(deserialize_with = "number_or_null")]
    pub grad_norm: f64,
    #[serde(deserialize_with = "number_or_null")]
    pub samples_per_s: f64,
    #[serde(deserialize_with = "number_or_null")]
    pub tokens_per_s: f64,
    /// Peak device memory of the logging window (GPU only).
    pub peak_memory_gib: Option<f64>,
}

fn number_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
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
    let lines: Vec<(usize, &str)> = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
    let mut out = vec![];
    for (k, (i, l)) in lines.iter().enumerate() {
        match serde_json::from_str(l) {
            Ok(r) => out.push(r),
            // the file is appended to: a crash mid-write leaves a torn last line, which is dropped
            Err(_) if k + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => bail!("{} line {}: bad record: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// Keeps only records up to `step` (a resumed run rewrites what came after its checkpoint).
pub fn truncate_after(path: &Path, step: usize) -> Result<()> {
    read(path)?; // the same checks as reading (a torn last line is dropped below)
    let text = if path.exists() {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
    } else {
        String::new()
    };
    // the kept lines as they were written: parsing and printing again could move a float by an ulp
    let mut kept = String::new();
    for line in text.lines() {
        if serde_json::from_str::<Record>(line).is_ok_and(|r| r.step <= step) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    crate::safetensors_out::write_atomic(path, kept.as_bytes())
}
