//! Downloads from an emulated hub (`hub_fake`, on 127.0.0.1): only the files the loaders read,
//! interrupted snapshots completed, a dropped connection retried, failures told apart, the token
//! found where Python's huggingface_hub finds it. The environment is process-wide, so every test
//! holds `ENV` while it runs.

mod common;
mod hub_fake;

use candle_core::{DType, Device, Tensor};
use common::tiny_dir;
use gemmaclip::hub::{resolve_dataset, resolve_model};
use gemmaclip::weights::Weights;
use hub_fake::{dead_endpoint, FakeHub, Mode};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

static ENV: Mutex<()> = Mutex::new(());

const GEMMA: &str = "google/gemma-3-4b-it";
const CLIP: &str = "openai/clip-vit-large-patch14-336";
const SHA: &str = "5d6e7f80a1b2c3d4e5f60718293a4b5c6d7e8f90";

/// A clean Hugging Face environment pointing at `endpoint`, with its own cache and HF_HOME.
struct Env {
    cache: tempfile::TempDir,
    home: tempfile::TempDir,
    _lock: MutexGuard<'static, ()>,
}

fn env(endpoint: &str) -> Env {
    let lock = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let (cache, home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::env::set_var("HF_ENDPOINT", endpoint);
    std::env::set_var("HF_HUB_CACHE", cache.path());
    std::env::set_var("HF_HOME", home.path());
    for v in ["HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE"] {
        std::env::remove_var(v);
    }
    Env { cache, home, _lock: lock }
}

impl Env {
    fn snapshot(&self, repo: &str) -> PathBuf {
        self.cache.path().join(format!("models--{}", repo.replace('/', "--"))).join("snapshots").join(SHA)
    }
}

/// The error as main prints it: the chain joined with ": ".
fn message(e: anyhow::Error) -> String {
    e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn file(name: &str, bytes: Vec<u8>) -> (String, Vec<u8>) {
    (name.to_string(), bytes)
}

/// The tiny Gemma as the hub has the real one: two safetensors shards and their index.
fn gemma_files() -> Vec<(String, Vec<u8>)> {
    let llm = tiny_dir().join("llm");
    let tensors = candle_core::safetensors::load(llm.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let tmp = tempfile::tempdir().unwrap();
    let mut weight_map = serde_json::Map::new();
    let mut shards = Vec::new();
    for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let shard = format!("model-{:05}-of-00002.safetensors", i + 1);
        let part: HashMap<String, Tensor> = part.iter().map(|n| (n.to_string(), tensors[*n].clone())).collect();
        candle_core::safetensors::save(&part, tmp.path().join(&shard)).unwrap();
        weight_map.extend(part.keys().map(|n| (n.clone(), shard.clone().into())));
        shards.push(file(&shard, read(&tmp.path().join(&shard))));
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    let mut files = vec![file(".gitattributes", b"*.safetensors filter=lfs\n".to_vec())];
    files.extend(shards); // listing order: the shards come before their index, as on the hub
    files.push(file("model.safetensors.index.json", index.to_string().into_bytes()));
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        files.push(file(f, read(&llm.join(f))));
    }
    files
}

fn assert_same_weights(snap: &Path) {
    let w = Weights::open(snap, DType::F32, &Device::Cpu).unwrap();
    let reference = candle_core::safetensors::load(tiny_dir().join("llm/model.safetensors"), &Device::Cpu).unwrap();
    for (name, t) in &reference {
        let got = w.get_as(name, t.dims(), t.dtype()).unwrap();
        let diff = (got - t).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }
}

/// A snapshot as an interrupted download leaves it: `files` of the repository, refs/main set.
fn seed_snapshot(e: &Env, repo: &str, files: &[(String, Vec<u8>)], keep: &[&str]) -> PathBuf {
    let snap = e.snapshot(repo);
    std::fs::create_dir_all(&snap).unwrap();
    for (name, bytes) in files.iter().filter(|(n, _)| keep.contains(&n.as_str())) {
        std::fs::write(snap.join(name), bytes).unwrap();
    }
    let refs = snap.parent().unwrap().parent().unwrap().join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join("main"), SHA).unwrap();
    snap
}

#[test]
fn an_interrupted_sharded_download_is_completed_not_taken() {
    let hub = FakeHub::start();
    let files = gemma_files();
    hub.add_repo(&format!("models/{GEMMA}"), SHA, files.clone());
    let e = env(&hub.endpoint);
    let snap = seed_snapshot(&e, GEMMA, &files, &["model-00001-of-00002.safetensors", "config.json", "tokenizer.json"]);

    std::env::set_var("HF_HUB_OFFLINE", "1");
    let m = message(resolve_model(GEMMA, "--model").unwrap_err());
    assert!(m.contains("lacks model.safetensors.index.json"), "{m}");
    assert!(hub.seen().is_empty());

    std::env::remove_var("HF_HUB_OFFLINE");
    assert_eq!(resolve_model(GEMMA, "--model").unwrap(), snap);
    // what was there is not fetched again; the index comes before the shard it names
    assert_eq!(
        hub.fetched(),
        ["tokenizer_config.json", "model.safetensors.index.json", "model-00002-of-00002.safetensors"]
    );
    assert_same_weights(&snap);
    // complete now: no request at all
    hub.clear_seen();
    assert_eq!(resolve_model(GEMMA, "--model").unwrap(), snap);
    assert!(hub.seen().is_empty());
}

#[test]
fn a_snapshot_without_tokenizer_json_is_not_taken() {
    let hub = FakeHub::start();
    let mut files = gemma_files();
    files.retain(|(n, _)| !n.starts_with("model"));
    files.push(file("model.safetensors", read(&tiny_dir().join("llm/model.safetensors"))));
    hub.add_repo(&format!("models/{GEMMA}"), SHA, files.clone());
    let e = env(&hub.endpoint);
    let snap = seed_snapshot(&e, GEMMA, &files, &["config.json", "model.safetensors", "tokenizer_config.json"]);

    std::env::set_var("HF_HUB_OFFLINE", "1");
    let m = message(resolve_model(GEMMA, "--model").unwrap_err());
    assert!(m.contains("lacks tokenizer.json") && m.contains(&snap.display().to_string()), "{m}");
    // anything but Python's true values is online
    std::env::set_var("HF_HUB_OFFLINE", "no");
    assert_eq!(resolve_model(GEMMA, "--model").unwrap(), snap);
    assert_eq!(hub.fetched(), ["tokenizer.json"]);
}

#[test]
fn a_clip_repo_with_only_pytorch_weights_downloads_just_those_and_survives_a_dropped_connection() {
    let hub = FakeHub::start();
    let vision = tiny_dir().join("vision");
    let bin = read(&common::fixture_path("clip_bin/pytorch_model.bin"));
    hub.add_repo(
        &format!("models/{CLIP}"),
        SHA,
        vec![
            file(".gitattributes", b"*.bin filter=lfs\n".to_vec()),
            file("README.md", b"# CLIP\n".to_vec()),
            file("config.json", read(&vision.join("config.json"))),
            file("flax_model.msgpack", vec![1; 4096]),
            file("merges.txt", b"#version: 0.2\n".to_vec()),
            file("preprocessor_config.json", read(&vision.join("preprocessor_config.json"))),
            file("pytorch_model.bin", bin.clone()),
            file("special_tokens_map.json", b"{}".to_vec()),
            file("tf_model.h5", vec![2; 4096]),
            file("tokenizer.json", b"{}".to_vec()),
            file("tokenizer_config.json", b"{}".to_vec()),
            file("vocab.json", b"{}".to_vec()),
        ],
    );
    hub.drop_once("pytorch_model.bin");
    let e = env(&hub.endpoint);

    let snap = resolve_model(CLIP, "--vision-model").unwrap();
    assert_eq!(snap, e.snapshot(CLIP));
    // the cut transfer is resumed where it stopped, not started over
    let bin_reads: Vec<String> = hub
        .seen()
        .into_iter()
        .filter(|s| s.path.ends_with("/pytorch_model.bin") && s.range.as_deref() != Some("bytes=0-0"))
        .filter_map(|s| s.range)
        .collect();
    assert_eq!(bin_reads, ["bytes=0-".to_string(), format!("bytes={}-", bin.len() / 2)]);
    let mut fetched = hub.fetched();
    fetched.dedup();
    assert_eq!(fetched, ["config.json", "preprocessor_config.json", "pytorch_model.bin"]);
    assert_eq!(read(&snap.join("pytorch_model.bin")), bin);

    let cfg = gemmaclip::config::ClipVisionConfig::from_file(&snap.join("config.json")).unwrap();
    let w = Weights::open(&snap, DType::F32, &Device::Cpu).unwrap();
    gemmaclip::model::clip::ClipVision::load(w, &cfg).unwrap();
    // the layout Python reads: refs/main names the snapshot, the files link to blobs/
    let base = snap.parent().unwrap().parent().unwrap();
    assert_eq!(std::fs::read_to_string(base.join("refs/main")).unwrap(), SHA);
    assert!(std::fs::symlink_metadata(snap.join("pytorch_model.bin")).unwrap().file_type().is_symlink());
}

#[test]
fn a_dataset_downloads_its_parquet_files() {
    let hub = FakeHub::start();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/scienceqa-sample");
    let files = ["train", "validation", "test"]
        .iter()
        .map(|s| file(&format!("data/{s}-00000-of-00001.parquet"), read(&sample.join(format!("{s}.parquet")))))
        .chain([file("README.md", b"# ScienceQA\n".to_vec())])
        .collect();
    hub.add_repo("datasets/derek-thomas/ScienceQA", SHA, files);
    let _e = env(&hub.endpoint);
    let d = resolve_dataset("derek-thomas/ScienceQA", "--data").unwrap();
    assert!(gemmaclip::data::scienceqa::split_file(&d, "test").unwrap().ends_with("data/test-00000-of-00001.parquet"));
    assert!(!hub.fetched().contains(&"README.md".to_string()));
}

#[test]
fn workers_resolving_one_repository_at_once_download_it_once() {
    let hub = FakeHub::start();
    hub.add_repo(&format!("models/{GEMMA}"), SHA, gemma_files());
    let _e = env(&hub.endpoint);
    // the workers of `train --nproc-per-node 4` resolve the same id at the same moment
    let dirs: Vec<PathBuf> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(|| resolve_model(GEMMA, "--model").unwrap())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(dirs.iter().all(|d| d == &dirs[0]), "{dirs:?}");
    let fetched = hub.fetched();
    let once: BTreeSet<&String> = fetched.iter().collect();
    assert_eq!(once.len(), fetched.len(), "a file was downloaded twice: {fetched:?}");
}

#[test]
fn hub_failures_each_say_what_to_do_once() {
    let hub = FakeHub::start();
    hub.add_repo(&format!("models/{GEMMA}"), SHA, gemma_files());
    let _e = env(&hub.endpoint);
    let one_line = |m: &str| assert!(!m.contains('\n') && !m.contains("request error"), "{m}");

    // a typo in the id: not found, the hub's own words once, no talk of licenses or tokens
    hub.set_mode(Mode::NotFound);
    let m = message(resolve_model("google/gemma-3-4b-lt", "--model").unwrap_err());
    assert!(m.starts_with("--model google/gemma-3-4b-lt: no such repository"), "{m}");
    assert!(m.contains("check the id") && m.matches("Repository not found").count() == 1, "{m}");
    assert!(!m.contains("license") && !m.contains("HF_HUB_OFFLINE"), "{m}");
    one_line(&m);

    // gated, no token (401) and a token without access (403)
    hub.set_mode(Mode::Gated);
    let page = format!("accept the license at {}/{GEMMA}", hub.endpoint);
    let m = message(resolve_model(GEMMA, "--model").unwrap_err());
    assert!(m.starts_with("--model google/gemma-3-4b-it: gated repository") && m.contains(&page), "{m}");
    assert!(m.contains("HF_TOKEN") && m.matches("is restricted").count() == 1, "{m}");
    one_line(&m);
    std::env::set_var("HF_TOKEN", "hf_no_access");
    let m = message(resolve_model(GEMMA, "--model").unwrap_err());
    assert!(m.contains("HTTP 403") && m.contains(&page) && m.contains("token from HF_TOKEN"), "{m}");

    // a token the hub does not know
    hub.set_mode(Mode::BadToken);
    let m = message(resolve_model(GEMMA, "--model").unwrap_err());
    assert!(m.contains("refused the token from HF_TOKEN") && m.contains("invalid"), "{m}");
    assert!(m.matches("Invalid credentials").count() == 1 && !m.contains("license"), "{m}");
    std::env::remove_var("HF_TOKEN");

    // nothing listening: the network, retried, and the offline way out
    std::env::set_var("HF_ENDPOINT", dead_endpoint());
    let m = message(resolve_model(GEMMA, "--model").unwrap_err());
    assert!(m.starts_with("--model google/gemma-3-4b-it: cannot reach http://127.0.0.1:"), "{m}");
    assert!(m.contains("after 3 attempts") && m.contains("HF_HUB_OFFLINE=1"), "{m}");
    assert!(!m.contains("HF_TOKEN") && !m.contains("license"), "{m}");
    one_line(&m);
}

#[test]
fn the_token_comes_from_hf_token_then_hf_token_path_then_hf_home() {
    let hub = FakeHub::start();
    hub.add_repo(&format!("models/{GEMMA}"), SHA, gemma_files());
    let e = env(&hub.endpoint);
    let sent = |hub: &FakeHub| {
        let seen = hub.seen();
        hub.clear_seen();
        seen.into_iter().filter_map(|s| s.authorization).collect::<BTreeSet<_>>()
    };
    let fresh_cache = || {
        let c = tempfile::tempdir().unwrap();
        std::env::set_var("HF_HUB_CACHE", c.path());
        c
    };

    assert!(resolve_model(GEMMA, "--model").is_ok());
    assert!(sent(&hub).is_empty());
    // $HF_HOME/token, although the hub cache lives elsewhere
    std::fs::write(e.home.path().join("token"), "hf_from_home\n").unwrap();
    let _c1 = fresh_cache();
    resolve_model(GEMMA, "--model").unwrap();
    assert_eq!(sent(&hub), BTreeSet::from(["Bearer hf_from_home".to_string()]));
    let path = e.home.path().join("elsewhere");
    std::fs::write(&path, "hf_from_path").unwrap();
    std::env::set_var("HF_TOKEN_PATH", &path);
    let _c2 = fresh_cache();
    resolve_model(GEMMA, "--model").unwrap();
    assert_eq!(sent(&hub), BTreeSet::from(["Bearer hf_from_path".to_string()]));
    std::env::set_var("HF_TOKEN", "hf_from_env");
    let _c3 = fresh_cache();
    resolve_model(GEMMA, "--model").unwrap();
    assert_eq!(sent(&hub), BTreeSet::from(["Bearer hf_from_env".to_string()]));
}
