//! Reading a checkpoint directory's safetensors (one file or hub-style shards with an index),
//! with errors that name the directory, the tensor and the shapes.

use anyhow::{bail, Context, Result};
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor};
use std::path::{Path, PathBuf};

pub struct Weights {
    dir: PathBuf,
    st: MmapedSafetensors,
    names: std::collections::HashSet<String>,
    /// Prefix prepended to every name asked for (how this checkpoint nests the module).
    prefix: String,
    pub dtype: DType,
    pub device: Device,
}

/// The safetensors files of a directory: those named by `model.safetensors.index.json`, else
/// `model.safetensors`, else every `*.safetensors` in name order.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no \"weight_map\" object", index.display()))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        for f in &files {
            if !f.exists() {
                bail!("{}: shard {} is missing", index.display(), f.display());
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no model.safetensors, model.safetensors.index.json or *.safetensors file", dir.display());
    }
    Ok(files)
}

impl Weights {
    /// Every safetensors file of a checkpoint directory.
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::open_files(dir, &safetensors_files(dir)?, dtype, device)
    }

    /// One safetensors file (a projector, an adapter).
    pub fn open_file(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !path.is_file() {
            bail!("{}: no such file", path.display());
        }
        Self::open_files(path, &[path.to_path_buf()], dtype, device)
    }

    fn open_files(dir: &Path, files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        // SAFETY: the files are memory-mapped read-only; like every safetensors loader we assume
        // nobody truncates them while the process runs.
        let st = unsafe { MmapedSafetensors::multi(files) }
            .with_context(|| format!("{}: cannot read safetensors", dir.display()))?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self { dir: dir.to_path_buf(), st, names, prefix: String::new(), dtype, device: device.clone() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Chooses, among candidate prefixes, the first under which `probe` exists.
    pub fn with_prefix_of(mut self, candidates: &[&str], probe: &str) -> Result<Self> {
        match candidates.iter().find(|p| self.names.contains(&format!("{p}{probe}"))) {
            Some(p) => {
                self.prefix = p.to_string();
                Ok(self)
            }
            None => bail!(
                "{}: no tensor `{probe}` under any of the prefixes {:?}; is this the right model directory?",
                self.dir.display(),
                candidates
            ),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(&format!("{}{name}", self.prefix))
    }

    /// Loads `name` (under the chosen prefix), checks its shape and converts it to the model dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        if !self.names.contains(&full) {
            bail!("{}: tensor `{full}` is missing from the checkpoint", self.dir.display());
        }
        let t = self
            .st
            .load(&full, &self.device)
            .with_context(|| format!("{}: cannot load tensor `{full}`", self.dir.display()))?;
        if t.dims() != shape {
            bail!(
                "{}: tensor `{full}` has shape {:?} but the config expects {:?}",
                self.dir.display(),
                t.dims(),
                shape
            );
        }
        Ok(t.to_dtype(dtype)?)
    }
}
