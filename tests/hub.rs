//! Model and dataset sources: directories, hub ids found in the Hugging Face cache layout that
//! `huggingface-cli download` leaves, what counts as a complete snapshot, and the offline switch.
//! (Downloads are tested against an emulated hub in `hub_download.rs`.)

mod common;

use gemmaclip::hub::{resolve_dataset, resolve_model};

#[test]
fn hub_ids_resolve_through_the_cache_and_offline_mode_says_so() {
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HUB_CACHE", cache.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    // a snapshot in the hub cache layout: models--org--name/{refs/main, snapshots/<sha>/...}
    let base = cache.path().join("models--google--gemma-3-4b-it");
    let snap = base.join("snapshots/0123abcd");
    std::fs::create_dir_all(base.join("refs")).unwrap();
    std::fs::write(base.join("refs/main"), "0123abcd").unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(common::tiny_dir().join("llm").join(f), snap.join(f)).unwrap();
    }
    assert_eq!(resolve_model("google/gemma-3-4b-it", "--model").unwrap(), snap);

    let data = cache.path().join("datasets--derek-thomas--ScienceQA");
    let dsnap = data.join("snapshots/feed");
    std::fs::create_dir_all(data.join("refs")).unwrap();
    std::fs::write(data.join("refs/main"), "feed\n").unwrap();
    std::fs::create_dir_all(dsnap.join("data")).unwrap();
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/scienceqa-sample");
    for (split, name) in [
        ("train", "train-00000-of-00001-1028f23e353fbe3e"),
        ("validation", "validation-00000-of-00001-6c7328ff6c84284c"),
        ("test", "test-00000-of-00001-f0e719df791966ff"),
    ] {
        std::fs::copy(sample.join(format!("{split}.parquet")), dsnap.join(format!("data/{name}.parquet"))).unwrap();
    }
    let d = resolve_dataset("derek-thomas/ScienceQA", "--data").unwrap();
    assert_eq!(d, dsnap);
    let f = gemmaclip::data::scienceqa::split_file(&d, "test").unwrap();
    assert!(f.ends_with("data/test-00000-of-00001-f0e719df791966ff.parquet"));

    // not cached, offline: one clear line naming the flag and the reason
    let e = resolve_model("openai/clip-vit-large-patch14-336", "--vision-model").unwrap_err().to_string();
    assert!(e.contains("--vision-model openai/clip-vit-large-patch14-336") && e.contains("HF_HUB_OFFLINE"), "{e}");
    // HF_HUB_OFFLINE takes Python's true values, in any case
    for on in ["1", "on", "YES", "True"] {
        std::env::set_var("HF_HUB_OFFLINE", on);
        let e = resolve_model("openai/clip-vit-large-patch14-336", "--vision-model").unwrap_err().to_string();
        assert!(e.contains("HF_HUB_OFFLINE is set"), "{on}: {e}");
    }

    // interrupted downloads are not taken for a model; offline, the message names what is missing
    let lacks = |what: &str| {
        let e = resolve_model("google/gemma-3-4b-it", "--model").unwrap_err().to_string();
        assert!(e.starts_with("--model google/gemma-3-4b-it: the cached snapshot") && e.contains(what), "{e}");
        assert!(e.contains("HF_HUB_OFFLINE") && !e.contains('\n'), "{e}");
    };
    std::fs::remove_file(snap.join("tokenizer.json")).unwrap();
    lacks("tokenizer.json");
    std::fs::copy(common::tiny_dir().join("llm/tokenizer.json"), snap.join("tokenizer.json")).unwrap();
    // hf-hub fetches in listing order: the first shard can land before the index
    std::fs::rename(snap.join("model.safetensors"), snap.join("model-00001-of-00002.safetensors")).unwrap();
    lacks("model.safetensors.index.json");
    let index = serde_json::json!({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}});
    std::fs::write(snap.join("model.safetensors.index.json"), index.to_string()).unwrap();
    lacks("model-00002-of-00002.safetensors");
    std::fs::remove_file(snap.join("model.safetensors.index.json")).unwrap();
    std::fs::remove_file(snap.join("model-00001-of-00002.safetensors")).unwrap();
    lacks("the weights");

    // a CLIP snapshot needs its preprocessor_config.json (else the image settings would silently
    // be built-in values) and takes PyTorch weights where it has no safetensors
    let clip = cache.path().join("models--openai--clip-vit-large-patch14-336");
    let csnap = clip.join("snapshots/c0ffee");
    std::fs::create_dir_all(clip.join("refs")).unwrap();
    std::fs::write(clip.join("refs/main"), "c0ffee").unwrap();
    std::fs::create_dir_all(&csnap).unwrap();
    std::fs::copy(common::tiny_dir().join("vision/config.json"), csnap.join("config.json")).unwrap();
    std::fs::copy(common::fixture_path("clip_bin/pytorch_model.bin"), csnap.join("pytorch_model.bin")).unwrap();
    let e = resolve_model("openai/clip-vit-large-patch14-336", "--vision-model").unwrap_err().to_string();
    assert!(e.contains("preprocessor_config.json") && !e.contains("weights"), "{e}");
    std::fs::copy(common::tiny_dir().join("vision/preprocessor_config.json"), csnap.join("preprocessor_config.json"))
        .unwrap();
    assert_eq!(resolve_model("openai/clip-vit-large-patch14-336", "--vision-model").unwrap(), csnap);

    // a path that does not exist is not mistaken for a hub id
    let e = resolve_model("./models/gemma", "--model").unwrap_err().to_string();
    assert!(e.contains("no such directory"), "{e}");
}
