//! Loading a model for answering, and the `infer` and `eval` commands.

use crate::config::{ClipVisionConfig, LlmConfig};
use crate::data::image::{Aspect, ImageProcessor};
use crate::data::prompt::{letter, user_turn};
use crate::data::scienceqa::{read_split, split_file};
use crate::device;
use crate::eval::{breakdown, parse_answer, table, Scored};
use crate::generate::{generate, GenerateOptions};
use crate::hub;
use crate::model::clip::ClipVision;
use crate::model::gemma3::{BaseFormat, Gemma3Text};
use crate::model::projector::Projector;
use crate::model::vlm::Vlm;
use crate::peft::adapter::Adapter;
use crate::weights::Weights;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the base models come from (the same flags as `train`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelArgs {
    pub preset_tiny: bool,
    pub model: String,
    pub vision_model: String,
    pub four_bit: bool,
}

/// The frozen base: Gemma text model and CLIP tower, with their configs and directories.
pub struct Base {
    pub llm: Gemma3Text,
    pub vision: ClipVision,
    pub cfg: LlmConfig,
    pub vcfg: ClipVisionConfig,
    pub llm_dir: PathBuf,
    pub vis_dir: PathBuf,
}

pub fn load_base(m: &ModelArgs, dtype: DType, dev: &Device) -> Result<Base> {
    let (llm_dir, vis_dir) = if m.preset_tiny {
        hub::tiny_model()?
    } else {
        (hub::resolve_model(&m.model, "--model")?, hub::resolve_model(&m.vision_model, "--vision-model")?)
    };
    let cfg = LlmConfig::from_file(&llm_dir.join("config.json"))?;
    let vcfg = ClipVisionConfig::from_file(&vis_dir.join("config.json"))?;
    let format = if m.four_bit { BaseFormat::Nf4 } else { BaseFormat::Dense };
    let llm = Gemma3Text::load(Weights::open(&llm_dir, dtype, dev)?, &cfg.text, format)?;
    let vision = ClipVision::load(Weights::open(&vis_dir, dtype, dev)?, &vcfg)?;
    Ok(Base { llm, vision, cfg, vcfg, llm_dir, vis_dir })
}

pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("{}: cannot load the tokenizer: {e}", path.display()))
}

/// A model ready to answer.
pub struct Answerer {
    pub vlm: Vlm,
    pub tokenizer: tokenizers::Tokenizer,
    pub images: ImageProcessor,
    /// False when no projector was given: image questions are refused.
    pub has_projector: bool,
}

pub struct AnswererArgs<'a> {
    pub model: &'a ModelArgs,
    pub adapter_dir: Option<&'a Path>,
    pub projector_path: Option<&'a Path>,
    pub tokenizer_dir: Option<&'a Path>,
    pub image_aspect: Aspect,
}

pub fn load_answerer(a: &AnswererArgs) -> Result<Answerer> {
    let dev = device::best_device()?;
    let dtype = device::default_dtype(&dev);
    let mut base = load_base(a.model, dtype, &dev)?;
    if let Some(dir) = a.adapter_dir {
        let (adapter, scale) = Adapter::load(dir, &dev)?;
        adapter.attach(&mut base.llm, scale).with_context(|| format!("--adapter-dir {}", dir.display()))?;
        base.llm.freeze_adapters();
    }
    let (projector, has_projector) = match a.projector_path {
        Some(p) => {
            let w =
                Weights::open_file(p, DType::F32, &dev).with_context(|| format!("--projector-path {}", p.display()))?;
            (Projector::load(&w, base.vcfg.hidden_size, base.cfg.text.hidden_size)?, true)
        }
        // Never applied: image questions are refused without a projector.
        None => (Projector::init(base.vcfg.hidden_size, base.cfg.text.hidden_size, 0, &dev)?, false),
    };
    let tokenizer = load_tokenizer(a.tokenizer_dir.unwrap_or(&base.llm_dir))?;
    let images = ImageProcessor::from_dir(&base.vis_dir, base.vcfg.image_size, a.image_aspect)?;
    Ok(Answerer {
        vlm: Vlm { vision: base.vision, projector, llm: base.llm, cfg: base.cfg },
        tokenizer,
        images,
        has_projector,
    })
}

impl Answerer {
    pub fn image_tokens(&self) -> usize {
        self.vlm.vision.cfg.num_patches()
    }

    pub fn stop_ids(&self) -> Vec<u32> {
        let mut s = self.vlm.cfg.eos_token_ids.clone();
        for t in ["<end_of_turn>", "<eos>"] {
            if let Some(id) = self.tokenizer.token_to_id(t) {
                if !s.contains(&id) {
                    s.push(id);
                }
            }
        }
        s
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    fn pixels(&self, images: &[Vec<f32>]) -> Result<Option<Tensor>> {
        if images.is_empty() {
            return Ok(None);
        }
        if !self.has_projector {
            bail!("an image question needs the trained projector: pass --projector-path");
        }
        let s = self.images.size;
        let flat: Vec<f32> = images.iter().flatten().copied().collect();
        Ok(Some(Tensor::from_vec(flat, (images.len(), 3, s, s), self.vlm.llm.device())?))
    }
}

/// "A) Photosynthesis; B) The Water Cycle" or plain "x; y; z" -> the choice texts.
pub fn parse_choices(s: &str) -> Result<Vec<String>> {
    let items: Vec<String> = s
        .split(';')
        .map(|c| {
            let c = c.trim();
            let mut cs = c.chars();
            match (cs.next(), cs.next()) {
                (Some(l), Some(')')) if l.is_ascii_uppercase() => c[2..].trim().to_string(),
                _ => c.to_string(),
            }
        })
        .filter(|c| !c.is_empty())
        .collect();
    if items.len() < 2 {
        bail!("--choices: need at least two choices separated by ';', got {s:?}");
    }
    Ok(items)
}

pub struct InferArgs {
    pub image_path: Option<PathBuf>,
    pub question: String,
    pub context: String,
    pub choices: String,
    pub options: GenerateOptions,
    pub json: bool,
}

/// Answers one question, streaming the model turn to stdout (or printing one JSON object).
pub fn infer(model: &Answerer, a: &InferArgs) -> Result<()> {
    let choices = parse_choices(&a.choices)?;
    let image = match &a.image_path {
        Some(p) => Some(model.images.process_file(p).with_context(|| format!("--image-path {}", p.display()))?),
        None => None,
    };
    let prompt = user_turn(&a.question, &a.context, &choices, image.as_ref().map(|_| model.image_tokens()));
    let ids = model.encode(&prompt)?;
    let pixels = model.pixels(&image.into_iter().collect::<Vec<_>>())?;
    let mut shown = String::new();
    let mut so_far = vec![];
    let stdout = std::io::stdout();
    let mut on_token = |_: usize, t: u32| {
        so_far.push(t);
        if !a.json {
            if let Ok(text) = model.decode(&so_far) {
                if text.len() > shown.len() && text.starts_with(&shown) {
                    let mut out = stdout.lock();
                    let _ = write!(out, "{}", &text[shown.len()..]);
                    let _ = out.flush();
                    shown = text;
                }
            }
        }
    };
    let (gen, timings) = generate(&model.vlm, &[ids], pixels.as_ref(), &a.options, &mut on_token)?;
    let g = &gen[0];
    let text = model.decode(&g.tokens)?;
    let answer = parse_answer(&text, choices.len());
    if a.json {
        let reasoning = text.split("Final Answer:").next().unwrap_or("").trim();
        let reasoning = reasoning.strip_prefix("Step-by-step reasoning:").unwrap_or(reasoning).trim();
        let v = serde_json::json!({
            "reasoning": reasoning,
            "answer": answer.map(|i| letter(i).to_string()),
            "answer_index": answer,
            "answer_text": answer.map(|i| choices[i].clone()),
            "text": text,
            "prompt_tokens": g.prompt_tokens,
            "generated_tokens": g.tokens.len(),
            "stopped": g.stopped,
            "time_to_first_token_ms": timings.time_to_first_token_s * 1e3,
            "decode_tokens_per_s": if timings.decode_s > 0.0 { timings.decode_steps as f64 / timings.decode_s } else { 0.0 },
        });
        println!("{v}");
    } else {
        if !text.starts_with(&shown) || shown.len() < text.len() {
            print!("{}", &text[shown.len().min(text.len())..]);
        }
        println!();
        if answer.is_none() {
            eprintln!("(no answer letter could be read from the output)");
        }
    }
    Ok(())
}

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
}

pub struct EvalArgs {
    pub split: String,
    pub limit: Option<usize>,
    pub batch_size: usize,
    pub max_new_tokens: usize,
    pub output_dir: PathBuf,
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

/// Runs every question of the split (resuming from predictions.jsonl), then writes results.json
/// (`{"results": {pid: index}}` as the official scorer reads it, plus the breakdown) and prints it.
pub fn eval(model: &Answerer, data_dir: &Path, a: &EvalArgs) -> Result<Vec<crate::eval::Column>> {
    let split = read_split(&split_file(data_dir, &a.split)?, &a.split)?;
    for s in &split.skipped {
        eprintln!("skipped {}: {}", s.pid, s.reason);
    }
    let mut problems = split.problems;
    if let Some(n) = a.limit {
        problems.truncate(n);
    }
    std::fs::create_dir_all(&a.output_dir).with_context(|| format!("cannot create {}", a.output_dir.display()))?;
    let pred_path = a.output_dir.join("predictions.jsonl");
    let mut done = read_predictions(&pred_path)?;
    // rewrite without a torn last line, then append
    let mut text = String::new();
    for p in done.values() {
        text.push_str(&serde_json::to_string(p)?);
        text.push('\n');
    }
    crate::safetensors_out::write_atomic(&pred_path, text.as_bytes())?;
    let todo: Vec<_> = problems.iter().filter(|p| !done.contains_key(&p.pid)).collect();
    if !done.is_empty() {
        eprintln!("resuming: {} of {} questions already answered", problems.len() - todo.len(), problems.len());
    }
    let bar = device::progress_bar(problems.len(), problems.len() - todo.len());
    let mut file = std::fs::OpenOptions::new().append(true).open(&pred_path)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
        stop_ids: model.stop_ids(),
    };
    let started = Instant::now();
    for chunk in todo.chunks(a.batch_size.max(1)) {
        let mut prompts = vec![];
        let mut images = vec![];
        for p in chunk {
            let img = match &p.image {
                Some(b) => Some(model.images.process_bytes(b).with_context(|| format!("row {}", p.pid))?),
                None => None,
            };
            prompts.push(model.encode(&user_turn(
                &p.question,
                &p.hint,
                &p.choices,
                img.as_ref().map(|_| model.image_tokens()),
            ))?);
            images.extend(img);
        }
        let pixels = model.pixels(&images)?;
        let (gen, _) = generate(&model.vlm, &prompts, pixels.as_ref(), &opts, &mut |_, _| {})?;
        for (p, g) in chunk.iter().zip(gen) {
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
            };
            writeln!(file, "{}", serde_json::to_string(&pred)?)?;
            file.flush()?;
            done.insert(pred.pid.clone(), pred);
        }
        let correct = done.values().filter(|p| p.correct).count();
        bar.set_position(done.len().min(problems.len()) as u64);
        bar.set_message(format!("accuracy {:.1}%", correct as f64 / done.len().max(1) as f64 * 100.0));
        if bar.is_hidden() {
            eprintln!(
                "{}/{} answered, running accuracy {:.2}%",
                done.len(),
                problems.len(),
                correct as f64 / done.len().max(1) as f64 * 100.0
            );
        }
    }
    bar.finish_and_clear();
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
        "skipped": split.skipped.iter().map(|s| serde_json::json!({"pid": s.pid, "reason": s.reason})).collect::<Vec<_>>(),
        "results": results,
        "breakdown": cols,
        "seconds": started.elapsed().as_secs_f64(),
    });
    crate::safetensors_out::write_atomic(
        &a.output_dir.join("results.json"),
        (serde_json::to_string_pretty(&out)? + "\n").as_bytes(),
    )?;
    let t = table(&cols);
    crate::safetensors_out::write_atomic(&a.output_dir.join("breakdown.txt"), t.as_bytes())?;
    print!("{t}");
    Ok(cols)
}
