//! Where models and data come from: a local directory in the hub layout, a hub id (found in the
//! Hugging Face cache -- `$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub` -- when the
//! snapshot there holds everything the loaders read, or else fetched into it with hf-hub:
//! `HF_TOKEN` or the token file for gated repositories, never with `HF_HUB_OFFLINE=1`), or the
//! embedded tiny preset (random weights written by `init` and the bundled ScienceQA sample, no
//! network).

mod complete;
mod download;
mod env;
mod failure;

use crate::init::{init, Preset};
use anyhow::{anyhow, bail, Context, Result};
use hf_hub::{Repo, RepoType};
use std::path::{Path, PathBuf};

/// gemmaclip's own cache: `$GEMMACLIP_CACHE`, else `$XDG_CACHE_HOME/gemmaclip`, else `~/.cache/gemmaclip`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GEMMACLIP_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("gemmaclip");
    }
    env::home().join(".cache/gemmaclip")
}

/// The snapshot directory that refs/main of `repo` points at in the hub cache, if there is one.
fn cached_snapshot(repo: &Repo) -> Option<PathBuf> {
    let base = env::hub_cache().join(repo.folder_name());
    let rev = std::fs::read_to_string(base.join("refs/main")).ok()?;
    let snap = base.join("snapshots").join(rev.trim());
    snap.is_dir().then_some(snap)
}

/// A model argument (`--model`, `--vision-model`): a directory, or a hub id (cached, else fetched).
pub fn resolve_model(arg: &str, flag: &str) -> Result<PathBuf> {
    resolve(arg, flag, RepoType::Model)
}

/// A dataset argument (`--data`): a directory, or a hub dataset id (cached, else fetched).
pub fn resolve_dataset(arg: &str, flag: &str) -> Result<PathBuf> {
    resolve(arg, flag, RepoType::Dataset)
}

/// What a snapshot lacks of what gemmaclip reads (empty when complete).
fn missing(snap: &Path, repo_type: RepoType) -> Vec<String> {
    match repo_type {
        RepoType::Dataset => complete::missing_dataset_files(snap),
        _ => complete::missing_model_files(snap),
    }
}

fn resolve(arg: &str, flag: &str, repo_type: RepoType) -> Result<PathBuf> {
    let p = Path::new(arg);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if p.exists() {
        bail!("{flag} {arg}: not a directory");
    }
    let looks_like_id = arg.split('/').count() == 2 && !arg.starts_with('.') && !arg.starts_with('/');
    if !looks_like_id {
        bail!("{flag} {arg}: no such directory");
    }
    let cached = cached_snapshot(&Repo::new(arg.to_string(), repo_type));
    if let Some(snap) = &cached {
        if missing(snap, repo_type).is_empty() {
            return Ok(snap.clone());
        }
    }
    if env::offline() {
        match cached {
            None => bail!(
                "{flag} {arg}: not a directory and not in the Hugging Face cache ({}), and HF_HUB_OFFLINE is set",
                env::hub_cache().display()
            ),
            Some(snap) => bail!(
                "{flag} {arg}: the cached snapshot {} lacks {} (an interrupted download?), and HF_HUB_OFFLINE is set",
                snap.display(),
                missing(&snap, repo_type).join(", ")
            ),
        }
    }
    let _lock = download_lock(arg, repo_type)?;
    // another process may have fetched it while this one waited
    if let Some(snap) = cached_snapshot(&Repo::new(arg.to_string(), repo_type)) {
        if missing(&snap, repo_type).is_empty() {
            return Ok(snap);
        }
    }
    let snap = download::fetch(arg, repo_type).map_err(|f| anyhow!("{flag} {arg}: {f}"))?;
    let lacking = missing(&snap, repo_type);
    if !lacking.is_empty() {
        bail!("{flag} {arg}: the repository has no {} (fetched the rest into {})", lacking.join(", "), snap.display());
    }
    Ok(snap)
}

/// Holds the cache's lock on `repo` while this process downloads it: the workers of a run of several
/// resolve the same ids at once, and hf-hub waits only seconds for its own per-file locks. Released
/// when the file is dropped.
fn download_lock(repo: &str, repo_type: RepoType) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let dir = env::hub_cache();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let kind = if matches!(repo_type, RepoType::Dataset) { "datasets" } else { "models" };
    let path = dir.join(format!(".gemmaclip-{kind}--{}.lock", repo.replace('/', "--")));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("waiting for another process downloading {repo}");
        // SAFETY: as above
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!("cannot lock {}: {}", path.display(), std::io::Error::last_os_error());
        }
    }
    Ok(f)
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
