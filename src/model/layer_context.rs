//! What every layer of one forward pass shares: the RoPE tables of both layer types and the
//! attention masks, either additive f32 masks for the composed path or the row lengths and window
//! of cuDNN's fused attention.

use crate::config::LayerType;
use crate::model::fused_attention::FusedAttention;
use crate::model::rope::RopeTables;
use candle_core::{Device, Tensor};

/// What every layer of one forward pass shares: RoPE tables and attention masks per layer type.
pub struct LayerContext {
    pub rope_global: RopeTables,
    pub rope_local: RopeTables,
    pub masks: Masks,
    /// Some in training: the step's dropout seed (LoRA dropout masks derive from it).
    pub dropout_seed: Option<u64>,
    /// A decode step's KV-cache write index ([B, nkv, 1, hd] u32, every entry the step's column).
    pub write_index: Option<Tensor>,
}

/// The attention masks of one forward.
pub enum Masks {
    /// Additive [B, 1, Lq, Lk] f32 masks for the composed path: 0 where a query may attend, f32::MIN elsewhere.
    Composed { global: Tensor, sliding: Tensor },
    /// cuDNN's fused attention, which builds its masks from row lengths and the window.
    Fused(FusedAttention),
}

/// One layer's attention mask.
pub enum LayerMask<'a> {
    Composed(&'a Tensor),
    Fused { attn: &'a FusedAttention, sliding: bool },
}

impl LayerContext {
    pub fn for_layer(&self, t: LayerType) -> (&RopeTables, LayerMask<'_>) {
        let rope = match t {
            LayerType::Global => &self.rope_global,
            LayerType::Sliding => &self.rope_local,
        };
        let mask = match (&self.masks, t) {
            (Masks::Composed { global, .. }, LayerType::Global) => LayerMask::Composed(global),
            (Masks::Composed { sliding, .. }, LayerType::Sliding) => LayerMask::Composed(sliding),
            (Masks::Fused(attn), t) => LayerMask::Fused { attn, sliding: t == LayerType::Sliding },
        };
        (rope, mask)
    }
}

/// Additive attention mask [B, 1, Lq, Lk] for queries at positions `offset..offset+Lq` over keys
/// `0..Lk`: causal, keys with `valid[b][j] == false` hidden, and with a window, query i sees key j
/// only when i - j < window (transformers' sliding mask).
pub fn attention_mask(
    valid: &[Vec<bool>],
    lq: usize,
    offset: usize,
    window: Option<usize>,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let b = valid.len();
    let lk = valid.first().map_or(0, |v| v.len());
    let mut m = vec![f32::MIN; b * lq * lk];
    for (bi, row) in valid.iter().enumerate() {
        for qi in 0..lq {
            let i = qi + offset;
            let start = window.map_or(0, |w| (i + 1).saturating_sub(w));
            for j in start..=i.min(lk.saturating_sub(1)) {
                if row[j] {
                    m[(bi * lq + qi) * lk + j] = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, lq, lk), dev)
}
