//! The real published configs parse with transformers' defaults filled in.

use gemmaclip::config::{ClipVisionConfig, LayerType, LlmConfig};
use std::path::Path;

fn configs() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/configs"))
}

#[test]
fn gemma_3_4b_it_sparse_config_gets_transformers_defaults() {
    let c = LlmConfig::from_file(&configs().join("gemma-3-4b-it/config.json")).unwrap();
    let t = &c.text;
    assert_eq!((t.hidden_size, t.intermediate_size, t.num_hidden_layers), (2560, 10240, 34));
    assert_eq!((t.num_attention_heads, t.num_key_value_heads, t.head_dim), (8, 4, 256));
    assert_eq!(t.vocab_size, 262_208);
    assert_eq!(t.query_pre_attn_scalar, 256.0);
    assert_eq!(t.attention_scale(), 1.0 / 16.0);
    assert_eq!(t.rms_norm_eps, 1e-6);
    assert_eq!(t.global_layers(), vec![5, 11, 17, 23, 29]);
    assert_eq!(t.layer_types.iter().filter(|l| **l == LayerType::Sliding).count(), 29);
    assert_eq!((t.rope_theta, t.rope_scaling_factor, t.rope_local_base_freq), (1e6, 8.0, 1e4));
    assert_eq!(t.sliding_window, 1024);
    assert_eq!(t.final_logit_softcapping, None);
    assert_eq!(t.max_position_embeddings, 131_072);
    assert_eq!((c.boi_token_index, c.eoi_token_index, c.image_token_index), (255_999, 256_000, 262_144));
    assert_eq!(c.eos_token_ids, vec![1, 106]);
    // transformers >= 4.52 rounds sqrt(2560) to the bf16 embedding dtype
    assert_eq!(half::bf16::from_f64(t.embed_scale()).to_f32(), 50.5);
}

#[test]
fn clip_vit_large_patch14_336_gives_576_image_tokens_from_layer_23() {
    let c = ClipVisionConfig::from_file(&configs().join("clip-vit-large-patch14-336/config.json")).unwrap();
    assert_eq!((c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads), (1024, 4096, 24, 16));
    assert_eq!((c.image_size, c.patch_size, c.head_dim()), (336, 14, 64));
    assert_eq!(c.num_patches(), 576);
    assert_eq!(c.layers_to_run(), 23);
    assert_eq!(c.layer_norm_eps, 1e-5);
}

#[test]
fn transformers_5_rope_parameters_and_layer_types_forms_parse_alike() {
    let v = serde_json::json!({
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
        "sliding_window": 1024,
        "layer_types": (0..34).map(|i| if (i + 1) % 6 == 0 { "full_attention" } else { "sliding_attention" }).collect::<Vec<_>>(),
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}
        }
    });
    let c = LlmConfig::from_value(&v, "inline").unwrap();
    let real = LlmConfig::from_file(&configs().join("gemma-3-4b-it/config.json")).unwrap();
    assert_eq!(c.text.layer_types, real.text.layer_types);
    assert_eq!(
        (c.text.rope_theta, c.text.rope_scaling_factor, c.text.rope_local_base_freq),
        (real.text.rope_theta, real.text.rope_scaling_factor, real.text.rope_local_base_freq)
    );
}

#[test]
fn unsupported_or_inconsistent_configs_are_rejected_with_the_key_named() {
    let bad = [
        (serde_json::json!({"model_type": "llama"}), "model_type"),
        (
            serde_json::json!({"model_type": "gemma3_text", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
            "yarn",
        ),
        (
            serde_json::json!({"model_type": "gemma3_text", "num_hidden_layers": 2, "layer_types": ["full_attention"]}),
            "layer_types",
        ),
        (
            serde_json::json!({"model_type": "gemma3_text", "num_attention_heads": 6, "num_key_value_heads": 4}),
            "num_key_value_heads",
        ),
        (serde_json::json!({"model_type": "gemma3_text", "hidden_activation": "silu"}), "hidden_activation"),
        (serde_json::json!({"model_type": "gemma3", "image_token_index": 999999}), "image_token_index"),
    ];
    for (v, key) in bad {
        let err = LlmConfig::from_value(&v, "cfg.json").unwrap_err().to_string();
        assert!(err.contains(key) && err.starts_with("cfg.json"), "{err}");
    }
    let err = ClipVisionConfig::from_value(&serde_json::json!({"model_type": "siglip"}), "v.json").unwrap_err();
    assert!(err.to_string().contains("model_type"), "{err}");
}
