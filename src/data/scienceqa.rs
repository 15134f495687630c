//! ScienceQA in the Hugging Face parquet layout of `derek-thomas/ScienceQA` (docs/ARCHITECTURE.md, the data path):
//! image struct{bytes, path} or null, question, choices list<string>, answer int8, hint, task,
//! grade, subject, topic, category, skill, lecture, solution; one file per split.

use crate::data::row_check::{self, ImageRef, RawRow};
use anyhow::{bail, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// One question.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Problem {
    /// `<split>-<row>`: the parquet files carry no pid; rows follow pid order within a split.
    pub pid: String,
    pub question: String,
    pub choices: Vec<String>,
    pub answer: usize,
    pub hint: String,
    /// Encoded image bytes (PNG/JPEG...), None for text-only questions.
    pub image: Option<Vec<u8>>,
    pub task: String,
    pub grade: String,
    pub subject: String,
    pub topic: String,
    pub category: String,
    pub skill: String,
    pub lecture: String,
    pub solution: String,
}

/// A row left out, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub pid: String,
    pub reason: String,
}

pub struct Split {
    pub name: String,
    pub problems: Vec<Problem>,
    pub skipped: Vec<Skipped>,
    /// Rows that had an image (bytes, or a path) and were skipped because it could not be read or
    /// used, for "N image rows lost their image"; each is also in `skipped`.
    pub images_lost: usize,
}

impl Split {
    /// Lists the skipped rows with their reasons on stderr, then how many there were and how many
    /// of them were image rows that lost their image.
    pub fn report_skipped(&self) {
        report_skipped(&self.skipped, &format!("of the {} split", self.name));
        if self.images_lost > 0 {
            eprintln!(
                "{} image rows of the {} split lost their image (see the reasons above)",
                self.images_lost, self.name
            );
        }
    }
}

/// Lists skipped rows (one line each) and their count, `what` saying where they were skipped.
pub fn report_skipped(skipped: &[Skipped], what: &str) {
    for s in skipped {
        eprintln!("skipped {}: {}", s.pid, s.reason);
    }
    if !skipped.is_empty() {
        eprintln!("skipped {} rows {what}", skipped.len());
    }
}

/// Columns a file must have; task, topic, category and skill are read when present.
const REQUIRED: [&str; 9] =
    ["image", "question", "choices", "answer", "hint", "lecture", "solution", "subject", "grade"];

/// The file of `split` in a dataset directory: `<split>.parquet`, `<split>-*.parquet`, or the same
/// under `data/` (the hub repository's layout, e.g. data/test-00000-of-00001-<hash>.parquet).
pub fn split_file(dir: &Path, split: &str) -> Result<PathBuf> {
    for d in [dir.to_path_buf(), dir.join("data")] {
        let exact = d.join(format!("{split}.parquet"));
        if exact.is_file() {
            return Ok(exact);
        }
        if let Ok(entries) = std::fs::read_dir(&d) {
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    n.starts_with(&format!("{split}-")) && n.ends_with(".parquet")
                })
                .collect();
            found.sort();
            match found.len() {
                0 => {}
                1 => return Ok(found.remove(0)),
                _ => bail!("{}: several parquet files for split {split:?}: {found:?}", d.display()),
            }
        }
    }
    bail!(
        "{}: no parquet file for split {split:?} (looked for {split}.parquet and data/{split}-*.parquet)",
        dir.display()
    )
}

/// The variant of a field, for errors: its value may be a whole image.
fn kind(f: &Field) -> String {
    let debug = format!("{f:?}");
    debug.split(['(', ' ', '{']).next().unwrap_or_default().to_string()
}

fn text(f: &Field, col: &str, at: &dyn Fn() -> String) -> Result<String> {
    match f {
        Field::Str(s) => Ok(s.clone()),
        Field::Null => Ok(String::new()),
        Field::Bytes(b) => Ok(String::from_utf8_lossy(b.data()).into_owned()),
        other => bail!("{}: column `{col}` should be a string, found {}", at(), kind(other)),
    }
}

/// Reads a split file. Rows that cannot be trained on are skipped and reported in `skipped` (see
/// `row_check::check`: bad choices or answer, an image that is missing, undecodable or too large), so
/// every problem returned goes through prompting and image processing without error; a file
/// whose columns differ from the layout is an error naming the column. Images are decoded in
/// parallel; the order of rows is the file's.
pub fn read_split(path: &Path, split: &str) -> Result<Split> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = SerializedFileReader::new(file).with_context(|| format!("{}: not a parquet file", path.display()))?;
    let schema = reader.metadata().file_metadata().schema_descr();
    let columns: Vec<String> = schema.root_schema().get_fields().iter().map(|f| f.name().to_string()).collect();
    for c in REQUIRED {
        if !columns.iter().any(|x| x == c) {
            bail!("{}: column `{c}` is missing (the ScienceQA layout has {:?})", path.display(), REQUIRED);
        }
    }
    let rows = reader.get_row_iter(None).with_context(|| format!("{}: cannot read rows", path.display()))?;
    let mut raw = vec![];
    for (i, row) in rows.enumerate() {
        let pid = format!("{split}-{i}");
        let row = row.with_context(|| format!("{}: row {pid} is unreadable", path.display()))?;
        raw.push(read_row(&row, pid, path)?);
    }
    // Relative image paths go from the parquet file's directory, not the working directory: a
    // dataset directory is moved and cached as a whole.
    let dir = path.parent().unwrap_or(Path::new(""));
    let checked: Vec<_> = raw.into_par_iter().map(|r| row_check::check(r, dir)).collect();
    let mut split = Split { name: split.to_string(), problems: vec![], skipped: vec![], images_lost: 0 };
    for c in checked {
        match c {
            Ok(p) => split.problems.push(p),
            Err(rejected) => {
                split.images_lost += rejected.image_lost as usize;
                split.skipped.push(rejected.skipped);
            }
        }
    }
    Ok(split)
}

/// One row's columns as the file has them; a value of the wrong type is an error (the file does
/// not have the layout), a value that is merely unusable is left for `row_check::check`.
fn read_row(row: &Row, pid: String, path: &Path) -> Result<RawRow> {
    let at = || format!("{}, row {pid}", path.display());
    let mut r = RawRow {
        problem: Problem { pid: pid.clone(), ..Default::default() },
        choices: vec![],
        answer: None,
        image: ImageRef::None,
    };
    let p = &mut r.problem;
    for (name, field) in row.get_column_iter() {
        match name.as_str() {
            "question" => p.question = text(field, name, &at)?,
            "hint" => p.hint = text(field, name, &at)?,
            "lecture" => p.lecture = text(field, name, &at)?,
            "solution" => p.solution = text(field, name, &at)?,
            "subject" => p.subject = text(field, name, &at)?,
            "grade" => p.grade = text(field, name, &at)?,
            "task" => p.task = text(field, name, &at)?,
            "topic" => p.topic = text(field, name, &at)?,
            "category" => p.category = text(field, name, &at)?,
            "skill" => p.skill = text(field, name, &at)?,
            "answer" => {
                r.answer = match field {
                    Field::Byte(v) => Some(*v as i64),
                    Field::Short(v) => Some(*v as i64),
                    Field::Int(v) => Some(*v as i64),
                    Field::Long(v) => Some(*v),
                    Field::UByte(v) => Some(*v as i64),
                    Field::Null => None,
                    other => bail!("{}: column `answer` should be an integer, found {}", at(), kind(other)),
                }
            }
            "choices" => match field {
                Field::ListInternal(list) => {
                    r.choices = list
                        .elements()
                        .iter()
                        .map(|e| match e {
                            Field::Null => Ok(None),
                            e => text(e, "choices", &at).map(Some),
                        })
                        .collect::<Result<_>>()?
                }
                Field::Null => r.choices = vec![],
                other => bail!("{}: column `choices` should be a list of strings, found {}", at(), kind(other)),
            },
            "image" => r.image = image_ref(field, &at)?,
            _ => {}
        }
    }
    Ok(r)
}

/// The image struct{bytes, path} of the datasets library: bytes when it embedded the file, else
/// the path it was loaded from.
fn image_ref(field: &Field, at: &dyn Fn() -> String) -> Result<ImageRef> {
    let g = match field {
        Field::Null => return Ok(ImageRef::None),
        Field::Group(g) => g,
        other => bail!("{}: column `image` should be a struct{{bytes, path}}, found {}", at(), kind(other)),
    };
    let (mut bytes, mut path) = (None, None);
    for (k, v) in g.get_column_iter() {
        match (k.as_str(), v) {
            ("bytes", Field::Bytes(b)) if !b.data().is_empty() => bytes = Some(b.data().to_vec()),
            ("bytes", Field::Bytes(_) | Field::Null) => {}
            ("bytes", other) => bail!("{}: column `image.bytes` should be binary, found {}", at(), kind(other)),
            ("path", Field::Str(s)) if !s.is_empty() => path = Some(s.clone()),
            ("path", Field::Str(_) | Field::Null) => {}
            ("path", other) => bail!("{}: column `image.path` should be a string, found {}", at(), kind(other)),
            _ => {}
        }
    }
    Ok(match (bytes, path) {
        (Some(b), _) => ImageRef::Bytes(b),
        (None, Some(p)) => ImageRef::Path(p),
        (None, None) => ImageRef::None,
    })
}
