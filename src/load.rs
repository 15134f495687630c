//! Loading the models: the frozen base (Gemma text model and CLIP tower, from directories or hub
//! ids), the tokenizer, and an `Answerer` (base + adapter + projector) for `infer` and `eval`.

use crate::config::{ClipVisionConfig, LlmConfig};
use crate::data::image::{Aspect, ImageProcessor};
use crate::device;
use crate::hub;
use crate::model::clip::ClipVision;
use crate::model::gemma3::{BaseFormat, Gemma3Text};
use crate::model::projector::Projector;
use crate::model::vlm::Vlm;
use crate::peft::adapter::Adapter;
use crate::weights::Weights;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
/// Where the base models come from (the same flags as `train`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelArgs {
    pub preset_tiny: bool,
    pub model: String,
    pub vision_model: String,
    pub four_bit: bool,
}

/// The frozen base: Gemma text model and CLIP tower, with their configs and directories.
pub struct Base {
    pub llm: Gemma3Text,
    pub vision: ClipVision,
    pub cfg: LlmConfig,
    pub vcfg: ClipVisionConfig,
    pub llm_dir: PathBuf,
    pub vis_dir: PathBuf,
}

pub fn load_base(m: &ModelArgs, dtype: DType, dev: &Device) -> Result<Base> {
    let (llm_dir, vis_dir) = if m.preset_tiny {
        hub::tiny_model()?
    } else {
        (hub::resolve_model(&m.model, "--model")?, hub::resolve_model(&m.vision_model, "--vision-model")?)
    };
    let cfg = LlmConfig::from_file(&llm_dir.join("config.json"))?;
    let vcfg = ClipVisionConfig::from_file(&vis_dir.join("config.json"))?;
    let format = if m.four_bit { BaseFormat::Nf4 } else { BaseFormat::Dense };
    let llm = Gemma3Text::load(Weights::open(&llm_dir, dtype, dev)?, &cfg.text, format)?;
    let vision = ClipVision::load(Weights::open(&vis_dir, dtype, dev)?, &vcfg)?;
    Ok(Base { llm, vision, cfg, vcfg, llm_dir, vis_dir })
}

pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("{}: cannot load the tokenizer: {e}", path.display()))
}

/// A model ready to answer.
pub struct Answerer {
    pub vlm: Vlm,
    pub tokenizer: tokenizers::Tokenizer,
    pub images: ImageProcessor,
    /// False when no projector was given: image questions are refused.
    pub has_projector: bool,
}

/// A file or directory and the flag that named it, for messages (`--run-dir R` when a run
/// directory supplied it).
#[derive(Debug, Clone)]
pub struct Named {
    pub path: PathBuf,
    pub flag: &'static str,
}

impl Named {
    fn label(&self) -> String {
        format!("{} {}", self.flag, self.path.display())
    }
}

pub struct AnswererArgs {
    pub model: ModelArgs,
    /// A PEFT adapter directory; without it, the base model answers.
    pub adapter_dir: Option<Named>,
    /// `projector.safetensors`; without it, image questions are refused.
    pub projector_path: Option<Named>,
    /// A directory with tokenizer.json; defaults to the model's.
    pub tokenizer_dir: Option<Named>,
    pub image_aspect: Aspect,
}

/// A directory given where a file or another directory was meant: a train output directory
/// passed as the adapter, projector or tokenizer says which path inside it was meant.
fn check_not_run_dir(n: &Named, inside: &str, must_hold: Option<&str>) -> Result<()> {
    let is_run = n.path.join("lora_adapter").is_dir() || n.path.join("checkpoints").is_dir();
    let lacks = match must_hold {
        Some(f) => !n.path.join(f).exists(),
        None => n.path.is_dir(),
    };
    if is_run && lacks {
        bail!(
            "{}: a train output directory; did you mean {} (or --run-dir {})?",
            n.label(),
            n.path.join(inside).display(),
            n.path.display()
        );
    }
    Ok(())
}

pub fn load_answerer(a: &AnswererArgs) -> Result<Answerer> {
    let dev = device::best_device()?;
    let dtype = device::default_dtype(&dev);
    if let Some(n) = &a.adapter_dir {
        check_not_run_dir(n, "lora_adapter", Some(crate::peft::adapter::CONFIG_NAME))?;
    }
    if let Some(n) = &a.projector_path {
        check_not_run_dir(n, "projector.safetensors", None)?;
    }
    if let Some(n) = &a.tokenizer_dir {
        check_not_run_dir(n, "tokenizer", Some("tokenizer.json"))?;
    }
    let mut base = load_base(&a.model, dtype, &dev)?;
    if let Some(n) = &a.adapter_dir {
        let (adapter, scale) = Adapter::load(&n.path, &dev).with_context(|| n.label())?;
        adapter.attach(&mut base.llm, scale).with_context(|| n.label())?;
        base.llm.freeze_adapters(dtype)?;
    }
    let (projector, has_projector) = match &a.projector_path {
        Some(n) => {
            let w = Weights::open_file(&n.path, DType::F32, &dev).with_context(|| n.label())?;
            let p = Projector::load(&w, base.vcfg.hidden_size, base.cfg.text.hidden_size).with_context(|| n.label())?;
            (p, true)
        }
        // Never applied: image questions are refused without a projector.
        None => (Projector::init(base.vcfg.hidden_size, base.cfg.text.hidden_size, 0, &dev)?, false),
    };
    let tokenizer = match &a.tokenizer_dir {
        Some(n) => load_tokenizer(&n.path).with_context(|| n.flag)?,
        None => load_tokenizer(&base.llm_dir)?,
    };
    let images = ImageProcessor::from_dir(&base.vis_dir, base.vcfg.image_size, a.image_aspect)?;
    Ok(Answerer {
        vlm: Vlm { vision: base.vision, projector, llm: base.llm, cfg: base.cfg },
        tokenizer,
        images,
        has_projector,
    })
}

/// What a train output directory, or one of its checkpoints (`DIR/checkpoints/step-N`), gives
/// `infer` and `eval`.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub adapter_dir: PathBuf,
    pub projector_path: Option<PathBuf>,
    pub tokenizer_dir: Option<PathBuf>,
    /// The run's arguments (`TrainArgs` as JSON: args.json, or the checkpoint's saved ones);
    /// Null when there are none.
    pub args: serde_json::Value,
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

impl RunDir {
    /// Reads `dir` (`flag` names it in messages): a run directory holds `lora_adapter/`,
    /// `projector.safetensors` and `tokenizer/`; a checkpoint holds the adapter files and the
    /// projector directly, and the run directory two levels up holds the tokenizer.
    pub fn open(dir: &Path, flag: &str) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{flag} {}: no such directory", dir.display());
        }
        let file = |d: &Path, name: &str| Some(d.join(name)).filter(|p| p.exists());
        if dir.join(crate::peft::adapter::CONFIG_NAME).is_file() {
            let root =
                dir.parent().filter(|p| p.file_name().is_some_and(|n| n == "checkpoints")).and_then(Path::parent);
            let saved = read_json(&dir.join("trainer_state.json")).map(|v| v["args"].clone());
            let args = match saved {
                Some(v) if !v.is_null() => v,
                _ => root.and_then(|r| read_json(&r.join("args.json"))).unwrap_or_default(),
            };
            return Ok(RunDir {
                adapter_dir: dir.to_path_buf(),
                projector_path: file(dir, "projector.safetensors"),
                tokenizer_dir: root.and_then(|r| file(r, "tokenizer")),
                args,
            });
        }
        if dir.join("lora_adapter").is_dir() {
            return Ok(RunDir {
                adapter_dir: dir.join("lora_adapter"),
                projector_path: file(dir, "projector.safetensors"),
                tokenizer_dir: file(dir, "tokenizer"),
                args: read_json(&dir.join("args.json")).unwrap_or_default(),
            });
        }
        if let Some(latest) = crate::train::state::candidates(dir).first() {
            bail!(
                "{flag} {}: the run has not finished (no lora_adapter/); pass one of its checkpoints, e.g. {flag} {}",
                dir.display(),
                latest.display()
            );
        }
        bail!(
            "{flag} {}: neither a train output directory (lora_adapter/) nor one of its checkpoints ({})",
            dir.display(),
            crate::peft::adapter::CONFIG_NAME
        )
    }

    /// A string the run was trained with (`preset`, `model`, `vision_model`, `data`, `image_aspect`).
    pub fn arg(&self, key: &str) -> Option<String> {
        self.args.get(key).and_then(|v| v.as_str()).map(String::from)
    }

    /// A boolean setting of the run (false when absent).
    pub fn flag(&self, key: &str) -> bool {
        self.args.get(key).and_then(|v| v.as_bool()).unwrap_or(false)
    }
}

impl Answerer {
    pub fn image_tokens(&self) -> usize {
        self.vlm.vision.cfg.num_patches()
    }

    pub fn stop_ids(&self) -> Vec<u32> {
        let mut s = self.vlm.cfg.eos_token_ids.clone();
        for t in ["<end_of_turn>", "<eos>"] {
            if let Some(id) = self.tokenizer.token_to_id(t) {
                if !s.contains(&id) {
                    s.push(id);
                }
            }
        }
        s
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?.get_ids().to_vec())
    }

    /// Whether decoding `id` ends a run of byte-fallback pieces (`<0x41>`): such a run decodes as
    /// one group, also across special or unknown ids (which decoding skips), so only an ordinary
    /// text piece closes it.
    pub fn closes_byte_run(&self, id: u32) -> bool {
        self.tokenizer.id_to_token(id).is_some_and(|p| {
            let byte = p.len() == 6 && p.starts_with("<0x") && p.ends_with('>');
            !byte && !self.tokenizer.get_added_vocabulary().is_special_token(&p)
        })
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    pub fn pixels(&self, images: &[Vec<f32>]) -> Result<Option<Tensor>> {
        if images.is_empty() {
            return Ok(None);
        }
        if !self.has_projector {
            bail!("an image question needs the trained projector: pass --run-dir (a train output directory) or --projector-path");
        }
        let s = self.images.size;
        let flat: Vec<f32> = images.iter().flatten().copied().collect();
        Ok(Some(Tensor::from_vec(flat, (images.len(), 3, s, s), self.vlm.llm.device())?))
    }
}
