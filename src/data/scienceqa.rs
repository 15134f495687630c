//! ScienceQA in the Hugging Face parquet layout of `derek-thomas/ScienceQA` (model-facts §4):
//! image struct{bytes, path} or null, question, choices list<string>, answer int8, hint, task,
//! grade, subject, topic, category, skill, lecture, solution; one file per split.

use anyhow::{bail, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use std::path::{Path, PathBuf};

/// One question.
#[derive(Debug, Clone, Default)]
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

fn text(f: &Field, col: &str, at: &dyn Fn() -> String) -> Result<String> {
    match f {
        Field::Str(s) => Ok(s.clone()),
        Field::Null => Ok(String::new()),
        Field::Bytes(b) => Ok(String::from_utf8_lossy(b.data()).into_owned()),
        other => bail!("{}: column `{col}` should be a string, found {other:?}", at()),
    }
}

/// Reads a split file. Rows that cannot be trained on (answer index out of range, fewer than two
/// choices, image bytes that are not a readable image) are skipped and reported in `skipped`;
/// a file whose columns differ from the layout is an error naming the column.
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
    let mut problems = vec![];
    let mut skipped = vec![];
    let rows = reader.get_row_iter(None).with_context(|| format!("{}: cannot read rows", path.display()))?;
    for (i, row) in rows.enumerate() {
        let row = row.with_context(|| format!("{}: row {i} is unreadable", path.display()))?;
        let pid = format!("{split}-{i}");
        let at = || format!("{} row {i}", path.display());
        let mut p = Problem { pid: pid.clone(), ..Default::default() };
        let mut answer: Option<i64> = None;
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
                    answer = Some(match field {
                        Field::Byte(v) => *v as i64,
                        Field::Short(v) => *v as i64,
                        Field::Int(v) => *v as i64,
                        Field::Long(v) => *v,
                        Field::UByte(v) => *v as i64,
                        Field::Null => -1,
                        other => bail!("{}: column `answer` should be an integer, found {other:?}", at()),
                    })
                }
                "choices" => match field {
                    Field::ListInternal(list) => {
                        p.choices = list.elements().iter().map(|e| text(e, "choices", &at)).collect::<Result<_>>()?
                    }
                    Field::Null => p.choices = vec![],
                    other => bail!("{}: column `choices` should be a list of strings, found {other:?}", at()),
                },
                "image" => match field {
                    Field::Null => p.image = None,
                    Field::Group(g) => {
                        for (k, v) in g.get_column_iter() {
                            if k == "bytes" {
                                p.image = match v {
                                    Field::Bytes(b) if !b.data().is_empty() => Some(b.data().to_vec()),
                                    Field::Bytes(_) | Field::Null => None,
                                    other => bail!("{}: column `image.bytes` should be binary, found {other:?}", at()),
                                };
                            }
                        }
                    }
                    other => bail!("{}: column `image` should be a struct{{bytes, path}}, found {other:?}", at()),
                },
                _ => {}
            }
        }
        let answer = answer.unwrap_or(-1);
        let reason = if p.choices.len() < 2 {
            Some(format!("{} choice(s); a question needs at least two", p.choices.len()))
        } else if p.choices.len() > 26 {
            Some(format!("{} choices; letters run out after Z", p.choices.len()))
        } else if answer < 0 || answer as usize >= p.choices.len() {
            Some(format!("answer index {answer} is outside the {} choices", p.choices.len()))
        } else if let Some(Err(e)) = p.image.as_ref().map(|b| crate::data::image::probe(b)) {
            Some(format!("image bytes are not a readable image: {e}"))
        } else {
            None
        };
        match reason {
            Some(reason) => skipped.push(Skipped { pid, reason }),
            None => {
                p.answer = answer as usize;
                problems.push(p)
            }
        }
    }
    Ok(Split { name: split.to_string(), problems, skipped })
}
