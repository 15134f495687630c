//! The Hugging Face environment, read the way Python's huggingface_hub reads it (its
//! `constants.py`), so that both share one cache, one token and one offline switch.

use std::path::PathBuf;

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A leading `~` is the home directory, as Python's `os.path.expanduser` makes it.
fn expand_user(p: String) -> PathBuf {
    match p.strip_prefix('~') {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => home().join(rest.trim_start_matches('/')),
        _ => PathBuf::from(p),
    }
}

pub fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(d) = var("HF_HOME") {
        return expand_user(d);
    }
    match var("XDG_CACHE_HOME") {
        Some(d) => expand_user(d).join("huggingface"),
        None => home().join(".cache/huggingface"),
    }
}

/// `$HF_HUB_CACHE`, else `$HF_HOME/hub`.
pub fn hub_cache() -> PathBuf {
    var("HF_HUB_CACHE").map(expand_user).unwrap_or_else(|| hf_home().join("hub"))
}

/// `HF_HUB_OFFLINE` with Python's true values (1, ON, YES, TRUE, any case); anything else is online.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| ["1", "ON", "YES", "TRUE"].contains(&v.to_ascii_uppercase().as_str()))
}

pub fn endpoint() -> String {
    var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()).trim_end_matches('/').to_string()
}

/// The access token and where it came from (for messages): `HF_TOKEN`, else the file at
/// `$HF_TOKEN_PATH`, else `$HF_HOME/token` -- never next to `HF_HUB_CACHE`, which may live elsewhere.
pub fn token() -> Option<(String, String)> {
    if let Some(t) = var("HF_TOKEN").map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
        return Some((t, "HF_TOKEN".into()));
    }
    let path = var("HF_TOKEN_PATH").map(expand_user).unwrap_or_else(|| hf_home().join("token"));
    let t = std::fs::read_to_string(&path).ok()?.trim().to_string();
    (!t.is_empty()).then(|| (t, format!("the token file {}", path.display())))
}
