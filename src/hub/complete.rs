//! Whether a cached snapshot holds what gemmaclip's loaders read. A download can stop between any
//! two files, so completeness is judged from the files each kind of repository needs, never from
//! the mere presence of some weights.

use crate::weights::missing_weights;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// Gemma 3 (`model_type` "gemma3" or "gemma3_text"): weights and the tokenizer.
    Gemma,
    /// CLIP (`model_type` "clip" or "clip_vision_model"): weights and the image preprocessing.
    Clip,
    Other,
}

/// The kind `config.json` declares; `None` while there is no readable config.
pub fn model_kind(snap: &Path) -> Option<ModelKind> {
    let text = std::fs::read_to_string(snap.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(match v.get("model_type").and_then(|t| t.as_str()).unwrap_or("") {
        "gemma3" | "gemma3_text" => ModelKind::Gemma,
        "clip" | "clip_vision_model" => ModelKind::Clip,
        _ => ModelKind::Other,
    })
}

/// The files a model of this kind needs besides config.json and the weights.
pub fn needed_files(kind: ModelKind) -> &'static [&'static str] {
    match kind {
        ModelKind::Gemma => &["tokenizer.json"],
        // without it the image processor would fall back to built-in values without a word
        ModelKind::Clip => &["preprocessor_config.json"],
        ModelKind::Other => &[],
    }
}

/// What a model snapshot lacks (empty when complete), in words for a message.
pub fn missing_model_files(snap: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    match model_kind(snap) {
        None if snap.join("config.json").is_file() => missing.push("a readable config.json".to_string()),
        None => missing.push("config.json".to_string()),
        Some(kind) => {
            let absent = needed_files(kind).iter().filter(|f| !snap.join(f).is_file());
            missing.extend(absent.map(|f| f.to_string()));
        }
    }
    missing.extend(missing_weights(snap));
    missing
}

/// What a ScienceQA dataset snapshot lacks: a parquet file for each split.
pub fn missing_dataset_files(snap: &Path) -> Vec<String> {
    ["train", "validation", "test"]
        .iter()
        .filter(|s| crate::data::scienceqa::split_file(snap, s).is_err())
        .map(|s| format!("the {s} split (data/{s}-*.parquet)"))
        .collect()
}
