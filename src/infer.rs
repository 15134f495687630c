//! `gemmaclip infer`: one image + question + choices, the model turn streamed to stdout.

use crate::data::prompt::{letter, user_turn};
use crate::eval::parse_answer;
use crate::generate::{generate, GenerateOptions};
use crate::load::Answerer;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;

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
    if items.len() > 26 {
        bail!("--choices: {} choices; the letters A-Z allow at most 26", items.len());
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
    let mut stream = Streamer::default();
    let mut so_far = vec![];
    let stdout = std::io::stdout();
    let mut on_token = |_: usize, t: u32| {
        so_far.push(t);
        if !a.json {
            // A run of byte-fallback pieces decodes as one group (all U+FFFD when the group is not
            // valid UTF-8), so text that ends inside such a run may still change: print only up to
            // the last piece that closes the run.
            let stable = so_far.iter().rposition(|&t| model.closes_byte_run(t)).map_or(0, |i| i + 1);
            if let Ok(text) = model.decode(&so_far[..stable]) {
                let new = stream.update(&text);
                if !new.is_empty() {
                    let mut out = stdout.lock();
                    let _ = write!(out, "{new}");
                    let _ = out.flush();
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
        print!("{}", stream.finish(&text));
        println!();
        if answer.is_none() {
            eprintln!("(no answer letter could be read from the output)");
        }
    }
    Ok(())
}

/// Turns the text decoded so far into the pieces to print. Byte-fallback tokens can complete a
/// character over several steps, and until then the decoded text ends in U+FFFD; printing stops
/// before it, and every slice is taken at a character boundary of what was already shown.
#[derive(Debug, Default)]
pub struct Streamer {
    shown: String,
}

impl Streamer {
    /// The new text to print after the whole output decoded to `text` so far.
    pub fn update(&mut self, text: &str) -> String {
        let stable = text.trim_end_matches('\u{FFFD}');
        self.advance(stable)
    }

    /// What remains to print once generation has ended and the output decodes to `text`.
    pub fn finish(&mut self, text: &str) -> String {
        self.advance(text)
    }

    fn advance(&mut self, text: &str) -> String {
        if let Some(new) = text.strip_prefix(self.shown.as_str()) {
            let new = new.to_string();
            self.shown = text.to_string();
            return new;
        }
        // A later decode rewrote text already printed, which cannot be taken back: go on from the
        // first character boundary past what was shown, once the text has grown that far.
        let mut at = self.shown.len();
        while at < text.len() && !text.is_char_boundary(at) {
            at += 1;
        }
        if at >= text.len() {
            return String::new();
        }
        let new = text[at..].to_string();
        self.shown = text.to_string();
        new
    }
}
