//! Gemma-3 text model (transformers' `Gemma3TextModel` + tied lm_head), exact for the 4B:
//! sandwich norms with (1+w) RMSNorm in f32, q/k norm, RoPE per layer type (global layers scaled),
//! sliding-window layers, GQA, embedding scale in the weight dtype. This file is the architecture;
//! each block (attention.rs, the LoRA linear, the MLP activation, q/k norm + RoPE, the norms) sits
//! behind one function that runs its fused GPU kernel or its composed form, both with a backward,
//! so LoRA training runs through either.

use crate::config::{GemmaTextConfig, LayerType};
use crate::model::attention::Attention;
use crate::model::fused_attention::FusedAttention;
use crate::model::kv_cache::LayerCache;
use crate::model::layer_context::{attention_mask, LayerContext, Masks};
use crate::model::ops::{gelu_tanh_mul, gemma_norm_scale, gemma_rms_norm, residual_add, residual_norm};
use crate::model::rope::RopeTables;
use crate::peft::frozen::FrozenWeight;
use crate::peft::lora::{LoraLinear, SharedDown};
use crate::peft::nf4::Nf4Weight;
use crate::weights::Weights;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

pub struct Mlp {
    pub gate_proj: LoraLinear,
    pub up_proj: LoraLinear,
    pub down_proj: LoraLinear,
    /// Answering with frozen adapters: gate's and up's down projections in one launch.
    pub(crate) gate_up_down: Option<SharedDown>,
}

pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    pre_feedforward_layernorm: Tensor,
    post_feedforward_layernorm: Tensor,
    pub layer_type: LayerType,
    eps: f64,
}

/// How the frozen base weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseFormat {
    /// As loaded, in the compute dtype.
    Dense,
    /// NF4, quantized at load; the dense copy is dropped layer by layer.
    Nf4,
}

pub struct Gemma3Text {
    pub embed_tokens: Tensor,
    /// The tied lm_head: the embedding matrix behind a no-dW op.
    lm_head: FrozenWeight,
    pub layers: Vec<DecoderLayer>,
    norm: Tensor,
    pub cfg: GemmaTextConfig,
}

pub(crate) fn load_linear(w: &Weights, name: &str, out_f: usize, in_f: usize, base: BaseFormat) -> Result<LoraLinear> {
    let dense = w.get(&format!("{name}.weight"), &[out_f, in_f])?;
    let frozen = match base {
        BaseFormat::Dense => FrozenWeight::Dense(dense),
        BaseFormat::Nf4 => FrozenWeight::Nf4(Nf4Weight::quantize(&dense)?),
    };
    Ok(LoraLinear::frozen(frozen))
}

impl Mlp {
    fn load(w: &Weights, p: &str, cfg: &GemmaTextConfig, base: BaseFormat) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: load_linear(w, &format!("{p}.gate_proj"), i, h, base)?,
            up_proj: load_linear(w, &format!("{p}.up_proj"), i, h, base)?,
            down_proj: load_linear(w, &format!("{p}.down_proj"), h, i, base)?,
            gate_up_down: None,
        })
    }

    pub fn forward(&self, x: &Tensor, seed: Option<u64>) -> candle_core::Result<Tensor> {
        let downs = match &self.gate_up_down {
            Some(shared) => shared.forward(x, &self.gate_proj)?,
            None => None,
        };
        let h = |i: usize| downs.as_ref().map(|d| &d[i]);
        let gate = self.gate_proj.forward_with_down(x, h(0), seed)?;
        let up = self.up_proj.forward_with_down(x, h(1), seed)?;
        self.down_proj.forward(&gelu_tanh_mul(&gate, &up)?, seed)
    }
}

impl DecoderLayer {
    fn load(w: &Weights, i: usize, cfg: &GemmaTextConfig, base: BaseFormat) -> Result<Self> {
        let p = format!("layers.{i}");
        let h = cfg.hidden_size;
        Ok(Self {
            self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg, base)?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg, base)?,
            input_layernorm: gemma_norm_scale(&w.get(&format!("{p}.input_layernorm.weight"), &[h])?)?,
            post_attention_layernorm: gemma_norm_scale(&w.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?)?,
            pre_feedforward_layernorm: gemma_norm_scale(
                &w.get(&format!("{p}.pre_feedforward_layernorm.weight"), &[h])?,
            )?,
            post_feedforward_layernorm: gemma_norm_scale(
                &w.get(&format!("{p}.post_feedforward_layernorm.weight"), &[h])?,
            )?,
            layer_type: cfg.layer_types[i],
            eps: cfg.rms_norm_eps,
        })
    }

    /// x [B, L, H] -> [B, L, H]; with `cache`, a prompt or decode pass that writes this layer's
    /// keys/values into it (a decode step at `ctx.write_index`) and attends over it.
    pub fn forward(&self, x: &Tensor, ctx: &LayerContext, cache: Option<&LayerCache>) -> candle_core::Result<Tensor> {
        Ok(self.forward_normed(x, None, ctx, cache, None)?.0)
    }

    /// `forward`, answering in a chain: `normed` is x's input norm when the layer before computed
    /// it, and with `next` (the next layer's input norm scale, or the final norm's) the output comes
    /// with that norm of it too, from the last residual step's launch (one launch fewer per layer
    /// with a cache; the same bits as the separate norm).
    pub fn forward_normed(
        &self,
        x: &Tensor,
        normed: Option<Tensor>,
        ctx: &LayerContext,
        cache: Option<&LayerCache>,
        next: Option<&Tensor>,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let (rope, mask) = ctx.for_layer(self.layer_type);
        let h = match normed {
            Some(h) => h,
            None => gemma_rms_norm(x, &self.input_layernorm, self.eps)?,
        };
        let h =
            self.self_attn.forward(&h, rope, mask, ctx.dropout_seed, cache.map(|c| (c, ctx.write_index.as_ref())))?;
        if cache.is_some() || graphless() {
            // answering, or a pass without a graph: each residual step and the norm after it in one
            // launch (residual_norm keeps the composed form wherever an input still tracks)
            let (x, h) =
                residual_norm(x, &h, &self.post_attention_layernorm, Some(&self.pre_feedforward_layernorm), self.eps)?;
            let h = self.mlp.forward(&h.expect("the next norm was asked for"), ctx.dropout_seed)?;
            return residual_norm(&x, &h, &self.post_feedforward_layernorm, next, self.eps);
        }
        let x = residual_add(x, &gemma_rms_norm(&h, &self.post_attention_layernorm, self.eps)?)?;
        let h = gemma_rms_norm(&x, &self.pre_feedforward_layernorm, self.eps)?;
        let h = self.mlp.forward(&h, ctx.dropout_seed)?;
        let x = residual_add(&x, &gemma_rms_norm(&h, &self.post_feedforward_layernorm, self.eps)?)?;
        let next = next.map(|s| gemma_rms_norm(&x, s, self.eps)).transpose()?;
        Ok((x, next))
    }
}

/// Whether this thread's fused ops build no graph (the first pass of a checkpointed step).
fn graphless() -> bool {
    #[cfg(feature = "cuda")]
    return crate::model::tape::graphless();
    #[cfg(not(feature = "cuda"))]
    false
}

impl Gemma3Text {
    /// Loads from a Gemma-3 checkpoint directory; accepts the hub's `language_model.model.*`,
    /// transformers 4.52+'s `model.language_model.*` and the text-only `model.*` key forms.
    pub fn load(w: Weights, cfg: &GemmaTextConfig, base: BaseFormat) -> Result<Self> {
        let w =
            w.with_prefix_of(&["language_model.model.", "model.language_model.", "model.", ""], "embed_tokens.weight")?;
        let embed_tokens = w.get("embed_tokens.weight", &[cfg.vocab_size, cfg.hidden_size])?;
        let layers =
            (0..cfg.num_hidden_layers).map(|i| DecoderLayer::load(&w, i, cfg, base)).collect::<Result<Vec<_>>>()?;
        let norm = gemma_norm_scale(&w.get("norm.weight", &[cfg.hidden_size])?)?;
        let lm_head = FrozenWeight::Dense(embed_tokens.clone());
        Ok(Self { embed_tokens, lm_head, layers, norm, cfg: cfg.clone() })
    }

    /// Marks every adapter as frozen (answering, not training): no autograd graph is built.
    /// Answering: adapters enter untracked, in the compute dtype `dtype` once and for all (a cast
    /// per call doubled the launches of a decode step).
    pub fn freeze_adapters(&mut self, dtype: candle_core::DType) -> candle_core::Result<()> {
        for (_, lin) in self.linears_mut() {
            if let Some(l) = lin.lora.as_mut() {
                l.frozen = true;
                l.work = if dtype == candle_core::DType::F32 {
                    None
                } else {
                    let a = candle_core::Var::from_tensor(&l.a.as_tensor().to_dtype(dtype)?)?;
                    let b = candle_core::Var::from_tensor(&l.b.as_tensor().to_dtype(dtype)?)?;
                    Some((a, b))
                };
            }
        }
        for layer in &mut self.layers {
            let a = &mut layer.self_attn;
            a.qkv_down = SharedDown::new(&[&a.q_proj, &a.k_proj, &a.v_proj])?;
            let m = &mut layer.mlp;
            m.gate_up_down = SharedDown::new(&[&m.gate_proj, &m.up_proj])?;
        }
        Ok(())
    }

    /// Every adaptable linear with its module path under the text model (`layers.N.self_attn.q_proj`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut LoraLinear)> {
        let mut v = vec![];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            for (name, lin) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ] {
                v.push((format!("layers.{i}.{name}"), lin));
            }
        }
        v
    }

    /// Bytes the frozen weights hold on the device (embedding and norms included).
    pub fn frozen_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut n = t(&self.embed_tokens) + t(&self.norm);
        for l in &self.layers {
            let (a, m) = (&l.self_attn, &l.mlp);
            for lin in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj] {
                n += lin.base.bytes();
            }
            n += t(&a.q_norm) + t(&a.k_norm);
            for w in [
                &l.input_layernorm,
                &l.post_attention_layernorm,
                &l.pre_feedforward_layernorm,
                &l.post_feedforward_layernorm,
            ] {
                n += t(w);
            }
        }
        n
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// ids [B, L] (u32) -> [B, L, H]: embedding rows times sqrt(hidden) rounded to the weight dtype.
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let rows = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?;
        let scale = Tensor::new(self.cfg.embed_scale() as f32, self.device())?.to_dtype(self.dtype())?;
        rows.broadcast_mul(&scale)?.reshape((b, l, self.cfg.hidden_size))
    }

    /// The RoPE tables and masks for a forward over `lq` new positions starting at `offset`,
    /// attending keys whose validity is `valid` ([B][Lk], Lk = offset + lq).
    pub fn layer_context(&self, valid: &[Vec<bool>], lq: usize, offset: usize) -> candle_core::Result<LayerContext> {
        let c = &self.cfg;
        let dev = self.device();
        let masks = match FusedAttention::for_rows(valid, lq, offset, c.sliding_window, dev, self.dtype())? {
            Some(f) => Masks::Fused(f),
            None => Masks::Composed {
                global: attention_mask(valid, lq, offset, None, dev)?,
                sliding: attention_mask(valid, lq, offset, Some(c.sliding_window), dev)?,
            },
        };
        Ok(LayerContext {
            rope_global: RopeTables::new(c.head_dim, c.rope_theta, c.rope_scaling_factor, offset, lq, dev)?,
            rope_local: RopeTables::new(c.head_dim, c.rope_local_base_freq, 1.0, offset, lq, dev)?,
            masks,
            dropout_seed: None,
            write_index: None,
        })
    }

    /// embeds [B, L, H] -> last hidden state before the final norm [B, L, H]. `valid[b][t]` is
    /// false on padding; None means no padding.
    pub fn forward_embeds(&self, embeds: &Tensor, valid: Option<&[Vec<bool>]>) -> candle_core::Result<Tensor> {
        let (b, l, _) = embeds.dims3()?;
        let all_valid;
        let valid = match valid {
            Some(v) => v,
            None => {
                all_valid = vec![vec![true; l]; b];
                &all_valid
            }
        };
        let ctx = self.layer_context(valid, l, 0)?;
        let mut x = embeds.clone();
        for layer in &self.layers {
            x = layer.forward(&x, &ctx, None)?;
        }
        Ok(x)
    }

    /// Final norm and tied lm_head on selected rows: hidden [N, H] -> logits [N, V] (f32).
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.logits_of_normed(&gemma_rms_norm(hidden, &self.norm, self.cfg.rms_norm_eps)?)
    }

    /// `logits` of rows the final norm already went over.
    pub fn logits_of_normed(&self, normed: &Tensor) -> candle_core::Result<Tensor> {
        let logits = self.lm_head.forward(normed)?.to_dtype(DType::F32)?;
        match self.cfg.final_logit_softcapping {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }

    /// Every layer over x with a cache, each residual step's launch also norming for the layer
    /// after it (and, with `final_norm`, the last for the final norm) -> (hidden, its final norm).
    pub fn layers_cached(
        &self,
        x: &Tensor,
        ctx: &LayerContext,
        cache: &crate::model::kv_cache::KvCache,
        final_norm: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let (mut x, mut normed) = (x.clone(), None);
        for (i, (layer, lc)) in self.layers.iter().zip(&cache.layers).enumerate() {
            let next = match self.layers.get(i + 1) {
                Some(l) => Some(&l.input_layernorm),
                None => final_norm.then_some(&self.norm),
            };
            (x, normed) = layer.forward_normed(&x, normed, ctx, Some(lc), next)?;
        }
        Ok((x, normed))
    }
}

impl Gemma3Text {
    /// Final norm and tied lm_head in the model's dtype, before any softcapping: hidden [N, H] -> [N, V].
    pub fn head_logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let h = gemma_rms_norm(hidden, &self.norm, self.cfg.rms_norm_eps)?;
        self.lm_head.forward(&h)
    }

    /// The tied lm_head (a backward written by hand multiplies by it).
    pub fn lm_head(&self) -> &FrozenWeight {
        &self.lm_head
    }
}
