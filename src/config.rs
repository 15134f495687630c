//! Model configurations parsed from the real hub files, with transformers' defaults for every key
//! the published files leave out (transformers' configuration_gemma3.py and configuration_clip.py).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// Which kind of attention a decoder layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    Sliding,
    Global,
}

/// The Gemma-3 text model, every value resolved.
#[derive(Debug, Clone)]
pub struct GemmaTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// RoPE base of the global (full-attention) layers.
    pub rope_theta: f64,
    /// Linear RoPE scaling factor of the global layers (1.0 = none).
    pub rope_scaling_factor: f64,
    /// RoPE base of the sliding-window layers (never scaled).
    pub rope_local_base_freq: f64,
    pub sliding_window: usize,
    pub layer_types: Vec<LayerType>,
    pub query_pre_attn_scalar: f64,
    pub final_logit_softcapping: Option<f64>,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
}

impl GemmaTextConfig {
    pub fn attention_scale(&self) -> f64 {
        self.query_pre_attn_scalar.powf(-0.5)
    }

    /// transformers >= 4.52 keeps sqrt(hidden) as a tensor cast to the weight dtype, so in bf16
    /// sqrt(2560) = 50.596 becomes 50.5; the caller rounds it to its dtype.
    pub fn embed_scale(&self) -> f64 {
        (self.hidden_size as f64).sqrt()
    }

    pub fn global_layers(&self) -> Vec<usize> {
        self.layer_types.iter().enumerate().filter(|(_, t)| **t == LayerType::Global).map(|(i, _)| i).collect()
    }
}

/// The language-model side of a Gemma-3 checkpoint directory: the text model plus the ids the
/// multimodal wrapper defines.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    pub text: GemmaTextConfig,
    pub boi_token_index: u32,
    pub eoi_token_index: u32,
    pub image_token_index: u32,
    pub eos_token_ids: Vec<u32>,
}

/// The CLIP vision tower, every value resolved.
#[derive(Debug, Clone)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
    /// LLaVA's `mm_vision_select_layer = -2`: the output of the second-to-last encoder layer,
    /// i.e. how many encoder layers run.
    pub fn layers_to_run(&self) -> usize {
        self.num_hidden_layers - 1
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[derive(Deserialize, Default)]
struct RawText {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_activation: Option<String>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_local_base_freq: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    sliding_window: Option<usize>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    query_pre_attn_scalar: Option<f64>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    attention_bias: Option<bool>,
    use_bidirectional_attention: Option<bool>,
    tie_word_embeddings: Option<bool>,
    pad_token_id: Option<u32>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
}

/// A RoPE setting: (rope_type, factor, theta). Accepts both `"rope_type"` and the older `"type"`.
fn rope_entry(v: &Value, what: &str) -> Result<(String, f64, Option<f64>)> {
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("default").to_string();
    let factor = v.get("factor").and_then(Value::as_f64).unwrap_or(1.0);
    let theta = v.get("rope_theta").and_then(Value::as_f64);
    match kind.as_str() {
        "default" | "linear" => Ok((kind, factor, theta)),
        other => bail!("{what}: rope_type {other:?} is not supported (Gemma 3 uses \"linear\" or \"default\")"),
    }
}

fn parse_text(raw: RawText, what: &str) -> Result<GemmaTextConfig> {
    let num_hidden_layers = raw.num_hidden_layers.unwrap_or(26);
    let act = raw.hidden_activation.or(raw.hidden_act).unwrap_or_else(|| "gelu_pytorch_tanh".into());
    if act != "gelu_pytorch_tanh" {
        bail!("{what}: hidden_activation {act:?} is not supported (Gemma 3 uses \"gelu_pytorch_tanh\")");
    }
    if raw.attention_bias == Some(true) {
        bail!("{what}: attention_bias = true is not supported (Gemma 3 has no attention bias)");
    }
    if raw.attn_logit_softcapping.is_some() {
        bail!(
            "{what}: attn_logit_softcapping is set; Gemma 3 checkpoints leave it null and this build does not apply it"
        );
    }
    if raw.use_bidirectional_attention == Some(true) {
        bail!("{what}: use_bidirectional_attention = true is not supported (causal decoder only)");
    }
    if raw.tie_word_embeddings == Some(false) {
        bail!("{what}: tie_word_embeddings = false is not supported (Gemma 3 ties lm_head to embed_tokens)");
    }

    // transformers 4.x: rope_theta + rope_scaling (global) and rope_local_base_freq (sliding);
    // transformers 5.x: rope_parameters.{full_attention, sliding_attention}.
    let mut rope_theta = raw.rope_theta.unwrap_or(1_000_000.0);
    let mut rope_local = raw.rope_local_base_freq.unwrap_or(10_000.0);
    let mut factor = 1.0;
    if let Some(s) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
        let (_, f, _) = rope_entry(s, &format!("{what}: rope_scaling"))?;
        factor = f;
    }
    if let Some(p) = raw.rope_parameters.as_ref().filter(|v| !v.is_null()) {
        if let Some(full) = p.get("full_attention") {
            let (kind, f, t) = rope_entry(full, &format!("{what}: rope_parameters.full_attention"))?;
            factor = if kind == "linear" { f } else { 1.0 };
            rope_theta = t.unwrap_or(rope_theta);
        }
        if let Some(sl) = p.get("sliding_attention") {
            let (kind, _, t) = rope_entry(sl, &format!("{what}: rope_parameters.sliding_attention"))?;
            if kind != "default" {
                bail!("{what}: rope_parameters.sliding_attention must be unscaled (\"default\"), got {kind:?}");
            }
            rope_local = t.unwrap_or(rope_local);
        }
    }

    let layer_types = match raw.layer_types {
        Some(types) => {
            if types.len() != num_hidden_layers {
                bail!("{what}: layer_types has {} entries but num_hidden_layers is {num_hidden_layers}", types.len());
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "sliding_attention" => Ok(LayerType::Sliding),
                    "full_attention" => Ok(LayerType::Global),
                    o => bail!("{what}: unknown layer type {o:?} in layer_types"),
                })
                .collect::<Result<Vec<_>>>()?
        }
        None => {
            let pattern = raw.sliding_window_pattern.unwrap_or(6);
            if pattern == 0 {
                bail!("{what}: sliding_window_pattern must be at least 1");
            }
            (0..num_hidden_layers)
                .map(|i| if (i + 1) % pattern != 0 { LayerType::Sliding } else { LayerType::Global })
                .collect()
        }
    };

    let cfg = GemmaTextConfig {
        vocab_size: raw.vocab_size.unwrap_or(262_208),
        hidden_size: raw.hidden_size.unwrap_or(2304),
        intermediate_size: raw.intermediate_size.unwrap_or(9216),
        num_hidden_layers,
        num_attention_heads: raw.num_attention_heads.unwrap_or(8),
        num_key_value_heads: raw.num_key_value_heads.unwrap_or(4),
        head_dim: raw.head_dim.unwrap_or(256),
        max_position_embeddings: raw.max_position_embeddings.unwrap_or(131_072),
        rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
        rope_theta,
        rope_scaling_factor: factor,
        rope_local_base_freq: rope_local,
        sliding_window: raw.sliding_window.unwrap_or(4096),
        layer_types,
        query_pre_attn_scalar: raw.query_pre_attn_scalar.unwrap_or(256.0),
        final_logit_softcapping: raw.final_logit_softcapping,
        pad_token_id: raw.pad_token_id.unwrap_or(0),
        bos_token_id: raw.bos_token_id.unwrap_or(2),
    };
    for (k, v) in [
        ("vocab_size", cfg.vocab_size),
        ("hidden_size", cfg.hidden_size),
        ("intermediate_size", cfg.intermediate_size),
        ("num_hidden_layers", cfg.num_hidden_layers),
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
        ("head_dim", cfg.head_dim),
        ("sliding_window", cfg.sliding_window),
    ] {
        if v == 0 {
            bail!("{what}: {k} must be at least 1, got 0");
        }
    }
    for (k, v) in [
        ("rms_norm_eps", cfg.rms_norm_eps),
        ("rope_theta", cfg.rope_theta),
        ("rope_local_base_freq", cfg.rope_local_base_freq),
        ("query_pre_attn_scalar", cfg.query_pre_attn_scalar),
        ("rope_scaling.factor", cfg.rope_scaling_factor),
    ] {
        if !(v.is_finite() && v > 0.0) {
            bail!("{what}: {k} must be a positive number, got {v}");
        }
    }
    if !cfg.num_attention_heads.is_multiple_of(cfg.num_key_value_heads) {
        bail!(
            "{what}: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
            cfg.num_attention_heads,
            cfg.num_key_value_heads
        );
    }
    if !cfg.head_dim.is_multiple_of(2) {
        bail!("{what}: head_dim must be even for RoPE, got {}", cfg.head_dim);
    }
    Ok(cfg)
}

fn ids(v: Option<&Value>) -> Option<Vec<u32>> {
    match v? {
        Value::Number(n) => Some(vec![n.as_u64()? as u32]),
        Value::Array(a) => a.iter().map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

impl LlmConfig {
    /// Parses a Gemma-3 `config.json`: the multimodal form (`model_type: "gemma3"`, text keys under
    /// `text_config`) or the text-only form (`model_type: "gemma3_text"`).
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(&read_json(path)?, &path.display().to_string())
    }

    pub fn from_value(v: &Value, what: &str) -> Result<Self> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let text_value = match model_type {
            "gemma3" => v.get("text_config").cloned().unwrap_or(Value::Object(Default::default())),
            "gemma3_text" => v.clone(),
            other => {
                bail!("{what}: model_type {other:?} is not a Gemma 3 model (expected \"gemma3\" or \"gemma3_text\")")
            }
        };
        let raw: RawText = serde_json::from_value(text_value).with_context(|| format!("{what}: bad text_config"))?;
        let text_eos = ids(raw.eos_token_id.as_ref());
        let text = parse_text(raw, what)?;
        let get_id = |k: &str, d: u32| v.get(k).and_then(Value::as_u64).map(|x| x as u32).unwrap_or(d);
        let cfg = LlmConfig {
            boi_token_index: get_id("boi_token_index", 255_999),
            eoi_token_index: get_id("eoi_token_index", 256_000),
            image_token_index: get_id("image_token_index", 262_144),
            eos_token_ids: ids(v.get("eos_token_id")).or(text_eos).unwrap_or_else(|| vec![1]),
            text,
        };
        for (k, id) in [
            ("boi_token_index", cfg.boi_token_index),
            ("eoi_token_index", cfg.eoi_token_index),
            ("image_token_index", cfg.image_token_index),
        ] {
            if id as usize >= cfg.text.vocab_size {
                bail!("{what}: {k} {id} is outside the vocabulary ({} rows)", cfg.text.vocab_size);
            }
        }
        Ok(cfg)
    }
}

#[derive(Deserialize, Default)]
struct RawVision {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_channels: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
}

impl ClipVisionConfig {
    /// Parses a CLIP `config.json`: the full CLIPModel form (`model_type: "clip"`, vision keys under
    /// `vision_config`) or a bare `clip_vision_model` config.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(&read_json(path)?, &path.display().to_string())
    }

    pub fn from_value(v: &Value, what: &str) -> Result<Self> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let vision = match model_type {
            "clip" => v.get("vision_config").cloned().unwrap_or(Value::Object(Default::default())),
            "clip_vision_model" => v.clone(),
            other => {
                bail!("{what}: model_type {other:?} is not a CLIP model (expected \"clip\" or \"clip_vision_model\")")
            }
        };
        let raw: RawVision = serde_json::from_value(vision).with_context(|| format!("{what}: bad vision_config"))?;
        let act = raw.hidden_act.unwrap_or_else(|| "quick_gelu".into());
        if act != "quick_gelu" {
            bail!("{what}: vision hidden_act {act:?} is not supported (OpenAI CLIP uses \"quick_gelu\")");
        }
        let cfg = ClipVisionConfig {
            hidden_size: raw.hidden_size.unwrap_or(768),
            intermediate_size: raw.intermediate_size.unwrap_or(3072),
            num_hidden_layers: raw.num_hidden_layers.unwrap_or(12),
            num_attention_heads: raw.num_attention_heads.unwrap_or(12),
            num_channels: raw.num_channels.unwrap_or(3),
            image_size: raw.image_size.unwrap_or(224),
            patch_size: raw.patch_size.unwrap_or(32),
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-5),
        };
        for (k, v) in [
            ("hidden_size", cfg.hidden_size),
            ("intermediate_size", cfg.intermediate_size),
            ("num_attention_heads", cfg.num_attention_heads),
            ("num_channels", cfg.num_channels),
            ("image_size", cfg.image_size),
            ("patch_size", cfg.patch_size),
        ] {
            if v == 0 {
                bail!("{what}: {k} must be at least 1, got 0");
            }
        }
        if !(cfg.layer_norm_eps.is_finite() && cfg.layer_norm_eps > 0.0) {
            bail!("{what}: layer_norm_eps must be a positive number, got {}", cfg.layer_norm_eps);
        }
        if cfg.num_hidden_layers < 2 {
            bail!("{what}: the vision tower needs at least 2 layers (features come from the second-to-last)");
        }
        if !cfg.image_size.is_multiple_of(cfg.patch_size) || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            bail!("{what}: image_size must be a multiple of patch_size and hidden_size of num_attention_heads");
        }
        Ok(cfg)
    }
}
