//! `gemmaclip init --output-dir DIR`: random-weight model directories in the exact layout of the hub repositories
//! (`llm/` like google/gemma-3-4b-it, `vision/` like openai/clip-vit-large-patch14-336), so the
//! same loading code serves tests, GPU benchmarks and real checkpoints.

pub mod plan;
pub mod tokenizer_files;

use crate::config::{ClipVisionConfig, LlmConfig};
use crate::rng;
use crate::safetensors_out::{write_atomic, write_checkpoint, StDtype};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use plan::PlannedTensor;
use rayon::prelude::*;
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use tokenizer_files::TokenLayout;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// A few-layer model with every structural feature of the real pair; f32; seconds on a CPU.
    Tiny,
    /// The real shapes of google/gemma-3-4b-it + openai/clip-vit-large-patch14-336, bf16 (~8.4 GB).
    #[value(name = "gemma-3-4b-it")]
    Gemma3_4bIt,
}

pub struct PresetFiles {
    pub llm_config: &'static str,
    pub vision_config: &'static str,
    pub preprocessor_config: &'static str,
    pub dtype: StDtype,
}

impl Preset {
    pub fn files(self) -> PresetFiles {
        match self {
            Preset::Tiny => PresetFiles {
                llm_config: include_str!("../../configs/tiny-llm/config.json"),
                vision_config: include_str!("../../configs/tiny-vision/config.json"),
                preprocessor_config: include_str!("../../configs/tiny-vision/preprocessor_config.json"),
                dtype: StDtype::F32,
            },
            Preset::Gemma3_4bIt => PresetFiles {
                llm_config: include_str!("../../configs/gemma-3-4b-it/config.json"),
                vision_config: include_str!("../../configs/clip-vit-large-patch14-336/config.json"),
                preprocessor_config: include_str!("../../configs/clip-vit-large-patch14-336/preprocessor_config.json"),
                dtype: StDtype::BF16,
            },
        }
    }

    pub fn llm_config(self) -> Result<LlmConfig> {
        LlmConfig::from_value(&serde_json::from_str(self.files().llm_config)?, "preset llm config")
    }

    pub fn vision_config(self) -> Result<ClipVisionConfig> {
        ClipVisionConfig::from_value(&serde_json::from_str(self.files().vision_config)?, "preset vision config")
    }
}

/// The hub's shard limit (transformers' default `max_shard_size` of 5 GB).
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;
const CHUNK: usize = 1 << 16;

/// Writes one tensor's random values: chunks of 64Ki elements drawn in parallel, each from a
/// stream seeded by (seed, tensor name, chunk), so the bytes do not depend on the thread count.
fn fill_tensor(t: &PlannedTensor, seed: u64, sink: &mut dyn Write, bar: &ProgressBar) -> Result<()> {
    let n = t.entry.numel();
    let base = rng::name_hash(&t.entry.name) ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let per_batch = CHUNK * 256; // bounded memory: 16Mi elements at a time
    for start in (0..n).step_by(per_batch) {
        let len = per_batch.min(n - start);
        let mut vals = vec![0f32; len];
        vals.par_chunks_mut(CHUNK).enumerate().for_each(|(k, chunk)| {
            let chunk_id = (start / CHUNK + k) as u64;
            let mut r = rng::SplitMix64::new(base.wrapping_add(chunk_id.wrapping_mul(0xD1B5_4A32_D192_ED03)));
            r.fill_normal(chunk, t.draw.mean, t.draw.std);
        });
        let bytes: Vec<u8> = match t.entry.dtype {
            StDtype::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            StDtype::BF16 => vals.par_iter().flat_map_iter(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        };
        sink.write_all(&bytes)?;
        bar.inc(bytes.len() as u64);
    }
    Ok(())
}

fn write_weights(dir: &Path, tensors: &[PlannedTensor], seed: u64, bar: &ProgressBar) -> Result<()> {
    let entries: Vec<_> = tensors.iter().map(|t| t.entry.clone()).collect();
    let by_name: std::collections::HashMap<&str, &PlannedTensor> =
        tensors.iter().map(|t| (t.entry.name.as_str(), t)).collect();
    write_checkpoint(dir, &entries, MAX_SHARD_BYTES, |e, sink| fill_tensor(by_name[e.name.as_str()], seed, sink, bar))?;
    Ok(())
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    write_atomic(path, (serde_json::to_string_pretty(v)? + "\n").as_bytes())
}

/// Writes `out/llm` and `out/vision` for a preset. Existing files of the same names are replaced
/// (each through a temporary name); nothing else in `out` is touched.
pub fn init(preset: Preset, out: &Path, seed: u64) -> Result<()> {
    let files = preset.files();
    let llm_cfg = preset.llm_config()?;
    let vis_cfg = preset.vision_config()?;
    if out.exists() && !out.is_dir() {
        bail!("--output-dir {}: exists and is not a directory", out.display());
    }
    let (llm_dir, vis_dir) = (out.join("llm"), out.join("vision"));
    for d in [&llm_dir, &vis_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }

    let llm_tensors = plan::gemma_tensors(&llm_cfg.text, files.dtype);
    let vis_tensors = plan::clip_tensors(&vis_cfg, files.dtype);
    let total: usize = llm_tensors.iter().chain(&vis_tensors).map(|t| t.entry.bytes()).sum();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    if total < 64 << 20 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }

    write_atomic(&llm_dir.join("config.json"), files.llm_config.as_bytes())?;
    let layout =
        TokenLayout { boi: llm_cfg.boi_token_index, eoi: llm_cfg.eoi_token_index, image: llm_cfg.image_token_index };
    write_json(&llm_dir.join("tokenizer.json"), &tokenizer_files::tokenizer_json(&layout))?;
    write_json(&llm_dir.join("tokenizer_config.json"), &tokenizer_files::tokenizer_config_json(&layout))?;
    write_json(&llm_dir.join("special_tokens_map.json"), &tokenizer_files::special_tokens_map_json())?;
    write_json(&llm_dir.join("generation_config.json"), &tokenizer_files::generation_config_json())?;
    write_atomic(&vis_dir.join("config.json"), files.vision_config.as_bytes())?;
    write_atomic(&vis_dir.join("preprocessor_config.json"), files.preprocessor_config.as_bytes())?;

    bar.set_message("llm");
    write_weights(&llm_dir, &llm_tensors, seed, &bar)?;
    bar.set_message("vision");
    write_weights(&vis_dir, &vis_tensors, seed ^ 0x5649_5349_4f4e, &bar)?;
    bar.finish_and_clear();
    Ok(())
}
