//! Differentiable building blocks, composed from candle ops that have a backward (candle-notes §1):
//! norms and softmax run in f32 and cast back, as transformers does.

use candle_core::{DType, Result, Tensor, D};

/// Gemma's RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + w)`, all in f32, then cast to x's dtype.
pub fn gemma_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?;
    let scale = (weight.to_dtype(DType::F32)? + 1.0)?;
    normed.broadcast_mul(&scale)?.to_dtype(dtype)
}

/// LayerNorm over the last dimension, statistics in f32.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    normed.broadcast_mul(&weight.to_dtype(DType::F32)?)?.broadcast_add(&bias.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

/// Softmax over the last dimension of an f32 tensor (composed, so it has a backward).
pub fn softmax_last_dim_f32(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// CLIP's activation: `x * sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?)
}
