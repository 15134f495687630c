//! When attention runs fused (cuDNN, forward and backward) instead of as composed candle ops: on a
//! GPU, in bf16, with libcudnn 9 loadable, for a forward without a KV cache whose rows are
//! right-padded (valid tokens first: training and scoring batches, generation's prompts). Everything
//! else (the CPU, f32, a decode step, which has its own kernels) keeps the composed path, which is also the
//! reference the fused op is tested against (tests/gpu.rs). `GEMMACLIP_COMPOSED=attention` turns
//! the fused path off, for comparisons (src/fused_ops.rs).

use candle_core::{DType, Device, Tensor};

/// The fused path's masks for one forward: the rows' valid lengths (None when no row is padded)
/// and the sliding window of local layers.
#[derive(Clone)]
pub struct FusedAttention {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    seq_lens: Option<Tensor>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    window: usize,
}

/// Whether fused attention may run on `dev` for `dtype` (prints once why not, where libcudnn is missing).
pub fn enabled(dev: &Device, dtype: DType) -> bool {
    if !dev.is_cuda() || dtype != DType::BF16 || !crate::fused_ops::allowed(crate::fused_ops::FusedOp::Attention) {
        return false;
    }
    #[cfg(feature = "cuda")]
    return crate::model::cudnn_attention::available().is_some();
    #[cfg(not(feature = "cuda"))]
    false
}

/// Each row's count of leading valid positions, when every row is valid-then-padding and not empty.
fn right_padded_lengths(valid: &[Vec<bool>]) -> Option<Vec<i32>> {
    valid
        .iter()
        .map(|row| {
            let n = row.iter().take_while(|&&v| v).count();
            (n > 0 && row[n..].iter().all(|&v| !v)).then_some(n as i32)
        })
        .collect()
}

impl FusedAttention {
    /// The fused masks for a forward over `lq` positions from 0 with rows `valid` ([B][lq]), or
    /// None where the composed path must run.
    pub fn for_rows(
        valid: &[Vec<bool>],
        lq: usize,
        offset: usize,
        window: usize,
        dev: &Device,
        dtype: DType,
    ) -> candle_core::Result<Option<Self>> {
        if offset != 0 || valid.iter().any(|r| r.len() != lq) || !enabled(dev, dtype) {
            return Ok(None);
        }
        let Some(lens) = right_padded_lengths(valid) else { return Ok(None) };
        let seq_lens = if lens.iter().all(|&n| n as usize == lq) { None } else { Some(Tensor::new(lens, dev)?) };
        Ok(Some(Self { seq_lens, window }))
    }

    /// Causal attention of q [B, Hq, L, D] over k/v [B, Hkv, L, D] (bf16), windowed on sliding
    /// layers -> [B, L, Hq*D].
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, sliding: bool) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        {
            use crate::model::cudnn_attention::{sdpa, Mask};
            let mask = Mask { causal: true, window: sliding.then_some(self.window), seq_lens: self.seq_lens.clone() };
            sdpa(q, k, v, &mask, scale)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (q, k, v, scale, sliding);
            candle_core::bail!("fused attention needs the cuda feature")
        }
    }
}

/// Unmasked attention (CLIP's encoder) of q [B, H, L, D] over k/v [B, H, L, D] (bf16) -> [B, L, H*D].
pub fn attend_unmasked(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        use crate::model::cudnn_attention::{sdpa, Mask};
        sdpa(q, k, v, &Mask { causal: false, window: None, seq_lens: None }, scale)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v, scale);
        candle_core::bail!("fused attention needs the cuda feature")
    }
}

#[cfg(test)]
mod tests {
    use super::right_padded_lengths;

    #[test]
    fn only_valid_then_padding_rows_qualify() {
        let (t, f) = (true, false);
        assert_eq!(right_padded_lengths(&[vec![t, t, f], vec![t, t, t]]), Some(vec![2, 3]));
        assert_eq!(right_padded_lengths(&[vec![f, t, t]]), None); // left padding
        assert_eq!(right_padded_lengths(&[vec![t, f, t]]), None);
        assert_eq!(right_padded_lengths(&[vec![f, f]]), None);
    }
}
