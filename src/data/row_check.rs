//! Whether a ScienceQA row can be used, decided at load: a row that would fail later (in the
//! prompt, the image preprocessing, the scorer) is skipped with its reason instead of stopping a
//! training or evaluation run at whatever step first reaches it.

use crate::data::image;
use crate::data::prompt::IMAGE_TOKEN;
use crate::data::scienceqa::{Problem, Skipped};
use std::path::Path;

/// Where a row's image is.
pub(crate) enum ImageRef {
    None,
    Bytes(Vec<u8>),
    /// As written in the file: relative to the parquet file's directory, or absolute.
    Path(String),
}

/// A row as read from the file, before the checks.
pub(crate) struct RawRow {
    /// Everything but `choices`, `answer` and `image`, which are checked first.
    pub problem: Problem,
    pub choices: Vec<Option<String>>,
    pub answer: Option<i64>,
    pub image: ImageRef,
}

pub(crate) struct Rejected {
    pub skipped: Skipped,
    /// The row had an image and the image is why it was skipped.
    pub image_lost: bool,
}

/// The problem, or why the row is skipped. Reading and decoding the image happen here, so this
/// runs on the rayon pool.
pub(crate) fn check(row: RawRow, dir: &Path) -> Result<Problem, Rejected> {
    let RawRow { mut problem, choices, answer, image } = row;
    let reject = |reason: String, image_lost: bool| {
        // The reason follows the pid on one line of the log, whatever an error message holds.
        let reason = reason.replace(['\n', '\r'], " ");
        Rejected { skipped: Skipped { pid: problem.pid.clone(), reason }, image_lost }
    };
    let n = choices.len();
    let text_problem = if n < 2 {
        Some(format!("{n} choice(s); a question needs at least two"))
    } else if n > 26 {
        Some(format!("{n} choices; letters run out after Z"))
    } else if let Some(i) = choices.iter().position(Option::is_none) {
        Some(format!("choice {} of {n} is null", i + 1))
    } else {
        match answer {
            None => Some("the answer is null".to_string()),
            Some(a) if a < 0 || a as usize >= n => Some(format!("answer index {a} is outside the {n} choices")),
            Some(_) => None,
        }
    };
    if let Some(reason) = text_problem {
        return Err(reject(reason, false));
    }
    problem.choices = choices.into_iter().flatten().collect();
    problem.answer = answer.unwrap_or_default() as usize;
    if let Some(field) = field_with_image_token(&problem) {
        let reason = format!("the {field} contains `{IMAGE_TOKEN}`, which the model would take for an image position");
        return Err(reject(reason, false));
    }
    problem.image = match image {
        ImageRef::None => None,
        ImageRef::Bytes(bytes) => match image::validate(&bytes) {
            Ok(()) => Some(bytes),
            Err(e) => return Err(reject(format!("unusable image: {e:#}"), true)),
        },
        ImageRef::Path(given) => {
            // Path::join keeps an absolute path as it is.
            let file = dir.join(&given);
            if !file.is_file() {
                let reason =
                    format!("the image has no bytes and its path {given:?} ({}) is not a file", file.display());
                return Err(reject(reason, true));
            }
            let bytes = match std::fs::read(&file) {
                Ok(b) => b,
                Err(e) => return Err(reject(format!("cannot read the image {}: {e}", file.display()), true)),
            };
            match image::validate(&bytes) {
                Ok(()) => Some(bytes),
                Err(e) => return Err(reject(format!("unusable image {}: {e:#}", file.display()), true)),
            }
        }
    };
    Ok(problem)
}

/// The text that goes into the prompt or the target must not hold the image placeholder: the
/// tokenizer would make it an image position and the image block would no longer match.
fn field_with_image_token(p: &Problem) -> Option<&'static str> {
    let fields = [
        ("question", p.question.as_str()),
        ("hint", p.hint.as_str()),
        ("lecture", p.lecture.as_str()),
        ("solution", p.solution.as_str()),
    ];
    fields
        .iter()
        .find(|(_, text)| text.contains(IMAGE_TOKEN))
        .map(|(name, _)| *name)
        .or_else(|| p.choices.iter().any(|c| c.contains(IMAGE_TOKEN)).then_some("choices"))
}
