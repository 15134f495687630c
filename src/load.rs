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

pub struct AnswererArgs<'a> {
    pub model: &'a ModelArgs,
    pub adapter_dir: Option<&'a Path>,
    pub projector_path: Option<&'a Path>,
    pub tokenizer_dir: Option<&'a Path>,
    pub image_aspect: Aspect,
}

pub fn load_answerer(a: &AnswererArgs) -> Result<Answerer> {
    let dev = device::best_device()?;
    let dtype = device::default_dtype(&dev);
    let mut base = load_base(a.model, dtype, &dev)?;
    if let Some(dir) = a.adapter_dir {
        let (adapter, scale) = Adapter::load(dir, &dev)?;
        adapter.attach(&mut base.llm, scale).with_context(|| format!("--adapter-dir {}", dir.display()))?;
        base.llm.freeze_adapters();
    }
    let (projector, has_projector) = match a.projector_path {
        Some(p) => {
            let w =
                Weights::open_file(p, DType::F32, &dev).with_context(|| format!("--projector-path {}", p.display()))?;
            (Projector::load(&w, base.vcfg.hidden_size, base.cfg.text.hidden_size)?, true)
        }
        // Never applied: image questions are refused without a projector.
        None => (Projector::init(base.vcfg.hidden_size, base.cfg.text.hidden_size, 0, &dev)?, false),
    };
    let tokenizer = load_tokenizer(a.tokenizer_dir.unwrap_or(&base.llm_dir))?;
    let images = ImageProcessor::from_dir(&base.vis_dir, base.vcfg.image_size, a.image_aspect)?;
    Ok(Answerer {
        vlm: Vlm { vision: base.vision, projector, llm: base.llm, cfg: base.cfg },
        tokenizer,
        images,
        has_projector,
    })
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
            bail!("an image question needs the trained projector: pass --projector-path");
        }
        let s = self.images.size;
        let flat: Vec<f32> = images.iter().flatten().copied().collect();
        Ok(Some(Tensor::from_vec(flat, (images.len(), 3, s, s), self.vlm.llm.device())?))
    }
}
