//! The LLaVA-1.5 projector (`mlp2x_gelu`): Linear(vision -> text), exact-erf GELU, Linear(text -> text).

use crate::model::linear::Linear;
use crate::weights::Weights;
use anyhow::{bail, Result};
use candle_core::{Module, Tensor};

pub struct Projector {
    pub linear_1: Linear,
    pub linear_2: Linear,
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

impl Projector {
    pub fn load(w: &Weights, vision_dim: usize, text_dim: usize) -> Result<Self> {
        let Some((a, b)) = LAYOUTS.iter().find(|(a, _)| w.contains(&format!("{a}.weight"))) else {
            bail!(
                "{}: no projector weights (looked for {})",
                w.dir().display(),
                LAYOUTS.iter().map(|(a, _)| format!("`{a}.weight`")).collect::<Vec<_>>().join(", ")
            );
        };
        let lin = |p: &str, o: usize, i: usize| -> Result<Linear> {
            Ok(Linear::new(w.get(&format!("{p}.weight"), &[o, i])?, Some(w.get(&format!("{p}.bias"), &[o])?)))
        };
        Ok(Self { linear_1: lin(a, text_dim, vision_dim)?, linear_2: lin(b, text_dim, text_dim)? })
    }

    /// [.., vision_dim] -> [.., text_dim]
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.gelu_erf()?)
    }
}
