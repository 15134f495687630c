//! Writing safetensors files tensor by tensor, so a checkpoint larger than memory streams to disk,
//! and hub-style sharding (`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`).

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StDtype {
    F32,
    BF16,
}

impl StDtype {
    pub fn size(self) -> usize {
        match self {
            StDtype::F32 => 4,
            StDtype::BF16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            StDtype::F32 => "F32",
            StDtype::BF16 => "BF16",
        }
    }
}

/// One tensor to write: its name, shape and dtype on disk.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: StDtype,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

/// The safetensors header of a file holding `entries` in order: the 8-byte length, then the JSON
/// padded with spaces to a multiple of 8 (as the reference writer does).
pub fn header_bytes(entries: &[TensorEntry]) -> Vec<u8> {
    let mut map = Map::new();
    map.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for e in entries {
        let end = offset + e.bytes();
        map.insert(e.name.clone(), json!({"dtype": e.dtype.name(), "shape": e.shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    let mut text = serde_json::to_vec(&Value::Object(map)).expect("json");
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out
}

/// Splits entries into shards of at most `max_shard_bytes` (a tensor larger than that gets its
/// own shard), keeping order, as `save_pretrained` does.
pub fn plan_shards(entries: &[TensorEntry], max_shard_bytes: usize) -> Vec<Vec<TensorEntry>> {
    let mut shards: Vec<Vec<TensorEntry>> = vec![];
    let mut size = 0;
    for e in entries {
        if shards.is_empty() || (size + e.bytes() > max_shard_bytes && size > 0) {
            shards.push(vec![]);
            size = 0;
        }
        size += e.bytes();
        shards.last_mut().unwrap().push(e.clone());
    }
    shards
}

pub fn shard_file_names(n: usize) -> Vec<String> {
    if n == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=n).map(|k| format!("model-{k:05}-of-{n:05}.safetensors")).collect()
    }
}

/// Writes `bytes` to `path` through a temporary name and a rename, so a reader never sees half a
/// file; the data and the rename are synced to disk before it returns (a power loss then leaves
/// the old file or the new one, never an empty one).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_name(path);
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))
    })();
    finish_atomic(&tmp, path, result)
}

/// Writes tensors as a safetensors file at `path`, durably, through a temporary name.
pub fn save_tensors_atomic(map: &std::collections::HashMap<String, candle_core::Tensor>, path: &Path) -> Result<()> {
    let tmp = tmp_name(path);
    let result = candle_core::safetensors::save(map, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))
        .and_then(|()| default_permissions(&tmp))
        .and_then(|()| sync_file(&tmp));
    finish_atomic(&tmp, path, result)
}

/// Gives `file` the permissions a newly created file gets (0666 less the umask). The safetensors
/// writer goes through a private temporary file (0600), which would leave weights unreadable to
/// the group where every other file of a run is readable.
pub fn default_permissions(file: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        static MODE: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
        let mode = *MODE.get_or_init(|| {
            // the umask can only be read by creating something
            let probe = tmp_name(file);
            let mode = std::fs::File::create(&probe).and_then(|f| f.metadata()).map(|m| m.permissions().mode() & 0o777);
            let _ = std::fs::remove_file(&probe);
            mode.ok()
        });
        if let Some(mode) = mode {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("cannot set the permissions of {}", file.display()))?;
        }
    }
    Ok(())
}

/// Renames a written and synced `tmp` onto `path` and syncs the directory; on an earlier failure
/// (`written` is Err, e.g. a full disk) removes `tmp` instead.
pub fn finish_atomic(tmp: &Path, path: &Path, written: Result<()>) -> Result<()> {
    if let Err(e) = written {
        let _ = std::fs::remove_file(tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(tmp, path) {
        let _ = std::fs::remove_file(tmp);
        return Err(e).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()));
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// fsync of a file already written and closed.
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", path.display()))
}

/// fsync of a directory, so the names created or renamed in it survive a power loss.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    #[cfg(unix)]
    std::fs::File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(())
}

/// A sibling name unique to this process and call, so concurrent writers of the same file (two
/// runs sharing a cache) never rename each other's half-written data.
pub fn tmp_name(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}.{n}", std::process::id()));
    path.with_file_name(name)
}

/// Writes a sharded (or single-file) checkpoint into `dir`. `fill(entry, sink)` must write exactly
/// `entry.bytes()` bytes of little-endian data. Each file goes through a temporary name.
pub fn write_checkpoint(
    dir: &Path,
    entries: &[TensorEntry],
    max_shard_bytes: usize,
    mut fill: impl FnMut(&TensorEntry, &mut dyn Write) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    let shards = plan_shards(entries, max_shard_bytes);
    let names = shard_file_names(shards.len());
    let mut written = vec![];
    let mut weight_map = Map::new();
    for (shard, name) in shards.iter().zip(&names) {
        let path = dir.join(name);
        let tmp = tmp_name(&path);
        let result = (|| -> Result<()> {
            let file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            let mut w = CountingWriter { inner: std::io::BufWriter::with_capacity(1 << 22, file), count: 0 };
            w.write_all(&header_bytes(shard))?;
            for e in shard {
                let before = w.count;
                fill(e, &mut w)?;
                if w.count - before != e.bytes() as u64 {
                    bail!("internal: tensor {} wrote {} bytes, expected {}", e.name, w.count - before, e.bytes());
                }
                weight_map.insert(e.name.clone(), Value::String(name.clone()));
            }
            w.inner.flush().with_context(|| format!("cannot write {}", tmp.display()))?;
            w.inner.get_ref().sync_all().with_context(|| format!("cannot sync {}", tmp.display()))
        })();
        finish_atomic(&tmp, &path, result)?;
        written.push(path);
    }
    if shards.len() > 1 {
        let total: usize = entries.iter().map(TensorEntry::bytes).sum();
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        write_atomic(&path, serde_json::to_string_pretty(&index)?.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

struct CountingWriter<W: Write> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
