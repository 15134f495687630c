//! One decoder layer's forward kept for its backward, and that backward: the fused ops' record
//! and the hand-written backward where the layer runs fused on the GPU (src/train/layer_backward.rs),
//! else candle's graph from a tracking copy of the layer input. The checkpointed step keeps one
//! layer at a time (the recompute); the step without checkpointing keeps them all.

use crate::model::gemma3::DecoderLayer;
use crate::model::layer_context::LayerContext;
use crate::train::step::{backward_from, collect};
use anyhow::Result;
use candle_core::{Tensor, Var};

/// What a layer's backward needs from its forward.
pub enum Kept {
    #[cfg(feature = "cuda")]
    Tape(Vec<crate::model::tape::Entry>),
    Graph {
        x: Var,
        y: Tensor,
    },
}

/// Layers' forwards for their backward, one after another: by record while the layers run fused,
/// else through candle's graph. The first layer that cannot be recorded ends the trying (the
/// layers are alike: the rest would only run their forward twice).
pub struct Pass {
    try_record: bool,
    later: bool,
}

impl Pass {
    /// `later`: each backward runs after every layer's forward (no checkpointing), not right after
    /// its own layer's.
    pub fn new(later: bool) -> Self {
        Self { try_record: true, later }
    }

    /// The layer's forward over x (no graph behind it) -> its output, and what its backward needs.
    pub fn forward(&mut self, layer: &DecoderLayer, x: &Tensor, ctx: &LayerContext) -> Result<(Tensor, Kept)> {
        if self.try_record {
            if let Some(out) = record(layer, x, ctx, self.later)? {
                return Ok(out);
            }
            self.try_record = false;
        }
        let x = Var::from_tensor(x)?;
        let y = layer.forward(x.as_tensor(), ctx, None)?;
        Ok((y.detach(), Kept::Graph { x, y }))
    }
}

/// `Pass::forward` where the layer's ops are all fused ones and the hand-written backward may run
/// (its record); None otherwise.
pub fn record(layer: &DecoderLayer, x: &Tensor, ctx: &LayerContext, later: bool) -> Result<Option<(Tensor, Kept)>> {
    #[cfg(feature = "cuda")]
    if crate::train::layer_backward::asked() {
        if let Some((y, tape)) = crate::train::layer_backward::forward_recorded(layer, x, ctx, later)? {
            return Ok(Some((y, Kept::Tape(tape))));
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (layer, x, ctx, later);
    Ok(None)
}

/// d(loss)/d(layer input) from d(loss)/d(layer output) `g`; the trainable tensors' gradients
/// (positions in `vars`) added into `grads`.
pub fn backward(kept: Kept, g: &Tensor, vars: &[Var], grads: &mut [Option<Tensor>]) -> Result<Tensor> {
    match kept {
        #[cfg(feature = "cuda")]
        Kept::Tape(tape) => crate::train::layer_backward::backward(&tape, g, vars, grads),
        Kept::Graph { x, y } => {
            let store = backward_from(&y, g)?;
            collect(grads, &store, vars)?;
            Ok(store.get(x.as_tensor()).cloned().ok_or_else(|| anyhow::anyhow!("a layer input has no gradient"))?)
        }
    }
}
