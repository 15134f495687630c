//! The assembled LLaVA-style model: CLIP layer -2 patch features -> projector -> spliced into the
//! Gemma input embeddings at the `<image_soft_token>` positions (unscaled) -> Gemma -> loss on
//! supervised positions only.

use crate::config::LlmConfig;
use crate::model::clip::ClipVision;
use crate::model::gemma3::Gemma3Text;
use crate::model::ops::cross_entropy_sum;
use crate::model::projector::Projector;
use crate::model::splice::splice_image_features;
use anyhow::{bail, Result};
use candle_core::{Tensor, D};

pub struct Vlm {
    pub vision: ClipVision,
    pub projector: Projector,
    pub llm: Gemma3Text,
    pub cfg: LlmConfig,
}

/// Rows of a batch to score: `rows[k]` is a flat index b * L + t into the hidden states and
/// `targets[k]` the token that position must predict (the label at t + 1).
#[derive(Debug, Clone, Default)]
pub struct Supervised {
    pub rows: Vec<u32>,
    pub targets: Vec<u32>,
}

impl Supervised {
    /// From transformers-style labels [B][L] (-100 = ignored): position t predicts labels[t + 1].
    pub fn from_labels(labels: &[Vec<i64>]) -> Self {
        let mut s = Self::default();
        for (b, row) in labels.iter().enumerate() {
            for t in 0..row.len().saturating_sub(1) {
                if row[t + 1] >= 0 {
                    s.rows.push((b * row.len() + t) as u32);
                    s.targets.push(row[t + 1] as u32);
                }
            }
        }
        s
    }
}

impl Vlm {
    /// Input embeddings for ids [B][L] (equal lengths) and the batch's images [N_img, C, S, S]
    /// in the order their image-token blocks appear.
    pub fn input_embeds(&self, ids: &[Vec<u32>], pixels: Option<&Tensor>) -> Result<Tensor> {
        let dev = self.llm.device();
        let l = ids.first().map_or(0, |r| r.len());
        if ids.iter().any(|r| r.len() != l) {
            bail!("input rows must be padded to one length");
        }
        let flat: Vec<u32> = ids.concat();
        let ids_t = Tensor::from_vec(flat, (ids.len(), l), dev)?;
        let embeds = self.llm.embed(&ids_t)?;
        match pixels {
            Some(px) => {
                let feats = self.projector.forward(&self.vision.forward_frozen(px)?.to_dtype(self.llm.dtype())?)?;
                let (n, t, hdim) = feats.dims3()?;
                splice_image_features(&embeds, ids, self.cfg.image_token_index, &feats.reshape((n * t, hdim))?)
            }
            None => {
                if ids.iter().flatten().any(|&i| i == self.cfg.image_token_index) {
                    bail!("the prompt has image tokens but no image was given");
                }
                Ok(embeds)
            }
        }
    }

    /// Mean cross-entropy over supervised positions and their logits [S, V] (f32). Only the
    /// supervised rows of the last hidden state reach the final norm and lm_head.
    pub fn loss(&self, hidden: &Tensor, sup: &Supervised) -> Result<(Tensor, Tensor)> {
        let (b, l, h) = hidden.dims3()?;
        let dev = hidden.device();
        let rows = Tensor::from_vec(sup.rows.clone(), sup.rows.len(), dev)?;
        let picked = hidden.reshape((b * l, h))?.index_select(&rows, 0)?;
        let logits = self.llm.logits(&picked)?;
        let targets = Tensor::from_vec(sup.targets.clone(), sup.targets.len(), dev)?;
        let loss = (cross_entropy_sum(&logits, &targets)? / sup.targets.len() as f64)?;
        debug_assert_eq!(logits.dim(D::Minus1)?, self.llm.cfg.vocab_size);
        Ok((loss, logits))
    }
}
