//! What went wrong talking to the hub, said once, in one line, with what to do about it: a wrong
//! id, a gated repository, a rejected token and an unreachable hub each need a different fix.

use hf_hub::api::sync::ApiError;
use std::fmt;

/// Who we are talking to, for the advice.
pub struct Ctx<'a> {
    pub endpoint: &'a str,
    pub repo_id: &'a str,
    /// Where the token came from (`HF_TOKEN`, a token file), if one is sent.
    pub token_from: Option<&'a str>,
}

pub struct Failure {
    message: String,
    advice: Option<String>,
    /// Worth another attempt: the connection failed or dropped, or the hub had a passing fault.
    pub transient: bool,
    attempts: usize,
}

/// What `classify` is told when the file listing failed.
pub const LISTING: &str = "the file listing";

const OFFLINE_HINT: &str = "check the network, or set HF_HUB_OFFLINE=1 to use only the cache";

impl Failure {
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), advice: None, transient: false, attempts: 1 }
    }

    fn advise(mut self, advice: impl Into<String>) -> Self {
        self.advice = Some(advice.into());
        self
    }

    fn transient(mut self) -> Self {
        self.transient = true;
        self
    }

    pub fn after(mut self, attempts: usize) -> Self {
        self.attempts = attempts;
        self
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)?;
        if self.attempts > 1 {
            write!(f, " after {} attempts", self.attempts)?;
        }
        match &self.advice {
            Some(a) => write!(f, ": {a}"),
            None => Ok(()),
        }
    }
}

/// Classifies a failed request for `what` (a file name, or "the file listing").
pub fn classify(e: ApiError, what: &str, cx: &Ctx) -> Failure {
    match e {
        ApiError::RequestError(e) => match *e {
            ureq::Error::Status(code, resp) => status(code, &resp, what, cx),
            e => transport(&e, what, cx),
        },
        ApiError::TooManyRetries(e) => classify(*e, what, cx),
        ApiError::IoError(e) if dropped(&e) => {
            Failure::new(format!("the connection to {} dropped while fetching {what} ({e})", cx.endpoint))
                .advise(format!("running again resumes the download; or {OFFLINE_HINT}"))
                .transient()
        }
        // `info()` reports a listing it cannot parse as an I/O error of this kind
        ApiError::IoError(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            Failure::new(format!("{} answered {what} with something unreadable ({e})", cx.endpoint))
        }
        ApiError::IoError(e) => Failure::new(format!("cannot store {what} in the Hugging Face cache ({e})")),
        e => Failure::new(format!("cannot fetch {what} from {} ({e})", cx.endpoint)),
    }
}

fn dropped(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | TimedOut)
}

fn status(code: u16, resp: &ureq::Response, what: &str, cx: &Ctx) -> Failure {
    let error_code = resp.header("X-Error-Code").unwrap_or("");
    let hub_says = resp.header("X-Error-Message").filter(|m| !m.trim().is_empty());
    let said = hub_says.map(|m| format!(": {}", m.trim())).unwrap_or_default();
    let gated = error_code == "GatedRepo"
        || code == 403
        || (code == 401 && hub_says.is_some_and(|m| m.contains("restricted") || m.contains("gated")));
    let not_found = code == 404 || error_code == "RepoNotFound" || error_code == "EntryNotFound";
    if gated {
        let page = format!("{}/{}", cx.endpoint, cx.repo_id);
        let advice = match cx.token_from {
            None => format!("accept the license at {page} and set HF_TOKEN"),
            Some(from) => format!("accept the license at {page} with the account of the token from {from}"),
        };
        Failure::new(format!("gated repository, access refused (HTTP {code}{said})")).advise(advice)
    } else if code == 401 && error_code != "RepoNotFound" && cx.token_from.is_some() {
        let from = cx.token_from.unwrap_or_default();
        Failure::new(format!("the hub refused the token from {from} (HTTP 401{said})"))
            .advise("the token is invalid or expired; make a new one at https://huggingface.co/settings/tokens")
    } else if not_found || code == 401 {
        let private = if cx.token_from.is_none() { " (a private one also needs HF_TOKEN)" } else { "" };
        // the listing has answered by the time files are fetched, so a file's plain 404 is the file's
        if error_code == "EntryNotFound" || (code == 404 && error_code != "RepoNotFound" && what != LISTING) {
            Failure::new(format!("{what} is listed but not found (HTTP {code}{said})"))
        } else {
            Failure::new(format!("no such repository on {} (HTTP {code}{said})", cx.endpoint))
                .advise(format!("check the id{private}"))
        }
    } else if code >= 500 {
        Failure::new(format!("{} failed on {what} (HTTP {code}{said})", cx.endpoint)).transient()
    } else {
        Failure::new(format!("{} refused {what} (HTTP {code}{said})", cx.endpoint))
    }
}

fn transport(e: &ureq::Error, what: &str, cx: &Ctx) -> Failure {
    let kind = e.kind();
    // the innermost cause (e.g. "Connection refused (os error 111)") says it best
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason = s.to_string();
        source = s.source();
    }
    use ureq::ErrorKind::*;
    match kind {
        InvalidUrl | UnknownScheme => {
            Failure::new(format!("HF_ENDPOINT {} is not a usable URL ({reason})", cx.endpoint))
        }
        Dns => Failure::new(format!("cannot look up the host of {} ({reason})", cx.endpoint))
            .advise(OFFLINE_HINT)
            .transient(),
        ConnectionFailed | ProxyConnect => {
            Failure::new(format!("cannot reach {} ({reason})", cx.endpoint)).advise(OFFLINE_HINT).transient()
        }
        _ => Failure::new(format!("the connection to {} failed while fetching {what} ({reason})", cx.endpoint))
            .advise(OFFLINE_HINT)
            .transient(),
    }
}
