//! Shared by the integration tests: the tiny checkpoint (written once per test binary by the same
//! code as `gemmaclip init --preset tiny --seed 0`) and the reference fixtures.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use gemmaclip::init::{init, Preset};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub fn tiny_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().expect("tempdir");
        init(Preset::Tiny, d.path(), 0).expect("init tiny");
        d
    })
    .path()
}

pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub struct Fixture {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

impl Fixture {
    pub fn load(name: &str) -> Self {
        let path = fixture_path(name);
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture");
        let bytes = std::fs::read(&path).expect("fixture bytes");
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("fixture header");
        let metadata = meta.metadata().clone().unwrap_or_default();
        Self { tensors, metadata }
    }

    pub fn get(&self, k: &str) -> &Tensor {
        self.tensors.get(k).unwrap_or_else(|| panic!("fixture has no tensor {k}"))
    }

    /// An integer tensor as rows of i64.
    pub fn rows_i64(&self, k: &str) -> Vec<Vec<i64>> {
        self.get(k).to_dtype(candle_core::DType::I64).unwrap().to_vec2::<i64>().unwrap()
    }
}

/// max |a - b| over all elements (both converted to f32).
/// The largest |value| of a tensor, as f32 (the scale relative errors are measured against).
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(candle_core::DType::F32).unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

pub mod forward {
    //! The parity computations, on any device, so the CPU and GPU tests run the same code.
    use super::{tiny_dir, Fixture};
    use candle_core::{DType, Device, Tensor};
    use gemmaclip::config::{ClipVisionConfig, LlmConfig};
    use gemmaclip::model::clip::ClipVision;
    use gemmaclip::model::gemma3::{BaseFormat, Gemma3Text};
    use gemmaclip::model::projector::Projector;
    use gemmaclip::model::vlm::{Supervised, Vlm};
    use gemmaclip::weights::Weights;

    pub fn llm_cfg() -> LlmConfig {
        LlmConfig::from_file(&tiny_dir().join("llm/config.json")).unwrap()
    }

    pub fn gemma(dev: &Device) -> Gemma3Text {
        let w = Weights::open(&tiny_dir().join("llm"), DType::F32, dev).unwrap();
        Gemma3Text::load(w, &llm_cfg().text, BaseFormat::Dense).unwrap()
    }

    pub fn clip(dev: &Device) -> ClipVision {
        let dir = tiny_dir().join("vision");
        let cfg = ClipVisionConfig::from_file(&dir.join("config.json")).unwrap();
        ClipVision::load(Weights::open(&dir, DType::F32, dev).unwrap(), &cfg).unwrap()
    }

    fn ids_tensor(rows: &[Vec<i64>], dev: &Device) -> Tensor {
        let flat: Vec<u32> = rows.iter().flatten().map(|&x| x as u32).collect();
        Tensor::from_vec(flat, (rows.len(), rows[0].len()), dev).unwrap()
    }

    fn valid(f: &Fixture, key: &str) -> Vec<Vec<bool>> {
        f.rows_i64(key).iter().map(|r| r.iter().map(|&m| m == 1).collect()).collect()
    }

    fn all_logits(llm: &Gemma3Text, hidden: &Tensor) -> Tensor {
        let (b, l, h) = hidden.dims3().unwrap();
        llm.logits(&hidden.reshape((b * l, h)).unwrap()).unwrap().reshape((b, l, ())).unwrap()
    }

    /// Logits [L, V] of the long text prompt.
    pub fn text_logits(f: &Fixture, dev: &Device) -> Tensor {
        let llm = gemma(dev);
        let ids = ids_tensor(&f.rows_i64("text.input_ids"), dev);
        let hidden = llm.forward_embeds(&llm.embed(&ids).unwrap(), None).unwrap();
        all_logits(&llm, &hidden).squeeze(0).unwrap()
    }

    /// Logits of the padded batch, each row cut to its valid length.
    pub fn batch_logits(f: &Fixture, dev: &Device) -> Vec<Tensor> {
        let llm = gemma(dev);
        let valid = valid(f, "batch.attention_mask");
        let ids = ids_tensor(&f.rows_i64("batch.input_ids"), dev);
        let hidden = llm.forward_embeds(&llm.embed(&ids).unwrap(), Some(&valid)).unwrap();
        let logits = all_logits(&llm, &hidden);
        valid
            .iter()
            .enumerate()
            .map(|(b, row)| logits.get(b).unwrap().narrow(0, 0, row.iter().filter(|&&v| v).count()).unwrap())
            .collect()
    }

    pub fn clip_features(f: &Fixture, dev: &Device) -> Tensor {
        clip(dev).forward(&f.get("clip.pixel_values").to_device(dev).unwrap()).unwrap()
    }

    /// (loss, logits at supervised positions, number of supervised positions) of the LLaVA forward.
    pub fn llava(f: &Fixture, dev: &Device) -> (f32, Tensor, usize) {
        let pw = Weights::open_file(&super::fixture_path("parity.safetensors"), DType::F32, dev)
            .unwrap()
            .with_prefix_of(&["vlm.projector."], "linear_1.weight")
            .unwrap();
        let (vision, llm) = (clip(dev), gemma(dev));
        let projector = Projector::load(&pw, vision.cfg.hidden_size, llm.cfg.hidden_size).unwrap();
        let vlm = Vlm { vision, projector, llm, cfg: llm_cfg() };
        let ids: Vec<Vec<u32>> =
            f.rows_i64("vlm.input_ids").iter().map(|r| r.iter().map(|&x| x as u32).collect()).collect();
        let sup = Supervised::from_labels(&f.rows_i64("vlm.labels"));
        let px = f.get("vlm.pixel_values").to_device(dev).unwrap();
        let embeds = vlm.input_embeds(&ids, Some(&px)).unwrap();
        let hidden = vlm.llm.forward_embeds(&embeds, Some(&valid(f, "vlm.attention_mask"))).unwrap();
        let (loss, logits) = vlm.loss(&hidden, &sup).unwrap();
        (loss.to_scalar::<f32>().unwrap(), logits, sup.rows.len())
    }
}

pub mod qlora {
    //! The gradient computations, on any device: tiny model + the committed fixture adapter and
    //! projector + the parity fixture's LLaVA batch.
    use super::{fixture_path, forward, tiny_dir, Fixture};
    use candle_core::{DType, Device, Var};
    use gemmaclip::model::gemma3::{BaseFormat, Gemma3Text};
    use gemmaclip::model::projector::Projector;
    use gemmaclip::model::vlm::{Supervised, Vlm};
    use gemmaclip::peft::adapter::{self, Adapter};
    use gemmaclip::train::step::{loss_and_grads, Batch, StepOptions};
    use gemmaclip::weights::Weights;

    /// The tiny VLM with the fixture adapter attached, and its trainable (name, Var)s.
    pub fn model(dev: &Device, base: BaseFormat) -> (Vlm, Vec<(String, Var)>) {
        model_with_dropout(dev, base, None)
    }

    /// As `model`, with every adapter's dropout probability overridden.
    pub fn model_with_dropout(dev: &Device, base: BaseFormat, dropout: Option<f32>) -> (Vlm, Vec<(String, Var)>) {
        model_in(dev, DType::F32, base, dropout)
    }

    /// As `model_with_dropout`, with the frozen weights (text model) in `dtype`.
    pub fn model_in(dev: &Device, dtype: DType, base: BaseFormat, dropout: Option<f32>) -> (Vlm, Vec<(String, Var)>) {
        let w = Weights::open(&tiny_dir().join("llm"), dtype, dev).unwrap();
        let mut llm = Gemma3Text::load(w, &forward::llm_cfg().text, base).unwrap();
        let dir = fixture_path("lora_init");
        let (ad, scale) = Adapter::load(&dir, dev).unwrap();
        ad.attach(&mut llm, scale).unwrap();
        if let Some(p) = dropout {
            for (_, lin) in llm.linears_mut() {
                lin.lora.as_mut().unwrap().dropout = p;
            }
        }
        let mut vars = adapter::lora_vars(&mut llm);
        let vision = forward::clip(dev);
        let pw = Weights::open_file(&dir.join("projector.safetensors"), DType::F32, dev).unwrap();
        let projector = Projector::load(&pw, vision.cfg.hidden_size, llm.cfg.hidden_size).unwrap();
        vars.extend(projector.vars().into_iter().map(|(n, v)| (format!("projector.{n}"), v)));
        (Vlm { vision, projector, llm, cfg: forward::llm_cfg() }, vars)
    }

    pub fn batch(f: &Fixture, dev: &Device) -> Batch {
        Batch {
            ids: f.rows_i64("vlm.input_ids").iter().map(|r| r.iter().map(|&x| x as u32).collect()).collect(),
            valid: f.rows_i64("vlm.attention_mask").iter().map(|r| r.iter().map(|&m| m == 1).collect()).collect(),
            pixels: Some(f.get("vlm.pixel_values").to_device(dev).unwrap()),
            supervised: Supervised::from_labels(&f.rows_i64("vlm.labels")),
        }
    }

    /// (loss, [(name, grad on the CPU)]).
    pub fn grads(
        dev: &Device,
        base: BaseFormat,
        dropout: Option<f32>,
        opts: &StepOptions,
    ) -> (f32, Vec<(String, candle_core::Tensor)>) {
        grads_of(model_with_dropout(dev, base, dropout), dev, opts)
    }

    /// (loss, [(name, grad on the CPU)]) with the text model in `dtype` and, as `train` runs it,
    /// LoRA working copies in that dtype (their gradients stand for the masters').
    pub fn grads_in(
        dev: &Device,
        dtype: DType,
        base: BaseFormat,
        opts: &StepOptions,
    ) -> (f32, Vec<(String, candle_core::Tensor)>) {
        let (mut vlm, mut vars) = model_in(dev, dtype, base, None);
        let work = adapter::working_copies(&mut vlm.llm, dtype).unwrap();
        for ((_, v), w) in vars.iter_mut().zip(work) {
            if let Some(w) = w {
                *v = w;
            }
        }
        grads_of((vlm, vars), dev, opts)
    }

    fn grads_of(
        (vlm, vars): (Vlm, Vec<(String, Var)>),
        dev: &Device,
        opts: &StepOptions,
    ) -> (f32, Vec<(String, candle_core::Tensor)>) {
        let f = Fixture::load("parity.safetensors");
        let only_vars: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        let g = loss_and_grads(&vlm, &batch(&f, dev), &only_vars, opts).unwrap();
        let named = vars
            .iter()
            .zip(g.grads)
            .map(|((n, _), g)| {
                (n.clone(), g.unwrap_or_else(|| panic!("no gradient for {n}")).to_device(&Device::Cpu).unwrap())
            })
            .collect();
        (g.loss, named)
    }
}
