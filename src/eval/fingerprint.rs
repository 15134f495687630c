//! What produced an eval directory's answers: the model sources (adapter and projector by the
//! SHA-256 of their files), the generation settings and the split. Kept in `eval.json` beside
//! `predictions.jsonl`; a resume with anything else would mix answers of two models.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;

pub use crate::sha::file_sha256;

/// The sources of an answering model, as eval records them.
pub struct Sources<'a> {
    /// The base model: the hub id or directory given, or "tiny" for the preset.
    pub model: &'a str,
    pub vision_model: &'a str,
    pub four_bit: bool,
    pub image_aspect: String,
    pub adapter_dir: Option<&'a Path>,
    pub projector_path: Option<&'a Path>,
}

impl Sources<'_> {
    pub fn to_json(&self) -> Result<Value> {
        let adapter = match self.adapter_dir {
            Some(d) => json!({
                "config_sha256": file_sha256(&d.join(crate::peft::adapter::CONFIG_NAME))?,
                "weights_sha256": file_sha256(&d.join(crate::peft::adapter::WEIGHTS_NAME))?,
            }),
            None => Value::Null,
        };
        let projector = match self.projector_path {
            Some(p) => json!(file_sha256(p)?),
            None => Value::Null,
        };
        Ok(json!({
            "model": self.model,
            "vision_model": self.vision_model,
            "four_bit": self.four_bit,
            "image_aspect": self.image_aspect,
            "adapter": adapter,
            "projector_sha256": projector,
        }))
    }
}

/// A short id of a fingerprint, carried by every prediction line.
pub fn short_id(fingerprint: &Value) -> String {
    let h = Sha256::digest(fingerprint.to_string().as_bytes());
    format!("{:x}", h)[..16].to_string()
}

/// The keys (dotted paths) whose values differ between two fingerprints.
pub fn differences(saved: &Value, now: &Value) -> Vec<String> {
    fn walk(prefix: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&p, x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), out);
                }
            }
            _ if a != b => out.push(format!("{prefix}: {a} -> {b}")),
            _ => {}
        }
    }
    let mut out = vec![];
    walk("", saved, now, &mut out);
    out
}

/// The manifest of an eval directory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub fingerprint: Value,
    /// Seconds spent answering, over every invocation that added answers.
    pub seconds: f64,
}

/// Checks that `dir` may take answers produced under `fingerprint`; returns the seconds already
/// spent there. With `start_over`, earlier answers are deleted instead.
pub fn claim(dir: &Path, fingerprint: &Value, start_over: bool) -> Result<f64> {
    let manifest = dir.join("eval.json");
    let predictions = dir.join("predictions.jsonl");
    if start_over {
        let mut old = vec![manifest.clone(), predictions.clone(), dir.join("results.json"), dir.join("breakdown.txt")];
        old.extend(crate::eval::rank_files(dir));
        for p in &old {
            if p.exists() {
                std::fs::remove_file(p).with_context(|| format!("cannot remove {}", p.display()))?;
            }
        }
        return Ok(0.0);
    }
    if !manifest.exists() {
        if predictions.exists() {
            bail!(
                "{} holds answers of unknown origin (no eval.json beside it); start over with --overwrite-output-dir or use another --output-dir",
                predictions.display()
            );
        }
        return Ok(0.0);
    }
    let text = std::fs::read_to_string(&manifest).with_context(|| format!("cannot read {}", manifest.display()))?;
    let saved: Manifest =
        serde_json::from_str(&text).with_context(|| format!("{}: not an eval manifest", manifest.display()))?;
    if saved.fingerprint["split"] != fingerprint["split"] {
        bail!(
            "--output-dir {} holds answers for the {} split; use another directory for {}",
            dir.display(),
            saved.fingerprint["split"],
            fingerprint["split"]
        );
    }
    let diff = differences(&saved.fingerprint, fingerprint);
    if !diff.is_empty() {
        bail!(
            "--output-dir {} holds answers from another model or other settings ({}); resume with the same ones, or start over with --overwrite-output-dir",
            dir.display(),
            diff.join(", ")
        );
    }
    Ok(saved.seconds)
}

pub fn save(dir: &Path, m: &Manifest) -> Result<()> {
    crate::safetensors_out::write_atomic(&dir.join("eval.json"), (serde_json::to_string_pretty(m)? + "\n").as_bytes())
}
