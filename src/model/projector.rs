//! The LLaVA-1.5 projector (`mlp2x_gelu`): Linear(vision -> text), exact-erf GELU, Linear(text -> text).
//! Its weights are trainable f32 `Var`s, cast to the activation dtype in forward.

use crate::rng::{name_hash, SplitMix64};
use crate::weights::Weights;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

pub struct Projector {
    /// [text, vision], [text]
    pub w1: Var,
    pub b1: Var,
    /// [text, text], [text]
    pub w2: Var,
    pub b2: Var,
}

/// Names a projector file may use for its two linears: ours and HF Llava's (`linear_1`/`linear_2`),
/// and the original LLaVA repository's (`mm_projector.0`/`mm_projector.2`).
const LAYOUTS: [(&str, &str); 5] = [
    ("linear_1", "linear_2"),
    ("multi_modal_projector.linear_1", "multi_modal_projector.linear_2"),
    ("model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"),
    ("model.mm_projector.0", "model.mm_projector.2"),
    ("mm_projector.0", "mm_projector.2"),
];

/// The names we write, in `projector.safetensors`.
pub const NAMES: [&str; 4] = ["linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"];

fn linear(x: &Tensor, w: &Var, b: &Var) -> candle_core::Result<Tensor> {
    let (o, i) = w.dims2()?;
    let lead = &x.dims()[..x.rank() - 1];
    let rows: usize = lead.iter().product();
    let dt = x.dtype();
    let y = x.reshape((rows, i))?.matmul(&w.as_tensor().to_dtype(dt)?.t()?)?;
    let y = y.broadcast_add(&b.as_tensor().to_dtype(dt)?)?;
    let mut shape = lead.to_vec();
    shape.push(o);
    y.reshape(shape)
}

impl Projector {
    pub fn load(w: &Weights, vision_dim: usize, text_dim: usize) -> Result<Self> {
        let Some((a, b)) = LAYOUTS.iter().find(|(a, _)| w.contains(&format!("{a}.weight"))) else {
            bail!(
                "{}: no projector weights (looked for {})",
                w.dir().display(),
                LAYOUTS.iter().map(|(a, _)| format!("`{a}.weight`")).collect::<Vec<_>>().join(", ")
            );
        };
        let var = |name: String, shape: &[usize]| -> Result<Var> {
            Ok(Var::from_tensor(&w.get_as(&name, shape, DType::F32)?)?)
        };
        Ok(Self {
            w1: var(format!("{a}.weight"), &[text_dim, vision_dim])?,
            b1: var(format!("{a}.bias"), &[text_dim])?,
            w2: var(format!("{b}.weight"), &[text_dim, text_dim])?,
            b2: var(format!("{b}.bias"), &[text_dim])?,
        })
    }

    /// PyTorch's nn.Linear init: weight and bias ~ U(-1/sqrt(in), 1/sqrt(in)).
    pub fn init(vision_dim: usize, text_dim: usize, seed: u64, dev: &Device) -> Result<Self> {
        let uniform = |name: &str, shape: (usize, usize), fan_in: usize| -> Result<Var> {
            let mut rng = SplitMix64::new(seed ^ name_hash(name));
            let bound = 1.0 / (fan_in as f64).sqrt();
            let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
            let t = Tensor::from_vec(v, shape, dev)?;
            Ok(Var::from_tensor(&if shape.0 == 1 { t.squeeze(0)? } else { t })?)
        };
        Ok(Self {
            w1: uniform(NAMES[0], (text_dim, vision_dim), vision_dim)?,
            b1: uniform(NAMES[1], (1, text_dim), vision_dim)?,
            w2: uniform(NAMES[2], (text_dim, text_dim), text_dim)?,
            b2: uniform(NAMES[3], (1, text_dim), text_dim)?,
        })
    }

    /// (name, Var) in `projector.safetensors` order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        NAMES
            .iter()
            .map(|n| n.to_string())
            .zip([self.w1.clone(), self.b1.clone(), self.w2.clone(), self.b2.clone()])
            .collect()
    }

    /// Writes the four tensors (f32) to `path` through a temporary name.
    pub fn save(&self, path: &Path) -> Result<()> {
        let map: HashMap<String, Tensor> = self
            .vars()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        crate::safetensors_out::save_tensors_atomic(&map, path)
    }

    /// [.., vision_dim] -> [.., text_dim]
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear(&linear(x, &self.w1, &self.b1)?.gelu_erf()?, &self.w2, &self.b2)
    }
}
