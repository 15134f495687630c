//! The prompt and target (docs/ARCHITECTURE.md, "The data path"): one Gemma chat turn for the user (image block,
//! question, context, lettered choices), one for the model (chain-of-thought reasoning and the
//! final answer, or the final answer alone). Training and inference build the user turn here.

use crate::data::scienceqa::Problem;
use anyhow::{bail, Result};
use tokenizers::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// "Step-by-step reasoning: {lecture} {solution} Final Answer: X) choice"
    Mcot,
    /// "Final Answer: X) choice"
    Answer,
}

pub fn letter(i: usize) -> char {
    (b'A' + i as u8) as char
}

/// "A) x; B) y; C) z"
pub fn choices_line(choices: &[String]) -> String {
    choices.iter().enumerate().map(|(i, c)| format!("{}) {c}", letter(i))).collect::<Vec<_>>().join("; ")
}

/// The placeholder the tokenizer turns into one image position; the user turn holds one per patch.
pub const IMAGE_TOKEN: &str = "<image_soft_token>";

/// The rendered user turn, ending with the opened model turn (what generation continues from).
pub fn user_turn(question: &str, context: &str, choices: &[String], image_tokens: Option<usize>) -> String {
    let image = match image_tokens {
        Some(n) => format!("<start_of_image>{}<end_of_image>\n", IMAGE_TOKEN.repeat(n)),
        None => String::new(),
    };
    let context = if context.trim().is_empty() { "N/A" } else { context.trim() };
    format!(
        "<bos><start_of_turn>user\n{image}Question: {}\nContext: {context}\nChoices: {}<end_of_turn>\n<start_of_turn>model\n",
        question.trim(),
        choices_line(choices)
    )
}

/// The model turn the loss is taken on, closed by `<end_of_turn>`.
pub fn model_turn(p: &Problem, target: Target) -> String {
    let answer = format!("Final Answer:\n{}) {}<end_of_turn>", letter(p.answer), p.choices[p.answer]);
    match target {
        Target::Answer => answer,
        Target::Mcot => {
            let mut lines = vec!["Step-by-step reasoning:".to_string()];
            lines.extend([p.lecture.trim(), p.solution.trim()].iter().filter(|s| !s.is_empty()).map(|s| s.to_string()));
            format!("{}\n\n{answer}", lines.join("\n"))
        }
    }
}

/// Token ids with transformers-style labels (-100 outside the model turn).
#[derive(Debug, Clone)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub truncated: bool,
}

/// Tokenizes prompt + target in one pass (so no merge is split at the boundary) and labels the
/// tokens that start inside the model turn. `image_tokens` must match the image's patch count.
pub fn encode(
    tok: &Tokenizer,
    p: &Problem,
    image_tokens: Option<usize>,
    image_token_id: u32,
    target: Target,
    max_len: usize,
) -> Result<Encoded> {
    let user = user_turn(&p.question, &p.hint, &p.choices, image_tokens);
    let text = format!("{user}{}", model_turn(p, target));
    let enc = tok.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    let mut ids = enc.get_ids().to_vec();
    let n_img = ids.iter().filter(|&&i| i == image_token_id).count();
    if n_img != image_tokens.unwrap_or(0) {
        bail!(
            "the tokenizer gives {n_img} image tokens for {} `<image_soft_token>`s: does it define <image_soft_token> as id {image_token_id}?",
            image_tokens.unwrap_or(0)
        );
    }
    let boundary = user.len();
    let mut labels: Vec<i64> = ids
        .iter()
        .zip(enc.get_offsets())
        .map(|(&id, &(start, _))| if start >= boundary { id as i64 } else { -100 })
        .collect();
    let truncated = ids.len() > max_len;
    if truncated {
        ids.truncate(max_len);
        labels.truncate(max_len);
    }
    Ok(Encoded { ids, labels, truncated })
}
