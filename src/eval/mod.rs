//! `gemmaclip eval`: every question of a ScienceQA split answered (batched, resumable through
//! predictions.jsonl), then scored with the official breakdown (`score`). With several workers
//! (`eval --nproc-per-node N`), each answers every N-th open question into its own
//! predictions.rank<R>.jsonl, and rank 0 merges them into predictions.jsonl in pid order (a run
//! cut short leaves them behind, and the next run, with any number of workers, takes them in).

mod chart;
pub mod fingerprint;
mod score;

pub use score::{breakdown, parse_answer, table, Column, Scored};

use crate::data::prompt::{letter, user_turn};
use crate::data::scienceqa::{read_split, split_file};
use crate::device;
use crate::generate::{generate, GenerateOptions};
use crate::load::Answerer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One line of predictions.jsonl.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prediction {
    pub pid: String,
    /// "image" or "text".
    pub prompt_kind: String,
    pub text: String,
    /// The parsed letter, None when unparseable (scored as wrong).
    pub predicted: Option<String>,
    pub predicted_index: i64,
    pub answer: String,
    pub correct: bool,
    /// `fingerprint::short_id` of what produced the answer (the directory's eval.json).
    #[serde(default)]
    pub fingerprint: String,
}

pub struct EvalArgs {
    pub split: String,
    pub limit: Option<usize>,
    /// None: as many as the device's memory holds (Gemma3Text::fitting_batch).
    pub batch_size: Option<usize>,
    pub max_new_tokens: usize,
    pub output_dir: PathBuf,
    /// Seconds the workers of a run of several wait for each other at the start.
    pub rendezvous_timeout: u64,
    /// Seconds a worker may go without finishing a batch before the run stops as hung (0: never).
    pub collective_timeout: u64,
}

/// How the answers are generated and what they come from.
pub struct Generation {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub seed: u64,
    /// `fingerprint::Sources::to_json` of the answering model.
    pub sources: serde_json::Value,
    /// Delete the directory's earlier answers instead of resuming from them.
    pub start_over: bool,
}

impl Default for Generation {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0, sources: serde_json::Value::Null, start_over: false }
    }
}

/// `<split>-<row>` ordered by split, then row number (test-2 before test-10).
fn pid_order(pid: &str) -> (String, u64) {
    match pid.rsplit_once('-') {
        Some((split, row)) => (split.to_string(), row.parse().unwrap_or(u64::MAX)),
        None => (pid.to_string(), u64::MAX),
    }
}

fn read_predictions(path: &Path) -> Result<BTreeMap<String, Prediction>> {
    let mut done = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(path) {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let p: Prediction = match serde_json::from_str(line) {
                Ok(p) => p,
                // a line cut by an interrupted write: that question is simply asked again
                Err(_) if i + 1 == text.lines().count() => continue,
                Err(e) => bail!("{} line {}: {e}", path.display(), i + 1),
            };
            done.insert(p.pid.clone(), p);
        }
    }
    Ok(done)
}

/// The answers of the workers of a run of several, before rank 0 merges them.
pub fn rank_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.strip_prefix("predictions.rank")
                    .and_then(|r| r.strip_suffix(".jsonl"))
                    .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
            })
        })
        .collect();
    found.sort();
    found
}

/// predictions.jsonl with every worker's answers taken in, in pid order, written whole (no torn
/// last line); the workers' files are removed once it is written. Returns the answers.
fn merge_predictions(dir: &Path) -> Result<BTreeMap<String, Prediction>> {
    let pred_path = dir.join("predictions.jsonl");
    let mut done = read_predictions(&pred_path)?;
    let ranks = rank_files(dir);
    for r in &ranks {
        done.extend(read_predictions(r)?);
    }
    let mut ordered: Vec<&Prediction> = done.values().collect();
    ordered.sort_by_key(|p| pid_order(&p.pid));
    let mut text = String::new();
    for p in ordered {
        text.push_str(&serde_json::to_string(p)?);
        text.push('\n');
    }
    crate::safetensors_out::write_atomic(&pred_path, text.as_bytes())?;
    for r in &ranks {
        std::fs::remove_file(r).with_context(|| format!("cannot remove {}", r.display()))?;
    }
    Ok(done)
}

/// Runs every question of the split (resuming from predictions.jsonl when it holds answers of the
/// same model, settings and split), then writes results.json (`{"results": {pid: index}}` as the
/// official scorer reads it, plus the breakdown) and prints it. As a worker of several
/// (WORLD_SIZE set), it answers its share and rank 0 scores them all; the others return no columns.
pub fn eval(model: &Answerer, data_dir: &Path, a: &EvalArgs, g: &Generation) -> Result<Vec<Column>> {
    let settings =
        format!("{:?} {:?} {:?} {} {} {}", a.split, a.limit, a.output_dir, a.max_new_tokens, g.sources, g.seed);
    let timeout = std::time::Duration::from_secs(a.rendezvous_timeout);
    // answers need no collective: the TCP links carry the two waits
    crate::dist::worker::as_worker(
        model.vlm.llm.device(),
        &settings,
        timeout,
        crate::dist::worker::Nccl::No,
        |worker| eval_ranked(model, data_dir, a, g, worker),
    )
}

fn eval_ranked(
    model: &Answerer,
    data_dir: &Path,
    a: &EvalArgs,
    g: &Generation,
    worker: Option<&crate::dist::worker::Worker>,
) -> Result<Vec<Column>> {
    let ranks = crate::train::data_parallel::Ranks { worker };
    let (main, rank, world) = (ranks.is_main(), ranks.rank(), ranks.world());
    let split = read_split(&split_file(data_dir, &a.split)?, &a.split)?;
    if main {
        split.report_skipped();
    }
    let mut problems = split.problems;
    if let Some(n) = a.limit {
        problems.truncate(n);
    }
    if main {
        std::fs::create_dir_all(&a.output_dir).with_context(|| format!("cannot create {}", a.output_dir.display()))?;
    }
    let split_path = split_file(data_dir, &a.split)?;
    let fp = serde_json::json!({
        "split": a.split,
        "data_sha256": crate::sha::file_sha256(&split_path)?,
        "sources": g.sources,
        "generation": {
            "max_new_tokens": a.max_new_tokens,
            "temperature": g.temperature,
            "top_p": g.top_p,
            "top_k": g.top_k,
            "seed": g.seed,
        },
    });
    let fp_id = fingerprint::short_id(&fp);
    let pred_path = a.output_dir.join("predictions.jsonl");
    // rank 0 claims the directory and takes in what earlier workers left; then everyone reads it
    let mut earlier_seconds = 0.0;
    if main {
        earlier_seconds = fingerprint::claim(&a.output_dir, &fp, g.start_over)?;
        fingerprint::save(&a.output_dir, &fingerprint::Manifest { fingerprint: fp.clone(), seconds: earlier_seconds })?;
        merge_predictions(&a.output_dir)?;
    }
    ranks.barrier()?;
    ranks.start_watch(std::time::Duration::from_secs(a.collective_timeout))?;
    let mut manifest = fingerprint::Manifest { fingerprint: fp, seconds: earlier_seconds };
    let mut done = read_predictions(&pred_path)?;
    if let Some(stale) = done.values().find(|p| p.fingerprint != fp_id) {
        bail!(
            "{}: the answer to {} was produced by another model or other settings than eval.json records; start over with --overwrite-output-dir",
            pred_path.display(),
            stale.pid
        );
    }
    let mut todo: Vec<_> = problems.iter().filter(|p| !done.contains_key(&p.pid)).collect();
    todo.sort_by_key(|p| pid_order(&p.pid));
    if !done.is_empty() && main {
        eprintln!("resuming: {} of {} questions already answered", problems.len() - todo.len(), problems.len());
    }
    let open = todo.len();
    // every world-th open question, so each worker gets a like mix of the split
    let todo: Vec<_> = todo.into_iter().skip(rank).step_by(world).collect();
    // prompts encoded once; with batches, questions of like length go together, so little of a
    // batch is padding (predictions.jsonl is put back in pid order at the end)
    let mut todo: Vec<(&crate::data::scienceqa::Problem, Vec<u32>)> = todo
        .into_iter()
        .map(|p| {
            let image = p.image.as_ref().map(|_| model.image_tokens());
            Ok((p, model.encode(&user_turn(&p.question, &p.hint, &p.choices, image))?))
        })
        .collect::<Result<_>>()?;
    let longest = todo.iter().map(|(_, ids)| ids.len()).max().unwrap_or(0);
    let batch = match a.batch_size {
        Some(b) => b,
        None => {
            let max_pos = model.vlm.cfg.text.max_position_embeddings;
            let room = crate::generate::CACHE_ROOM;
            let first = crate::generate::cache_columns(longest, a.max_new_tokens, room, None, max_pos);
            let whole = crate::generate::cache_columns(longest, a.max_new_tokens, usize::MAX, None, max_pos);
            let b = model.vlm.llm.fitting_batch(longest, whole, whole > first)?;
            if main && b > 1 {
                eprintln!("eval: {b} questions at a time (what the GPU's free memory holds; --batch-size sets it)");
            }
            b
        }
    };
    if batch > 1 {
        todo.sort_by_key(|(_, ids)| ids.len());
    }
    let bar = if main {
        device::progress_bar(problems.len(), problems.len() - open)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let out_path =
        if world > 1 { a.output_dir.join(format!("predictions.rank{rank}.jsonl")) } else { pred_path.clone() };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out_path)
        .with_context(|| format!("cannot open {}", out_path.display()))?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: g.temperature,
        top_p: g.top_p,
        top_k: g.top_k,
        seed: g.seed,
        stop_ids: model.stop_ids(),
        cache_room: crate::generate::CACHE_ROOM,
    };
    let started = Instant::now();
    let mut new_tokens = 0usize;
    for chunk in todo.chunks(batch.max(1)) {
        let mut prompts = vec![];
        let mut images = vec![];
        for (p, ids) in chunk {
            if let Some(b) = &p.image {
                images.push(model.images.process_bytes(b).with_context(|| format!("row {}", p.pid))?);
            }
            prompts.push(ids.clone());
        }
        let pixels = model.pixels(&images)?;
        let (gen, _) = generate(&model.vlm, &prompts, pixels.as_ref(), &opts, &mut |_, _| {})?;
        new_tokens += gen.iter().map(|g| g.tokens.len()).sum::<usize>();
        for ((p, _), g) in chunk.iter().zip(gen) {
            let text = model.decode(&g.tokens)?;
            let idx = parse_answer(&text, p.choices.len());
            let pred = Prediction {
                pid: p.pid.clone(),
                prompt_kind: if p.image.is_some() { "image" } else { "text" }.into(),
                text,
                predicted: idx.map(|i| letter(i).to_string()),
                predicted_index: idx.map_or(-1, |i| i as i64),
                answer: letter(p.answer).to_string(),
                correct: idx == Some(p.answer),
                fingerprint: fp_id.clone(),
            };
            writeln!(file, "{}", serde_json::to_string(&pred)?)
                .and_then(|()| file.flush())
                .with_context(|| format!("cannot write {}", out_path.display()))?;
            done.insert(pred.pid.clone(), pred);
        }
        ranks.progress();
        if !main {
            continue;
        }
        manifest.seconds = earlier_seconds + started.elapsed().as_secs_f64();
        fingerprint::save(&a.output_dir, &manifest)?;
        let correct = done.values().filter(|p| p.correct).count();
        // rank 0 sees its own answers; the others answer as many
        let answered = (problems.len() - open) + (done.len() - (problems.len() - open)) * world;
        bar.set_position(answered.min(problems.len()) as u64);
        bar.set_message(format!("accuracy {:.1}%", correct as f64 / done.len().max(1) as f64 * 100.0));
        if bar.is_hidden() {
            eprintln!(
                "{}/{} answered, running accuracy {:.2}%",
                answered.min(problems.len()),
                problems.len(),
                correct as f64 / done.len().max(1) as f64 * 100.0
            );
        }
    }
    bar.finish_and_clear();
    drop(file);
    ranks.barrier()?;
    if !main {
        return Ok(vec![]);
    }
    done = merge_predictions(&a.output_dir)?;
    if world > 1 {
        let lost: Vec<&str> = problems.iter().filter(|p| !done.contains_key(&p.pid)).map(|p| p.pid.as_str()).collect();
        if !lost.is_empty() {
            bail!(
                "{} of the workers' answers (e.g. {}) are not in {}: workers on several hosts need --output-dir on a disk they all share; run eval again to answer them",
                lost.len(),
                lost[0],
                a.output_dir.display()
            );
        }
    }
    let scored: Vec<Scored> = problems
        .iter()
        .map(|p| Scored::of(p, done.get(&p.pid).and_then(|d| usize::try_from(d.predicted_index).ok())))
        .collect();
    let cols = breakdown(&scored);
    let results: BTreeMap<&str, i64> =
        problems.iter().map(|p| (p.pid.as_str(), done.get(&p.pid).map_or(-1, |d| d.predicted_index))).collect();
    let out = serde_json::json!({
        "split": a.split,
        "count": problems.len(),
        "images_lost": split.images_lost,
        "skipped": split.skipped.iter().map(|s| serde_json::json!({"pid": s.pid, "reason": s.reason})).collect::<Vec<_>>(),
        "results": results,
        "breakdown": cols,
        "seconds": manifest.seconds,
    });
    crate::safetensors_out::write_atomic(
        &a.output_dir.join("results.json"),
        (serde_json::to_string_pretty(&out)? + "\n").as_bytes(),
    )?;
    let t = table(&cols);
    crate::safetensors_out::write_atomic(&a.output_dir.join("breakdown.txt"), t.as_bytes())?;
    let chart = a.output_dir.join("accuracy.png");
    chart::accuracy_by_category(&cols, &a.split, &chart)?;
    print!("{t}");
    let secs = started.elapsed().as_secs_f64();
    let workers = if world > 1 { format!(" by {world} workers") } else { String::new() };
    let rate = if world > 1 { "new tokens/s on rank 0" } else { "new tokens/s" };
    eprintln!(
        "answered {open} questions{workers} in {secs:.1} s ({:.0} {rate}; {:.1} s in all over every run)",
        new_tokens as f64 / secs.max(1e-9),
        manifest.seconds
    );
    let o = |f: &str| a.output_dir.join(f).display().to_string();
    eprintln!("predictions: {}", o("predictions.jsonl"));
    eprintln!("results:     {} (the official scorer's input)", o("results.json"));
    eprintln!("breakdown:   {} and {}", o("breakdown.txt"), chart.display());
    Ok(cols)
}
