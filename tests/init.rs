//! `gemmaclip init`: hub layout, names and shapes (the 4B checked from its headers without
//! writing 8 GB), determinism, and clear errors on bad checkpoints.

mod common;

use candle_core::{DType, Device};
use common::tiny_dir;
use gemmaclip::config::{ClipVisionConfig, LlmConfig};
use gemmaclip::init::{init, plan, Preset, MAX_SHARD_BYTES};
use gemmaclip::model::clip::ClipVision;
use gemmaclip::model::gemma3::{BaseFormat, Gemma3Text};
use gemmaclip::safetensors_out::{header_bytes, plan_shards, shard_file_names, StDtype};
use gemmaclip::weights::Weights;
use std::collections::BTreeMap;
use std::process::Command;

/// Parses the headers `init` would write for these planned tensors, as a reader of the files would.
/// (dtype, shape) per tensor name
type Header = BTreeMap<String, (String, Vec<usize>)>;

fn headers(tensors: &[plan::PlannedTensor]) -> (Vec<String>, Header) {
    let entries: Vec<_> = tensors.iter().map(|t| t.entry.clone()).collect();
    let shards = plan_shards(&entries, MAX_SHARD_BYTES);
    let mut all = BTreeMap::new();
    for shard in &shards {
        // header only: the length prefix, then JSON whose data offsets tile the data section
        let bytes = header_bytes(shard);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n + 8, bytes.len());
        assert_eq!(n % 8, 0);
        let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..]).unwrap();
        let mut spans = vec![];
        for (name, info) in json.iter().filter(|(k, _)| *k != "__metadata__") {
            let dtype = info["dtype"].as_str().unwrap().to_string();
            let shape: Vec<usize> =
                info["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            let off: Vec<usize> =
                info["data_offsets"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            let size = if dtype == "BF16" { 2 } else { 4 };
            assert_eq!(off[1] - off[0], shape.iter().product::<usize>() * size, "{name}");
            spans.push((off[0], off[1]));
            all.insert(name.clone(), (dtype, shape));
        }
        spans.sort();
        assert_eq!(spans[0].0, 0);
        assert!(spans.windows(2).all(|w| w[0].1 == w[1].0), "data offsets tile the data section");
    }
    (shard_file_names(shards.len()), all)
}

#[test]
fn gemma_3_4b_it_preset_has_the_hub_names_and_shapes() {
    let cfg = LlmConfig::from_file(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/gemma-3-4b-it/config.json"
    )))
    .unwrap();
    let planned = plan::gemma_tensors(&cfg.text, StDtype::BF16);
    let (files, keys) = headers(&planned);
    assert_eq!(files, vec!["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
    assert_eq!(keys.len(), 2 + 34 * 13);
    let shape = |k: &str| keys.get(k).unwrap_or_else(|| panic!("missing {k}")).1.clone();
    assert_eq!(shape("language_model.model.embed_tokens.weight"), vec![262_208, 2560]);
    assert_eq!(shape("language_model.model.norm.weight"), vec![2560]);
    for l in [0, 5, 33] {
        let p = format!("language_model.model.layers.{l}");
        for (suffix, s) in [
            ("input_layernorm.weight", vec![2560]),
            ("post_attention_layernorm.weight", vec![2560]),
            ("pre_feedforward_layernorm.weight", vec![2560]),
            ("post_feedforward_layernorm.weight", vec![2560]),
            ("self_attn.q_proj.weight", vec![2048, 2560]),
            ("self_attn.k_proj.weight", vec![1024, 2560]),
            ("self_attn.v_proj.weight", vec![1024, 2560]),
            ("self_attn.o_proj.weight", vec![2560, 2048]),
            ("self_attn.q_norm.weight", vec![256]),
            ("self_attn.k_norm.weight", vec![256]),
            ("mlp.gate_proj.weight", vec![10240, 2560]),
            ("mlp.up_proj.weight", vec![10240, 2560]),
            ("mlp.down_proj.weight", vec![2560, 10240]),
        ] {
            assert_eq!(shape(&format!("{p}.{suffix}")), s, "{p}.{suffix}");
        }
    }
    assert!(keys.values().all(|(d, _)| d == "BF16"));
    assert!(!keys.keys().any(|k| k.contains("lm_head")), "lm_head is tied, the hub files do not store it");
    let total: usize = planned.iter().map(|t| t.entry.bytes()).sum();
    assert_eq!(total, 2 * 3_880_263_168, "parameters of Gemma-3-4B's language model");
}

#[test]
fn clip_vit_large_preset_has_the_hub_names_and_shapes() {
    let cfg = ClipVisionConfig::from_file(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/clip-vit-large-patch14-336/config.json"
    )))
    .unwrap();
    let (files, keys) = headers(&plan::clip_tensors(&cfg, StDtype::BF16));
    assert_eq!(files, vec!["model.safetensors"]);
    assert_eq!(keys.len(), 7 + 24 * 16);
    let shape = |k: &str| keys[k].1.clone();
    assert_eq!(shape("vision_model.embeddings.class_embedding"), vec![1024]);
    assert_eq!(shape("vision_model.embeddings.patch_embedding.weight"), vec![1024, 3, 14, 14]);
    assert_eq!(shape("vision_model.embeddings.position_embedding.weight"), vec![577, 1024]);
    assert_eq!(shape("vision_model.pre_layrnorm.weight"), vec![1024]);
    assert_eq!(shape("vision_model.encoder.layers.23.mlp.fc1.weight"), vec![4096, 1024]);
    assert_eq!(shape("vision_model.encoder.layers.23.mlp.fc2.weight"), vec![1024, 4096]);
    assert_eq!(shape("vision_model.encoder.layers.0.self_attn.out_proj.bias"), vec![1024]);
    assert_eq!(shape("vision_model.post_layernorm.bias"), vec![1024]);
}

#[test]
fn tiny_preset_writes_the_hub_layout_deterministically() {
    let a = tiny_dir();
    for f in [
        "llm/config.json",
        "llm/model.safetensors",
        "llm/tokenizer.json",
        "llm/tokenizer_config.json",
        "llm/special_tokens_map.json",
        "llm/generation_config.json",
        "vision/config.json",
        "vision/model.safetensors",
        "vision/preprocessor_config.json",
    ] {
        assert!(a.join(f).is_file(), "{f}");
    }
    let again = tempfile::tempdir().unwrap();
    init(Preset::Tiny, again.path(), 0).unwrap();
    let other = tempfile::tempdir().unwrap();
    init(Preset::Tiny, other.path(), 1).unwrap();
    for f in ["llm/model.safetensors", "vision/model.safetensors"] {
        let bytes = std::fs::read(a.join(f)).unwrap();
        assert_eq!(bytes, std::fs::read(again.path().join(f)).unwrap(), "same seed, same bytes: {f}");
        assert_ne!(bytes, std::fs::read(other.path().join(f)).unwrap(), "another seed, other weights: {f}");
    }
    // no temporary files left behind
    for d in ["llm", "vision"] {
        for e in std::fs::read_dir(a.join(d)).unwrap() {
            assert!(!e.unwrap().file_name().to_string_lossy().contains(".tmp"));
        }
    }
    // Gemma's special ids, and the image tokens where the config says
    let tok = tokenizers::Tokenizer::from_file(a.join("llm/tokenizer.json")).unwrap();
    let cfg = LlmConfig::from_file(&a.join("llm/config.json")).unwrap();
    for (t, id) in [
        ("<pad>", 0),
        ("<eos>", 1),
        ("<bos>", 2),
        ("<start_of_turn>", 105),
        ("<end_of_turn>", 106),
        ("<start_of_image>", cfg.boi_token_index),
        ("<end_of_image>", cfg.eoi_token_index),
        ("<image_soft_token>", cfg.image_token_index),
    ] {
        assert_eq!(tok.token_to_id(t), Some(id), "{t}");
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn one_line(e: anyhow::Error) -> String {
    let s = e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ");
    assert!(!s.contains('\n'), "{s}");
    s
}

#[test]
fn bad_checkpoints_give_one_line_naming_the_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let llm = tmp.path().join("llm");
    copy_dir(&tiny_dir().join("llm"), &llm);
    let cfg = LlmConfig::from_file(&llm.join("config.json")).unwrap();
    let load = |cfg: &LlmConfig| {
        Weights::open(&llm, DType::F32, &Device::Cpu)
            .and_then(|w| Gemma3Text::load(w, &cfg.text, BaseFormat::Dense))
            .map(|_| ())
    };
    assert!(load(&cfg).is_ok());

    // a config that does not match the weights
    let mut wrong = cfg.clone();
    wrong.text.intermediate_size = 96;
    let e = one_line(load(&wrong).unwrap_err());
    assert!(e.contains("layers.0.mlp.gate_proj.weight") && e.contains("[128, 64]") && e.contains("[96, 64]"), "{e}");

    // a missing tensor
    let path = llm.join("model.safetensors");
    let mut ts = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    ts.remove("language_model.model.layers.3.self_attn.k_norm.weight");
    candle_core::safetensors::save(&ts, &path).unwrap();
    let e = one_line(load(&cfg).unwrap_err());
    assert!(e.contains("language_model.model.layers.3.self_attn.k_norm.weight") && e.contains("missing"), "{e}");

    // a missing file
    std::fs::remove_file(&path).unwrap();
    let e = one_line(load(&cfg).unwrap_err());
    assert!(e.contains(&llm.display().to_string()) && e.contains("model.safetensors"), "{e}");

    // a corrupt file
    std::fs::write(&path, b"not a safetensors file").unwrap();
    let e = one_line(load(&cfg).unwrap_err());
    assert!(e.contains("model.safetensors") || e.contains(&llm.display().to_string()), "{e}");

    // the vision tower pointed at the language model
    let vcfg = ClipVisionConfig::from_file(&tiny_dir().join("vision/config.json")).unwrap();
    let w = Weights::open(&tiny_dir().join("llm"), DType::F32, &Device::Cpu).unwrap();
    let e = one_line(ClipVision::load(w, &vcfg).err().unwrap());
    assert!(e.contains("embeddings.patch_embedding.weight"), "{e}");
    let e = one_line(LlmConfig::from_file(&tmp.path().join("nope/config.json")).unwrap_err());
    assert!(e.contains("nope/config.json"), "{e}");
}

#[test]
fn cli_rejects_an_unknown_preset_and_a_file_as_output_dir() {
    let exe = env!("CARGO_BIN_EXE_gemmaclip");
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(exe).args(["init", "--preset", "gemma-9b", "--out"]).arg(tmp.path()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--preset"));

    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = Command::new(exe).args(["init", "--preset", "tiny", "--out"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--out") && err.contains("a-file"), "{err}");
}
