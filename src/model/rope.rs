//! Rotary position embeddings as transformers computes them: tables in f32, non-interleaved
//! halves (`rotate_half`), linear scaling divides the inverse frequencies.

use candle_core::{DType, Device, Result, Tensor};

/// inv_freq = 1 / theta^(2i/d), in f32 like torch, then divided by the linear scaling factor.
fn inv_freq(head_dim: usize, theta: f64, linear_factor: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| (1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)) / linear_factor as f32)
        .collect()
}

/// cos and sin tables for positions `offset..offset+len`, each [len, head_dim/2], f32.
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTables {
    pub fn new(
        head_dim: usize,
        theta: f64,
        linear_factor: f64,
        offset: usize,
        len: usize,
        dev: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq = inv_freq(head_dim, theta, linear_factor);
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in offset..offset + len {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self { cos: Tensor::from_vec(cos, (len, half), dev)?, sin: Tensor::from_vec(sin, (len, half), dev)? })
    }

    /// Applies the rotation to x [B, heads, L, head_dim]; the tables are cast to x's dtype first,
    /// as transformers casts cos/sin to the activation dtype.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let (cos, sin) = if dtype == DType::F32 {
            (self.cos.clone(), self.sin.clone())
        } else {
            (self.cos.to_dtype(dtype)?, self.sin.to_dtype(dtype)?)
        };
        let half = x.dim(candle_core::D::Minus1)? / 2;
        let x1 = x.narrow(candle_core::D::Minus1, 0, half)?;
        let x2 = x.narrow(candle_core::D::Minus1, half, half)?;
        let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let b = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Tensor::cat(&[a, b], candle_core::D::Minus1)
    }
}

/// Gemma's q/k path after the projection: x [B, L, heads*D] -> RMSNorm over each head with the
/// frozen `scale`, then RoPE, giving [B, heads, L, D] contiguous. On a GPU in bf16 with [L, D/2]
/// tables one fused op each way (qk_rope.rs); elsewhere composed.
pub fn norm_rope(x: &Tensor, heads: usize, scale: &Tensor, eps: f64, rope: &RopeTables) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_applies(x) && rope.cos.rank() == 2 {
        let op = crate::model::qk_rope::NormRope {
            heads,
            scale: scale.clone(),
            cos: rope.cos.clone(),
            sin: rope.sin.clone(),
            eps: eps as f32,
        };
        return crate::model::tape::run1(&x.contiguous()?, op);
    }
    let (b, l, hd) = x.dims3()?;
    let x = x.reshape((b, l, heads, hd / heads))?;
    let n = crate::model::ops::gemma_rms_norm(&x, scale, eps)?.transpose(1, 2)?;
    rope.apply(&n.contiguous()?)
}

/// Whether norm_rope's fused GPU op takes x.
fn fused_applies(x: &Tensor) -> bool {
    x.device().is_cuda() && x.dtype() == DType::BF16 && crate::fused_ops::allowed(crate::fused_ops::FusedOp::NormRope)
}

/// norm_rope for a decode step: one new position per row, x [B, 1, heads*D], with each row's own
/// tables cos/sin [B, D/2] -> [B, heads, 1, D] contiguous.
pub fn norm_rope_rows(x: &Tensor, heads: usize, scale: &Tensor, eps: f64, rope: &RopeTables) -> Result<Tensor> {
    let (b, l, hd) = x.dims3()?;
    if l != 1 || rope.cos.dims() != [b, hd / heads / 2] {
        candle_core::bail!("norm_rope_rows: x {:?} with tables {:?}", x.dims(), rope.cos.dims());
    }
    if b == 1 {
        return norm_rope(x, heads, scale, eps, rope);
    }
    if fused_applies(x) {
        // the rows as the positions of one sequence: the fused op's [L, D/2] tables are per position
        return norm_rope(&x.reshape((1, b, hd))?, heads, scale, eps, rope)?.transpose(0, 2)?.contiguous();
    }
    let half = hd / heads / 2;
    let t = RopeTables { cos: rope.cos.reshape((b, 1, 1, half))?, sin: rope.sin.reshape((b, 1, 1, half))? };
    norm_rope(x, heads, scale, eps, &t)
}
