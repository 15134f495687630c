//! SHA-256 identities of what a run or an evaluation used, so a resume can tell the same model or
//! data under another path from a different one under the same name.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// Hex SHA-256 of a file, read in blocks (an adapter or a parquet split may be hundreds of MB).
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The identity of a model directory without reading gigabytes of weights: the SHA-256 of its
/// config.json and, for each weight file, its name, size and first and last MiB (two checkpoints
/// of one architecture share names and sizes, never those bytes).
pub fn model_dir_sha256(dir: &Path) -> Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut h = Sha256::new();
    let config = dir.join("config.json");
    h.update(std::fs::read(&config).with_context(|| format!("cannot read {}", config.display()))?);
    let mut weights: Vec<(String, u64)> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let weight = name.ends_with(".safetensors") || name.ends_with(".bin") || name.ends_with(".index.json");
            weight.then(|| e.metadata().ok().map(|m| (name, m.len()))).flatten()
        })
        .collect();
    weights.sort();
    const MIB: u64 = 1 << 20;
    for (name, size) in weights {
        h.update(format!("{name}\t{size}\n").as_bytes());
        let path = dir.join(&name);
        let mut f = std::fs::File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut buf = vec![0u8; size.min(MIB) as usize];
        f.read_exact(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        h.update(&buf);
        if size > MIB {
            f.seek(SeekFrom::Start(size - size.min(MIB))).with_context(|| format!("cannot read {}", path.display()))?;
            f.read_exact(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
            h.update(&buf);
        }
    }
    Ok(format!("{:x}", h.finalize()))
}
