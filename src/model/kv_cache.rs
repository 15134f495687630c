//! The KV cache of generation: per layer the keys and values still attended (a window's worth on
//! sliding layers), per row which positions are real and the next RoPE position.

use candle_core::Tensor;

/// One layer's keys and values [B, nkv, T, hd] for the positions it still needs: all of them on a
/// global layer, the last `window` on a sliding one (older keys are outside every later query's
/// window), so the cache never grows past what the model attends to.
pub struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    window: Option<usize>,
}

impl LayerCache {
    /// An empty cache; `window` for a sliding layer.
    pub fn new(window: Option<usize>) -> Self {
        Self { k: None, v: None, window }
    }

    /// Appends new keys/values; returns the full (k, v) the new queries attend over. The trim to
    /// the window happens after this pass, so the new queries still see their whole window.
    pub(crate) fn append(&mut self, k: Tensor, v: Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (k, v) = match (self.k.take(), self.v.take()) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            _ => (k, v),
        };
        let t = k.dim(2)?;
        let (kk, vv) = match self.window {
            Some(w) if t > w => (k.narrow(2, t - w, w)?, v.narrow(2, t - w, w)?),
            _ => (k.clone(), v.clone()),
        };
        self.k = Some(kk);
        self.v = Some(vv);
        Ok((k, v))
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The KV cache of a batch being generated: per layer, plus per row which positions are real
/// (left padding is not) and the RoPE position of the next token.
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    pub valid: Vec<Vec<bool>>,
    pub next_position: Vec<usize>,
}
