//! An emulated Hugging Face hub on 127.0.0.1 for the download tests: the file listing
//! (`/api/{models,datasets}/{id}/revision/main`) and the files (`/{id}/resolve/main/{file}`, datasets
//! under `/datasets/`) with the headers hf-hub reads (ETag, X-Repo-Commit, Content-Range for its
//! `Range: bytes=0-0` probe and for resuming), and switchable failures.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Every request: 404, `X-Error-Code: RepoNotFound` and an `X-Error-Message`.
    NotFound,
    /// Files: 401 without a token, 403 with one, `X-Error-Code: GatedRepo`, as the hub answers.
    Gated,
    /// Every request carrying a token: 401 "Invalid credentials in Authorization header".
    BadToken,
}

#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

struct HubRepo {
    sha: String,
    files: Vec<(String, Vec<u8>)>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, HubRepo>,
    mode: Option<Mode>,
    /// Files whose next full read is cut after half the body.
    drop_once: HashSet<String>,
    seen: Vec<Seen>,
}

pub struct FakeHub {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl FakeHub {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &st);
                });
            }
        });
        Self { endpoint, state }
    }

    /// `key` is "models/org/name" or "datasets/org/name"; files are listed in the order given.
    pub fn add_repo(&self, key: &str, sha: &str, files: Vec<(String, Vec<u8>)>) {
        self.lock().repos.insert(key.to_string(), HubRepo { sha: sha.to_string(), files });
    }

    pub fn set_mode(&self, mode: Mode) {
        self.lock().mode = Some(mode);
    }

    pub fn drop_once(&self, file: &str) {
        self.lock().drop_once.insert(file.to_string());
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    pub fn clear_seen(&self) {
        self.lock().seen.clear();
    }

    /// The files whose bytes were asked for (not only probed with `bytes=0-0`).
    pub fn fetched(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter(|s| s.path.contains("/resolve/main/") && s.range.as_deref() != Some("bytes=0-0"))
            .filter_map(|s| s.path.split("/resolve/main/").nth(1).map(String::from))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A port nothing listens on: bound, then closed.
pub fn dead_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    format!("http://{addr}")
}

fn serve(stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let (mut range, mut authorization) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_string()),
                "authorization" => authorization = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    st.seen.push(Seen { path: path.clone(), range: range.clone(), authorization: authorization.clone() });
    let mode = st.mode.unwrap_or(Mode::Normal);
    let mut out = stream;
    if mode == Mode::NotFound {
        return respond(
            &mut out,
            404,
            &[("X-Error-Code", "RepoNotFound".into()), ("X-Error-Message", "Repository not found".into())],
            b"{\"error\":\"Repository not found\"}",
        );
    }
    if mode == Mode::BadToken && authorization.is_some() {
        let msg = "Invalid credentials in Authorization header";
        return respond(&mut out, 401, &[("X-Error-Message", msg.into())], msg.as_bytes());
    }
    if let Some(rest) = path.strip_prefix("/api/") {
        let Some((kind_id, _)) = rest.split_once("/revision/") else { return respond(&mut out, 400, &[], b"") };
        let Some(repo) = st.repos.get(kind_id) else {
            return respond(
                &mut out,
                404,
                &[("X-Error-Code", "RepoNotFound".into()), ("X-Error-Message", "Repository not found".into())],
                b"",
            );
        };
        let siblings: Vec<String> = repo.files.iter().map(|(f, _)| format!("{{\"rfilename\":\"{f}\"}}")).collect();
        let body = format!("{{\"id\":\"{kind_id}\",\"sha\":\"{}\",\"siblings\":[{}]}}", repo.sha, siblings.join(","));
        return respond(&mut out, 200, &[("Content-Type", "application/json".into())], body.as_bytes());
    }
    let Some((id_part, file)) = path.split_once("/resolve/main/") else { return respond(&mut out, 404, &[], b"") };
    let key = match id_part.strip_prefix("/datasets/") {
        Some(id) => format!("datasets/{id}"),
        None => format!("models/{}", id_part.trim_start_matches('/')),
    };
    if mode == Mode::Gated {
        let name = key.trim_start_matches("models/");
        let (code, msg) = match authorization {
            None => (401, format!("Access to model {name} is restricted. You must have access to it and be authenticated to access it. Please log in.")),
            Some(_) => (403, format!("Access to model {name} is restricted and you are not in the authorized list. Visit https://huggingface.co/{name} to ask for access.")),
        };
        return respond(&mut out, code, &[("X-Error-Code", "GatedRepo".into()), ("X-Error-Message", msg)], b"");
    }
    let Some(repo) = st.repos.get(&key) else {
        return respond(&mut out, 404, &[("X-Error-Code", "RepoNotFound".into())], b"");
    };
    let Some((_, bytes)) = repo.files.iter().find(|(f, _)| f == file) else {
        return respond(
            &mut out,
            404,
            &[("X-Error-Code", "EntryNotFound".into()), ("X-Error-Message", "Entry not found".into())],
            b"",
        );
    };
    let bytes = bytes.clone();
    let etag = format!("\"{:016x}\"", fnv1a(&bytes));
    let probe = range.as_deref() == Some("bytes=0-0");
    let start = match (probe, range.as_deref().and_then(|r| r.strip_prefix("bytes="))) {
        (false, Some(r)) => r.split('-').next().and_then(|s| s.parse().ok()).unwrap_or(0).min(bytes.len()),
        _ => 0,
    };
    let body: &[u8] = if probe { &bytes[..1.min(bytes.len())] } else { &bytes[start..] };
    let last = if probe { 0 } else { bytes.len().saturating_sub(1) };
    let headers = [
        ("ETag", etag),
        ("X-Repo-Commit", repo.sha.clone()),
        ("Content-Range", format!("bytes {start}-{last}/{}", bytes.len())),
    ];
    let cut = !probe && st.drop_once.remove(file);
    drop(st);
    if cut {
        // announce the whole body, send half of it, hang up
        write_head(&mut out, 206, &headers, body.len())?;
        out.write_all(&body[..body.len() / 2])?;
        out.flush()?;
        return out.shutdown(std::net::Shutdown::Both);
    }
    respond(&mut out, 206, &headers, body)
}

fn write_head(out: &mut TcpStream, code: u16, headers: &[(&str, String)], len: usize) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {code} X\r\nContent-Length: {len}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

fn respond(out: &mut TcpStream, code: u16, headers: &[(&str, String)], body: &[u8]) -> std::io::Result<()> {
    write_head(out, code, headers, body.len())?;
    out.write_all(body)?;
    out.flush()
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325, |h, &x| (h ^ x as u64).wrapping_mul(0x100000001b3))
}
