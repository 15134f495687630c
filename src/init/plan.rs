//! The tensors of a checkpoint in the hub's names and shapes, each with how `init` draws it.

use crate::config::{ClipVisionConfig, GemmaTextConfig};
use crate::safetensors_out::{StDtype, TensorEntry};

/// How a random tensor is drawn: N(mean, std^2).
#[derive(Debug, Clone, Copy)]
pub struct Draw {
    pub mean: f32,
    pub std: f32,
}

#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub entry: TensorEntry,
    pub draw: Draw,
}

fn t(name: String, shape: &[usize], dtype: StDtype, mean: f32, std: f32) -> PlannedTensor {
    PlannedTensor { entry: TensorEntry { name, shape: shape.to_vec(), dtype }, draw: Draw { mean, std } }
}

/// Weight scaled like a trained linear layer: std 1/sqrt(fan_in).
fn linear(name: String, out_f: usize, in_f: usize, dtype: StDtype) -> PlannedTensor {
    t(name, &[out_f, in_f], dtype, 0.0, 1.0 / (in_f as f32).sqrt())
}

/// Gemma-3 language model, as `Gemma3ForConditionalGeneration` checkpoints on the hub name it
/// (`language_model.model.*`, 13 tensors per layer, no lm_head since it is tied). Norm weights are
/// random, not the zeros of a fresh model, so a wrong `(1 + w)` cannot hide.
pub fn gemma_tensors(c: &GemmaTextConfig, dtype: StDtype) -> Vec<PlannedTensor> {
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (nq, nkv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let p = "language_model.model";
    let norm = |name: String, d: usize| t(name, &[d], dtype, 0.0, 0.3);
    let mut v = vec![t(format!("{p}.embed_tokens.weight"), &[c.vocab_size, h], dtype, 0.0, 1.0 / (h as f32).sqrt())];
    for l in 0..c.num_hidden_layers {
        let q = format!("{p}.layers.{l}");
        v.push(norm(format!("{q}.input_layernorm.weight"), h));
        v.push(linear(format!("{q}.mlp.down_proj.weight"), h, i, dtype));
        v.push(linear(format!("{q}.mlp.gate_proj.weight"), i, h, dtype));
        v.push(linear(format!("{q}.mlp.up_proj.weight"), i, h, dtype));
        v.push(norm(format!("{q}.post_attention_layernorm.weight"), h));
        v.push(norm(format!("{q}.post_feedforward_layernorm.weight"), h));
        v.push(norm(format!("{q}.pre_feedforward_layernorm.weight"), h));
        v.push(norm(format!("{q}.self_attn.k_norm.weight"), hd));
        v.push(linear(format!("{q}.self_attn.k_proj.weight"), nkv, h, dtype));
        v.push(linear(format!("{q}.self_attn.o_proj.weight"), h, nq, dtype));
        v.push(norm(format!("{q}.self_attn.q_norm.weight"), hd));
        v.push(linear(format!("{q}.self_attn.q_proj.weight"), nq, h, dtype));
        v.push(linear(format!("{q}.self_attn.v_proj.weight"), nkv, h, dtype));
    }
    v.push(norm(format!("{p}.norm.weight"), h));
    v
}

/// CLIP vision tower with `vision_model.*` keys, as in the hub's CLIPModel checkpoint.
pub fn clip_tensors(c: &ClipVisionConfig, dtype: StDtype) -> Vec<PlannedTensor> {
    let (d, i, ch, ps) = (c.hidden_size, c.intermediate_size, c.num_channels, c.patch_size);
    let p = "vision_model";
    let ln = |name: &str| {
        [t(format!("{name}.weight"), &[d], dtype, 1.0, 0.1), t(format!("{name}.bias"), &[d], dtype, 0.0, 0.05)]
    };
    let bias = |name: String, n: usize| t(name, &[n], dtype, 0.0, 0.02);
    let mut v = vec![
        t(format!("{p}.embeddings.class_embedding"), &[d], dtype, 0.0, 1.0),
        t(
            format!("{p}.embeddings.patch_embedding.weight"),
            &[d, ch, ps, ps],
            dtype,
            0.0,
            1.0 / ((ch * ps * ps) as f32).sqrt(),
        ),
        t(format!("{p}.embeddings.position_embedding.weight"), &[c.num_patches() + 1, d], dtype, 0.0, 0.1),
    ];
    v.extend(ln(&format!("{p}.pre_layrnorm")));
    for l in 0..c.num_hidden_layers {
        let q = format!("{p}.encoder.layers.{l}");
        v.extend(ln(&format!("{q}.layer_norm1")));
        v.extend(ln(&format!("{q}.layer_norm2")));
        v.push(linear(format!("{q}.mlp.fc1.weight"), i, d, dtype));
        v.push(bias(format!("{q}.mlp.fc1.bias"), i));
        v.push(linear(format!("{q}.mlp.fc2.weight"), d, i, dtype));
        v.push(bias(format!("{q}.mlp.fc2.bias"), d));
        for proj in ["k_proj", "out_proj", "q_proj", "v_proj"] {
            v.push(linear(format!("{q}.self_attn.{proj}.weight"), d, d, dtype));
            v.push(bias(format!("{q}.self_attn.{proj}.bias"), d));
        }
    }
    v.extend(ln(&format!("{p}.post_layernorm")));
    v
}
