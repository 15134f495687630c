//! Reading a checkpoint directory's weights, with errors that name the directory, the tensor and
//! the shapes. Safetensors (one file or hub-style shards with an index) where present; else
//! PyTorch's zip checkpoints (`pytorch_model.bin`, or shards named by `pytorch_model.bin.index.json`),
//! which some hub repositories (openai/clip-vit-large-patch14-336) carry instead. Those go through
//! candle's pickle reader, which interprets the format and never runs the code a pickle may name.

use anyhow::{bail, Context, Result};
use candle_core::{pickle::PthTensors, safetensors::MmapedSafetensors, DType, Device, Tensor};
use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    /// PyTorch's `torch.save` zip archive (a pickle plus raw storages).
    Pth,
}

/// The hub's file names for each format, in order of preference: (format, index, single file).
pub const LAYOUTS: [(Format, &str, &str); 2] = [
    (Format::Safetensors, "model.safetensors.index.json", "model.safetensors"),
    (Format::Pth, "pytorch_model.bin.index.json", "pytorch_model.bin"),
];

/// The shard files an index names in its `weight_map`, sorted and deduplicated. The names come
/// from a downloaded file, so anything that could point outside the directory is refused.
pub fn index_shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("cannot read {}", index.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: no \"weight_map\" object", index.display()))?;
    let mut files = Vec::new();
    for f in map.values() {
        let f = f.as_str().with_context(|| format!("{}: a weight_map value is not a file name", index.display()))?;
        if !Path::new(f).components().all(|c| matches!(c, Component::Normal(_))) {
            bail!("{}: shard name {f:?} is not a plain relative path", index.display());
        }
        files.push(f.to_string());
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        bail!("{}: the weight_map is empty", index.display());
    }
    Ok(files)
}

/// The weight files of a directory and their format: for each format of [`LAYOUTS`] (safetensors
/// first), the shards its index names, else its single file; else every `*.safetensors` in name order.
pub fn checkpoint_files(dir: &Path) -> Result<(Format, Vec<PathBuf>)> {
    for (format, index, single) in LAYOUTS {
        let index = dir.join(index);
        if index.exists() {
            let files: Vec<PathBuf> = index_shards(&index)?.into_iter().map(|f| dir.join(f)).collect();
            if let Some(f) = files.iter().find(|f| !f.is_file()) {
                bail!("{}: shard {} is missing", index.display(), f.display());
            }
            return Ok((format, files));
        }
        if dir.join(single).is_file() {
            return Ok((format, vec![dir.join(single)]));
        }
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin, \
             pytorch_model.bin.index.json or *.safetensors file",
            dir.display()
        );
    }
    Ok((Format::Safetensors, files))
}

/// What a hub snapshot still lacks of its weights (empty when complete). Stricter than
/// [`checkpoint_files`]: a lone shard is an interrupted download, not a checkpoint.
pub fn missing_weights(dir: &Path) -> Vec<String> {
    for (_, index, single) in LAYOUTS {
        let path = dir.join(index);
        if path.is_file() {
            return match index_shards(&path) {
                Ok(shards) => shards.into_iter().filter(|f| !dir.join(f).is_file()).collect(),
                Err(e) => vec![format!("a readable {index} ({e:#})")],
            };
        }
        if dir.join(single).is_file() {
            return vec![];
        }
    }
    // shards named like `model-00001-of-00002.safetensors` but no index: an interrupted download
    let names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    for (_, index, single) in LAYOUTS {
        let (stem, ext) = single.rsplit_once('.').unwrap_or((single, ""));
        let is_shard =
            |n: &String| n.starts_with(&format!("{stem}-")) && n.contains("-of-") && n.ends_with(&format!(".{ext}"));
        if names.iter().any(is_shard) {
            return vec![index.to_string()];
        }
    }
    vec!["the weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])".into()]
}

enum Store {
    Safetensors(MmapedSafetensors),
    /// One reader per .bin file and, for each tensor name, the reader that holds it.
    Pth {
        files: Vec<(PathBuf, PthTensors)>,
        route: HashMap<String, usize>,
    },
}

pub struct Weights {
    dir: PathBuf,
    store: Store,
    names: HashSet<String>,
    /// Prefix prepended to every name asked for (how this checkpoint nests the module).
    prefix: String,
    pub dtype: DType,
    pub device: Device,
}

impl Weights {
    /// Every weight file of a checkpoint directory (see [`checkpoint_files`]).
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        match checkpoint_files(dir)? {
            (Format::Safetensors, files) => Self::open_files(dir, &files, dtype, device),
            (Format::Pth, files) => Self::open_pth(dir, &files, dtype, device),
        }
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
        Ok(Self::new(dir, Store::Safetensors(st), names, dtype, device))
    }

    fn open_pth(dir: &Path, files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut readers = Vec::with_capacity(files.len());
        let mut route = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            // reads only the pickled index of the archive; tensor data is read on demand
            let pth = PthTensors::new(f, None).with_context(|| {
                format!("{}: not a PyTorch zip checkpoint (the pre-1.6 format is not supported)", f.display())
            })?;
            if pth.tensor_infos().is_empty() {
                bail!("{}: holds no tensors (expected a state dict saved with torch.save)", f.display());
            }
            for name in pth.tensor_infos().keys() {
                route.entry(name.clone()).or_insert(i);
            }
            readers.push((f.clone(), pth));
        }
        let names = route.keys().cloned().collect();
        Ok(Self::new(dir, Store::Pth { files: readers, route }, names, dtype, device))
    }

    fn new(dir: &Path, store: Store, names: HashSet<String>, dtype: DType, device: &Device) -> Self {
        Self { dir: dir.to_path_buf(), store, names, prefix: String::new(), dtype, device: device.clone() }
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
        let t = self.load(&full)?;
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

    fn load(&self, full: &str) -> Result<Tensor> {
        match &self.store {
            Store::Safetensors(st) => st
                .load(full, &self.device)
                .with_context(|| format!("{}: cannot load tensor `{full}`", self.dir.display())),
            Store::Pth { files, route } => {
                let what = || format!("cannot load tensor `{full}`");
                let (path, pth) = route.get(full).map(|&i| &files[i]).with_context(what)?;
                let t = pth.get(full).with_context(|| format!("{}: {}", path.display(), what()))?;
                let t = t.with_context(|| format!("{}: {} (indexed but absent)", path.display(), what()))?;
                Ok(t.to_device(&self.device)?)
            }
        }
    }
}
