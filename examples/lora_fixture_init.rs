//! Writes the LoRA adapter and projector that the gradient fixtures start from:
//! tests/fixtures/lora_init/{adapter_config.json, adapter_model.safetensors, projector.safetensors}.
//! B is random rather than zero (PEFT's training init): with B = 0, dL/dA is exactly zero and a
//! comparison of A's gradient would prove nothing.
//!
//!   cargo run --release --example lora_fixture_init -- tests/fixtures/lora_init
//!
//! Then tools/reference/make_grad_fixtures.py loads these files into PEFT (see its docstring).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gemmaclip::config::{ClipVisionConfig, LlmConfig};
use gemmaclip::init::{init, Preset};
use gemmaclip::model::gemma3::{BaseFormat, Gemma3Text};
use gemmaclip::model::projector::Projector;
use gemmaclip::peft::adapter;
use gemmaclip::peft::lora::{LoraSpec, DEFAULT_TARGETS};
use gemmaclip::rng::SplitMix64;
use gemmaclip::weights::Weights;

fn main() -> Result<()> {
    let out = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "tests/fixtures/lora_init".into()));
    let tmp = tempfile::tempdir()?;
    init(Preset::Tiny, tmp.path(), 0)?;
    let cfg = LlmConfig::from_file(&tmp.path().join("llm/config.json"))?;
    let vcfg = ClipVisionConfig::from_file(&tmp.path().join("vision/config.json"))?;
    let w = Weights::open(&tmp.path().join("llm"), DType::F32, &Device::Cpu)?;
    let mut model = Gemma3Text::load(w, &cfg.text, BaseFormat::Dense)?;
    let spec =
        LoraSpec { r: 4, alpha: 8.0, dropout: 0.0, targets: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect() };
    adapter::attach_new(&mut model, &spec, 7)?;
    let mut rng = SplitMix64::new(11);
    for (name, var) in adapter::lora_vars(&mut model) {
        if name.ends_with("lora_B.weight") {
            let mut v = vec![0f32; var.elem_count()];
            rng.fill_normal(&mut v, 0.0, 0.05);
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu)?)?;
        }
    }
    adapter::save(&out, &mut model, &spec, "gemmaclip-tiny")?;
    Projector::init(vcfg.hidden_size, cfg.text.hidden_size, 5, &Device::Cpu)?
        .save(&out.join("projector.safetensors"))?;
    println!("wrote {}", out.display());
    Ok(())
}
