//! Where models and data come from: a local directory in the hub layout, a hub id (found in the
//! Hugging Face cache -- `$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub` -- or else
//! downloaded into it with hf-hub, `HF_TOKEN` for gated repositories, never with
//! `HF_HUB_OFFLINE=1`), or the embedded tiny preset (random weights written by `init` and the
//! bundled ScienceQA sample, no network).

use crate::init::{init, Preset};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// gemmaclip's own cache: `$GEMMACLIP_CACHE`, else `$XDG_CACHE_HOME/gemmaclip`, else `~/.cache/gemmaclip`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GEMMACLIP_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("gemmaclip");
    }
    home().join(".cache/gemmaclip")
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}

fn hf_hub_cache() -> PathBuf {
    if let Some(d) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("HF_HOME") {
        return PathBuf::from(d).join("hub");
    }
    home().join(".cache/huggingface/hub")
}

/// The snapshot directory of `repo` (e.g. "google/gemma-3-4b-it") in the hub cache, at refs/main.
fn cached_snapshot(kind: &str, repo: &str) -> Option<PathBuf> {
    let base = hf_hub_cache().join(format!("{kind}--{}", repo.replace('/', "--")));
    let rev = std::fs::read_to_string(base.join("refs/main")).ok()?;
    let snap = base.join("snapshots").join(rev.trim());
    snap.is_dir().then_some(snap)
}

/// A model argument (`--model`, `--vision-model`): a directory, or a hub id already in the cache.
pub fn resolve_model(arg: &str, flag: &str) -> Result<PathBuf> {
    resolve(arg, flag, "models")
}

/// A dataset argument (`--data`): a directory, or a hub dataset id already in the cache.
pub fn resolve_dataset(arg: &str, flag: &str) -> Result<PathBuf> {
    resolve(arg, flag, "datasets")
}

fn resolve(arg: &str, flag: &str, kind: &str) -> Result<PathBuf> {
    let p = Path::new(arg);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if p.exists() {
        bail!("{flag} {arg}: not a directory");
    }
    let looks_like_id = arg.split('/').count() == 2 && !arg.starts_with('.') && !arg.starts_with('/');
    if looks_like_id {
        if let Some(snap) = cached_snapshot(kind, arg).filter(|s| complete(s, kind)) {
            return Ok(snap);
        }
        if std::env::var_os("HF_HUB_OFFLINE").is_some_and(|v| v != "0") {
            bail!(
                "{flag} {arg}: not a directory and not in the Hugging Face cache ({}), and HF_HUB_OFFLINE is set",
                hf_hub_cache().display()
            );
        }
        return download(arg, kind).with_context(|| {
            format!("{flag} {arg}: download failed (gated models need HF_TOKEN and an accepted license; HF_HUB_OFFLINE=1 uses only the cache)")
        });
    }
    bail!("{flag} {arg}: no such directory")
}

/// Whether a cached snapshot holds what we read (a download may have been interrupted).
fn complete(snap: &Path, kind: &str) -> bool {
    if kind == "datasets" {
        return ["train", "validation", "test"].iter().all(|s| crate::data::scienceqa::split_file(snap, s).is_ok());
    }
    snap.join("config.json").is_file()
        && crate::weights::safetensors_files(snap).is_ok_and(|f| f.iter().all(|p| p.is_file()))
}

/// Downloads what gemmaclip reads of a repository into the hub cache; returns its snapshot dir.
fn download(repo_id: &str, kind: &str) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Cache, Repo, RepoType};
    let mut builder = ApiBuilder::from_cache(Cache::new(hf_hub_cache())).with_progress(true);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    let api = builder.build()?;
    let rtype = if kind == "datasets" { RepoType::Dataset } else { RepoType::Model };
    let repo = api.repo(Repo::with_revision(repo_id.to_string(), rtype, "main".to_string()));
    let files: Vec<String> = repo.info()?.siblings.into_iter().map(|s| s.rfilename).collect();
    let wanted: Vec<&String> = if kind == "datasets" {
        files.iter().filter(|f| f.ends_with(".parquet")).collect()
    } else {
        let shards = files.iter().any(|f| f == "model.safetensors.index.json");
        files
            .iter()
            .filter(|f| {
                matches!(
                    f.as_str(),
                    "config.json"
                        | "generation_config.json"
                        | "preprocessor_config.json"
                        | "tokenizer.json"
                        | "tokenizer_config.json"
                        | "special_tokens_map.json"
                        | "model.safetensors.index.json"
                ) || (f.ends_with(".safetensors")
                    && !f.contains('/')
                    && (shards != (f.as_str() == "model.safetensors")))
            })
            .collect()
    };
    if wanted.is_empty() {
        bail!("the repository lists none of the files gemmaclip reads");
    }
    let mut snapshot = None;
    for f in wanted {
        let local = repo.get(f)?;
        // the snapshot root: the downloaded path minus the file's own path inside the repo
        let depth = f.split('/').count();
        snapshot = local.ancestors().nth(depth).map(Path::to_path_buf);
    }
    snapshot.context("no snapshot directory")
}

/// The tiny preset's model directories (`<cache>/tiny-seed0/{llm,vision}`), written on first use.
pub fn tiny_model() -> Result<(PathBuf, PathBuf)> {
    let dir = cache_dir().join("tiny-seed0");
    if !dir.join(".complete").exists() {
        // written aside and renamed into place: concurrent first uses never see half a model
        let tmp = crate::safetensors_out::tmp_name(&dir);
        init(Preset::Tiny, &tmp, 0).with_context(|| format!("cannot write the tiny model to {}", tmp.display()))?;
        std::fs::write(tmp.join(".complete"), b"")?;
        if dir.exists() && !dir.join(".complete").exists() {
            let _ = std::fs::remove_dir_all(&dir); // left by an interrupted older version
        }
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
            if !dir.join(".complete").exists() {
                bail!("cannot put the tiny model in place at {}", dir.display());
            }
        }
    }
    Ok((dir.join("llm"), dir.join("vision")))
}

const SAMPLE: [(&str, &[u8]); 3] = [
    ("train.parquet", include_bytes!("../assets/scienceqa-sample/train.parquet")),
    ("validation.parquet", include_bytes!("../assets/scienceqa-sample/validation.parquet")),
    ("test.parquet", include_bytes!("../assets/scienceqa-sample/test.parquet")),
];

/// The bundled ScienceQA sample (`assets/scienceqa-sample`, embedded in the binary), as a directory.
pub fn sample_dataset() -> Result<PathBuf> {
    let dir = cache_dir().join("scienceqa-sample");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, bytes) in SAMPLE {
        let path = dir.join(name);
        if std::fs::read(&path).map(|b| b != bytes).unwrap_or(true) {
            crate::safetensors_out::write_atomic(&path, bytes)?;
        }
    }
    Ok(dir)
}
