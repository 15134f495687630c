//! Gemma-3 self-attention: q/k/v projections (LoRA linears), q/k RMSNorm + RoPE, grouped-query
//! attention with the layer's mask (cuDNN's fused kernel or the composed softmax), the output
//! projection; with a KV cache when decoding.

use crate::config::GemmaTextConfig;
use crate::model::gemma3::{load_linear, BaseFormat};
use crate::model::kv_cache::LayerCache;
use crate::model::layer_context::LayerMask;
use crate::model::ops::{gemma_norm_scale, softmax_last_dim_f32};
use crate::model::rope::{norm_rope, norm_rope_rows, RopeTables};
use crate::peft::lora::{LoraLinear, SharedDown};
use crate::weights::Weights;
use anyhow::Result;
use candle_core::{DType, Tensor};

pub struct Attention {
    pub q_proj: LoraLinear,
    pub k_proj: LoraLinear,
    pub v_proj: LoraLinear,
    pub o_proj: LoraLinear,
    /// Answering with frozen adapters: q's, k's and v's down projections in one launch.
    pub(crate) qkv_down: Option<SharedDown>,
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
            qkv_down: None,
            q_norm: gemma_norm_scale(&w.get(&format!("{p}.q_norm.weight"), &[hd])?)?,
            k_norm: gemma_norm_scale(&w.get(&format!("{p}.k_norm.weight"), &[hd])?)?,
            n_heads: nq,
            n_kv_heads: nkv,
            head_dim: hd,
            scale: cfg.attention_scale(),
            eps: cfg.rms_norm_eps,
        })
    }

    /// x [B, L, H] -> [B, L, H]. With a cache, a prompt (no write index) is attended as without
    /// one and its keys/values written at column 0; a decode step (one position per row, the
    /// step's write index) writes its keys/values at the step's column and attends over the whole
    /// cache, `mask` [B, 1, 1, T] hiding what the row may not see.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: LayerMask,
        seed: Option<u64>,
        cache: Option<(&LayerCache, Option<&Tensor>)>,
    ) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (hd, nq, nkv) = (self.head_dim, self.n_heads, self.n_kv_heads);
        let step = cache.and_then(|(c, index)| index.map(|i| (c, i)));
        let nr = |x: &Tensor, heads: usize, scale: &Tensor| match step {
            Some(_) => norm_rope_rows(x, heads, scale, self.eps, rope),
            None => norm_rope(x, heads, scale, self.eps, rope),
        };
        let downs = match &self.qkv_down {
            Some(shared) => shared.forward(x, &self.q_proj)?,
            None => None,
        };
        let h = |i: usize| downs.as_ref().map(|d| &d[i]);
        let q = nr(&self.q_proj.forward_with_down(x, h(0), seed)?, nq, &self.q_norm)?; // [B, nq, L, hd]
        let k = nr(&self.k_proj.forward_with_down(x, h(1), seed)?, nkv, &self.k_norm)?; // [B, nkv, L, hd]
        let v = self.v_proj.forward_with_down(x, h(2), seed)?; // [B, L, nkv*hd]
        let mask = match mask {
            LayerMask::Fused { attn, sliding } if step.is_none() => {
                // v stays in the projection's layout: cuDNN reads it through strides
                let out = attn.attend(&q, &k, &v, self.scale, sliding)?; // [B, L, nq*hd]
                if let Some((c, _)) = cache {
                    c.write_prompt(&k, &v.reshape((b, l, nkv, hd))?.transpose(1, 2)?)?;
                }
                return self.o_proj.forward(&out, seed);
            }
            LayerMask::Fused { .. } => candle_core::bail!("fused attention masks reached a decode step"),
            LayerMask::Composed(m) => m,
        };
        let v = v.reshape((b, l, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let out = match (cache, step) {
            (_, Some((c, index))) => {
                c.write_step(&k.detach(), &v.detach(), index)?;
                #[cfg(feature = "cuda")]
                if let Some(out) = crate::model::decode_attention::attend(&q, &c.k, &c.v, mask, self.scale)? {
                    return self.o_proj.forward(&out, seed); // [B, 1, nq*hd]
                }
                grouped_attention(&q, &c.k, &c.v, mask, self.scale)? // [B, nq, 1, hd]
            }
            (Some((c, None)), None) => {
                c.write_prompt(&k.detach(), &v.detach())?;
                grouped_attention(&q, &k, &v, mask, self.scale)?
            }
            _ => grouped_attention(&q, &k, &v, mask, self.scale)?, // [B, nq, L, hd]
        };
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
