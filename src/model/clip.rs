//! CLIP ViT vision tower (transformers' `CLIPVisionTransformer`), run up to the second-to-last
//! encoder layer: LLaVA's `hidden_states[-2]` with the CLS position dropped.

use crate::config::ClipVisionConfig;
use crate::model::fused_attention;
use crate::model::linear::Linear;
use crate::model::ops::{layer_norm, quick_gelu, residual_add, softmax_last_dim_f32};
use crate::weights::Weights;
use anyhow::Result;
use candle_core::{DType, Module, Tensor};

struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    fn load(w: &Weights, name: &str, d: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: w.get(&format!("{name}.weight"), &[d])?, bias: w.get(&format!("{name}.bias"), &[d])?, eps })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if fused(x) {
            return candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32);
        }
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// The tower is frozen and nothing differentiates through it, so on a GPU it may use candle's
/// fused layer norm and softmax, which have no backward (one launch each instead of seven and
/// four). The CPU keeps the composed forms: they are what the parity tests pin down, and the GPU
/// test compares the two.
fn fused(x: &Tensor) -> bool {
    x.device().is_cuda() && !x.track_op()
}

/// `l` over x, then quick_gelu with `then_quick_gelu`: on a GPU in bf16 one op with the bias
/// inside the GEMM (clip_linear.rs), else candle's matmul, broadcast add and composed quick_gelu.
fn linear(l: &Linear, x: &Tensor, then_quick_gelu: bool) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let (true, Some(b)) = (fused(x), &l.bias) {
        if let Some(y) = crate::model::clip_linear::forward(x, &l.weight, b, then_quick_gelu)? {
            return Ok(y);
        }
    }
    let y = l.forward(x)?;
    if then_quick_gelu {
        quick_gelu(&y)
    } else {
        Ok(y)
    }
}

fn load_linear(w: &Weights, name: &str, out_f: usize, in_f: usize) -> Result<Linear> {
    Ok(Linear::new(w.get(&format!("{name}.weight"), &[out_f, in_f])?, Some(w.get(&format!("{name}.bias"), &[out_f])?)))
}

struct EncoderLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: Norm,
    layer_norm2: Norm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl EncoderLayer {
    fn load(w: &Weights, p: &str, c: &ClipVisionConfig) -> Result<Self> {
        let (d, i) = (c.hidden_size, c.intermediate_size);
        Ok(Self {
            q_proj: load_linear(w, &format!("{p}.self_attn.q_proj"), d, d)?,
            k_proj: load_linear(w, &format!("{p}.self_attn.k_proj"), d, d)?,
            v_proj: load_linear(w, &format!("{p}.self_attn.v_proj"), d, d)?,
            out_proj: load_linear(w, &format!("{p}.self_attn.out_proj"), d, d)?,
            layer_norm1: Norm::load(w, &format!("{p}.layer_norm1"), d, c.layer_norm_eps)?,
            layer_norm2: Norm::load(w, &format!("{p}.layer_norm2"), d, c.layer_norm_eps)?,
            fc1: load_linear(w, &format!("{p}.mlp.fc1"), i, d)?,
            fc2: load_linear(w, &format!("{p}.mlp.fc2"), d, i)?,
            heads: c.num_attention_heads,
        })
    }

    /// x [B, T, D] -> [B, T, D]
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let h = self.layer_norm1.forward(x)?;
        let heads = |y: Tensor| y.reshape((b, t, self.heads, hd))?.transpose(1, 2); // [B, heads, T, hd]
        let attn = if fused(x) && fused_attention::enabled(x.device(), x.dtype()) {
            // cuDNN reads q, k, v through their strides: no copies
            let (q, k, v) = (
                heads(linear(&self.q_proj, &h, false)?)?,
                heads(linear(&self.k_proj, &h, false)?)?,
                heads(linear(&self.v_proj, &h, false)?)?,
            );
            fused_attention::attend_unmasked(&q, &k, &v, (hd as f64).powf(-0.5))?
        } else {
            let split = |y: Tensor| heads(y)?.contiguous();
            let q = split(self.q_proj.forward(&h)?)?;
            let k = split(self.k_proj.forward(&h)?)?;
            let v = split(self.v_proj.forward(&h)?)?;
            let scores = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?.to_dtype(DType::F32)?;
            let probs = if fused(&scores) {
                candle_nn::ops::softmax_last_dim(&scores)?
            } else {
                softmax_last_dim_f32(&scores)?
            };
            let probs = probs.to_dtype(x.dtype())?;
            probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?
        };
        let x = residual_add(x, &linear(&self.out_proj, &attn, false)?)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = linear(&self.fc2, &linear(&self.fc1, &h, true)?, false)?;
        residual_add(&x, &h)
    }
}

pub struct ClipVision {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: Norm,
    layers: Vec<EncoderLayer>,
    pub cfg: ClipVisionConfig,
    #[cfg(feature = "cuda")]
    graphs: crate::model::vision_graph::Graphs,
}

impl ClipVision {
    /// Loads from a CLIP checkpoint directory (`vision_model.*` keys, as in the hub's CLIPModel
    /// and CLIPVisionModel files). Only the layers that feed layer -2 are loaded.
    pub fn load(w: Weights, c: &ClipVisionConfig) -> Result<Self> {
        let w = w.with_prefix_of(
            &["vision_model.", "vision_tower.vision_model.", "model.vision_tower.vision_model.", ""],
            "embeddings.patch_embedding.weight",
        )?;
        let d = c.hidden_size;
        let layers = (0..c.layers_to_run())
            .map(|i| EncoderLayer::load(&w, &format!("encoder.layers.{i}"), c))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embedding: w
                .get("embeddings.patch_embedding.weight", &[d, c.num_channels, c.patch_size, c.patch_size])?,
            class_embedding: w.get("embeddings.class_embedding", &[d])?,
            position_embedding: w.get("embeddings.position_embedding.weight", &[c.num_patches() + 1, d])?,
            pre_layrnorm: Norm::load(&w, "pre_layrnorm", d, c.layer_norm_eps)?,
            layers,
            cfg: c.clone(),
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.patch_embedding.dtype()
    }

    /// `forward`, replayed from a CUDA graph captured for the pixels' shape where it can be
    /// (src/model/vision_graph.rs): the tower is frozen, so nothing needs its graph of ops.
    pub fn forward_frozen(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = self.graphs.forward(self, pixels)? {
            return Ok(y);
        }
        self.forward(pixels)
    }

    /// pixels [B, C, S, S] (normalized) -> patch features [B, N, D] of layer -2, CLS dropped.
    pub fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let b = pixels.dim(0)?;
        let d = self.cfg.hidden_size;
        let pixels = pixels.to_dtype(self.dtype())?;
        let patches = pixels.conv2d(&self.patch_embedding, 0, self.cfg.patch_size, 1, 1)?; // [B, D, g, g]
        let patches = patches.flatten_from(2)?.transpose(1, 2)?; // [B, N, D]
        let cls = self.class_embedding.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        x.narrow(1, 1, self.cfg.num_patches())
    }
}
