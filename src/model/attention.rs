//! Gemma-3 self-attention: q/k/v projections (LoRA linears), q/k RMSNorm + RoPE, grouped-query
//! attention with the layer's mask (cuDNN's fused kernel or the composed softmax), the output
//! projection; with a KV cache when decoding.

use crate::config::GemmaTextConfig;
use crate::model::gemma3::{load_linear, BaseFormat};
use crate::model::kv_cache::LayerCache;
use crate::model::layer_context::LayerMask;
use crate::model::ops::{gemma_norm_scale, softmax_last_dim_f32};
use crate::model::rope::{norm_rope, RopeTables};
use crate::peft::lora::LoraLinear;
use crate::weights::Weights;
use anyhow::Result;
use candle_core::{DType, Tensor};

pub struct Attention {
    pub q_proj: LoraLinear,
    pub k_proj: LoraLinear,
    pub v_proj: LoraLinear,
    pub o_proj: LoraLinear,
    pub(crate) q_norm: Tensor,
    pub(crate) k_norm: Tensor,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scale: f64,
    eps: f64,
}

impl Attention {
    pub(crate) fn load(w: &Weights, p: &str, cfg: &GemmaTextConfig, base: BaseFormat) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: load_linear(w, &format!("{p}.q_proj"), nq * hd, h, base)?,
            k_proj: load_linear(w, &format!("{p}.k_proj"), nkv * hd, h, base)?,
            v_proj: load_linear(w, &format!("{p}.v_proj"), nkv * hd, h, base)?,
            o_proj: load_linear(w, &format!("{p}.o_proj"), h, nq * hd, base)?,
            q_norm: gemma_norm_scale(&w.get(&format!("{p}.q_norm.weight"), &[hd])?)?,
            k_norm: gemma_norm_scale(&w.get(&format!("{p}.k_norm.weight"), &[hd])?)?,
            n_heads: nq,
            n_kv_heads: nkv,
            head_dim: hd,
            scale: cfg.attention_scale(),
            eps: cfg.rms_norm_eps,
        })
    }

    /// x [B, L, H] -> [B, L, H]. With a cache, k/v of the new positions are appended to it
    /// (detached) and the queries attend over everything it holds; `mask` then covers the cache.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: LayerMask,
        seed: Option<u64>,
        cache: Option<&mut LayerCache>,
    ) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (hd, nq, nkv) = (self.head_dim, self.n_heads, self.n_kv_heads);
        let q = norm_rope(&self.q_proj.forward(x, seed)?, nq, &self.q_norm, self.eps, rope)?; // [B, nq, L, hd]
        let k = norm_rope(&self.k_proj.forward(x, seed)?, nkv, &self.k_norm, self.eps, rope)?; // [B, nkv, L, hd]
        let v = self.v_proj.forward(x, seed)?; // [B, L, nkv*hd]
        let mask = match mask {
            LayerMask::Fused { attn, sliding } if cache.is_none() => {
                // v stays in the projection's layout: cuDNN reads it through strides
                let out = attn.attend(&q, &k, &v, self.scale, sliding)?; // [B, L, nq*hd]
                return self.o_proj.forward(&out, seed);
            }
            LayerMask::Fused { .. } => candle_core::bail!("fused attention masks reached a cached forward"),
            LayerMask::Composed(m) => m,
        };
        let v = v.reshape((b, l, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let (k, v, mask) = match cache {
            Some(c) => {
                let (k, v) = c.append(k.detach(), v.detach())?;
                let lk = k.dim(2)?;
                let total = mask.dim(3)?;
                (k, v, mask.narrow(3, total - lk, lk)?)
            }
            None => (k, v, mask.clone()),
        };
        let out = grouped_attention(&q, &k, &v, &mask, self.scale)?; // [B, nq, L, hd]
        let out = out.transpose(1, 2)?.reshape((b, l, nq * hd))?;
        self.o_proj.forward(&out, seed)
    }
}

/// softmax(q k^T * scale + mask) v with grouped key/value heads, without materialising repeated
/// k/v: query head h uses kv head h / (nq / nkv), as transformers' `repeat_kv` lays them out.
/// q [B, nq, Lq, hd], k/v [B, nkv, Lk, hd], mask [B, 1, Lq, Lk] -> [B, nq, Lq, hd]
pub fn grouped_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (b, nq, lq, hd) = q.dims4()?;
    let (_, nkv, lk, _) = k.dims4()?;
    let rep = nq / nkv;
    let qg = q.reshape((b, nkv, rep * lq, hd))?;
    let scores = (qg.matmul(&k.t()?)? * scale)?; // [B, nkv, rep*Lq, Lk]
    let scores = scores.to_dtype(DType::F32)?.reshape((b, nkv, rep, lq, lk))?;
    let scores = scores.broadcast_add(&mask.unsqueeze(1)?)?; // mask [B, 1, 1, Lq, Lk]
    let probs = softmax_last_dim_f32(&scores)?.to_dtype(q.dtype())?;
    let out = probs.reshape((b, nkv, rep * lq, lk))?.matmul(v)?; // [B, nkv, rep*Lq, hd]
    out.reshape((b, nq, lq, hd))
}
