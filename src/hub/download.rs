//! Fetching what gemmaclip reads of a hub repository into the Hugging Face cache through hf-hub,
//! which keeps the layout Python's huggingface_hub shares (blobs/, snapshots/<sha>/, refs/main)
//! and resumes a cut file from its `.part`.

use super::complete::{model_kind, ModelKind};
use super::env;
use super::failure::{classify, Ctx, Failure, LISTING};
use crate::weights::{index_shards, LAYOUTS};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};

/// Tries per request; a dropped connection or a passing hub fault is retried, a refusal is not.
const ATTEMPTS: usize = 3;

/// Small files worth having beside the weights; only those the repository lists are fetched.
const GEMMA_FILES: [&str; 4] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"];
const CLIP_FILES: [&str; 1] = ["preprocessor_config.json"];

/// Fetches into the cache what the snapshot at `main` lacks; returns the snapshot directory.
pub fn fetch(repo_id: &str, repo_type: RepoType) -> Result<PathBuf, Failure> {
    let endpoint = env::endpoint();
    let token = env::token();
    let cx = Ctx { endpoint: &endpoint, repo_id, token_from: token.as_ref().map(|(_, from)| from.as_str()) };
    let cache = env::hub_cache();
    // the token is always given: hf-hub would otherwise look for it next to the hub cache
    let api = ApiBuilder::from_cache(Cache::new(cache.clone()))
        .with_endpoint(endpoint.clone())
        .with_token(token.as_ref().map(|(t, _)| t.clone()))
        .with_progress(std::io::stderr().is_terminal())
        .build()
        .map_err(|e| classify(e, "the client setup", &cx))?;
    let repo = Repo::with_revision(repo_id.to_string(), repo_type, "main".to_string());
    let base = cache.join(repo.folder_name());
    let api_repo = api.repo(repo);
    let info = retry(&cx, LISTING, || api_repo.info())?;
    if info.sha.is_empty() || !info.sha.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(Failure::new(format!("the file listing names no usable commit ({:?})", info.sha)));
    }
    let listed: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let f = Fetcher { repo: api_repo, cx: &cx, snap: base.join("snapshots").join(&info.sha), listed };
    match repo_type {
        RepoType::Dataset => f.dataset()?,
        _ => f.model()?,
    }
    // what was already in place was not downloaded, so nothing else moved refs/main to this commit
    std::fs::create_dir_all(base.join("refs"))
        .and_then(|()| std::fs::write(base.join("refs/main"), &info.sha))
        .map_err(|e| Failure::new(format!("cannot write {} ({e})", base.join("refs/main").display())))?;
    Ok(f.snap)
}

struct Fetcher<'a> {
    repo: ApiRepo,
    cx: &'a Ctx<'a>,
    /// snapshots/<the listing's commit>: every file must land here, or the snapshot is a mix
    snap: PathBuf,
    listed: Vec<String>,
}

impl Fetcher<'_> {
    fn lists(&self, f: &str) -> bool {
        self.listed.iter().any(|l| l == f)
    }

    /// config.json first (it says what else the model needs), then its small files, then the
    /// weights of one format (safetensors if the repository has them), the index before its shards.
    fn model(&self) -> Result<(), Failure> {
        if self.lists("config.json") {
            self.get("config.json")?;
        }
        let extras: Vec<&str> = match model_kind(&self.snap) {
            Some(ModelKind::Gemma) => GEMMA_FILES.to_vec(),
            Some(ModelKind::Clip) => CLIP_FILES.to_vec(),
            _ => GEMMA_FILES.iter().chain(&CLIP_FILES).copied().collect(),
        };
        for f in extras.into_iter().filter(|f| self.lists(f)) {
            self.get(f)?;
        }
        let Some((_, index, single)) = LAYOUTS.iter().find(|(_, i, s)| self.lists(i) || self.lists(s)) else {
            return Err(Failure::new(
                "the repository lists no model.safetensors, pytorch_model.bin or index of either",
            ));
        };
        if !self.lists(index) {
            return self.get(single);
        }
        self.get(index)?;
        let shards = index_shards(&self.snap.join(index)).map_err(|e| Failure::new(format!("{e:#}")))?;
        shards.iter().try_for_each(|s| self.get(s))
    }

    /// Every parquet file of the dataset.
    fn dataset(&self) -> Result<(), Failure> {
        let parquet: Vec<&String> = self.listed.iter().filter(|f| f.ends_with(".parquet")).collect();
        if parquet.is_empty() {
            return Err(Failure::new("the repository lists no .parquet files"));
        }
        parquet.into_iter().try_for_each(|f| self.get(f))
    }

    fn get(&self, f: &str) -> Result<(), Failure> {
        if !Path::new(f).components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(Failure::new(format!("the repository names a file {f:?} outside itself")));
        }
        if self.snap.join(f).is_file() {
            return Ok(());
        }
        let local = retry(self.cx, f, || self.repo.download(f))?;
        if !local.starts_with(&self.snap) {
            return Err(Failure::new(format!(
                "the repository changed while downloading ({f} came from another commit than the listing's); run again"
            )));
        }
        Ok(())
    }
}

fn retry<T>(cx: &Ctx, what: &str, mut op: impl FnMut() -> Result<T, ApiError>) -> Result<T, Failure> {
    let mut attempt = 1;
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(e) => {
                let failure = classify(e, what, cx);
                if !failure.transient || attempt == ATTEMPTS {
                    return Err(failure.after(attempt));
                }
                std::thread::sleep(std::time::Duration::from_millis(250 << (attempt - 1)));
                attempt += 1;
            }
        }
    }
}
