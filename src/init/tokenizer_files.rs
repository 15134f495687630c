//! Gemma-style tokenizer files for random-weight checkpoints: `tokenizer.json` in the layout of
//! Gemma 3's (BPE with byte fallback, " " -> "▁", `<bos>` prepended by the post-processor) and
//! `tokenizer_config.json` with Gemma's special tokens and chat template. The vocabulary is
//! synthetic (single characters and bytes) but keeps Gemma's ids for the special tokens.

use serde_json::{json, Map, Value};

/// Where the image tokens sit: at Gemma's real ids (255999, 256000, 262144) for the full-size
/// preset, or remapped for a small vocabulary.
pub struct TokenLayout {
    pub boi: u32,
    pub eoi: u32,
    /// `<image_soft_token>`: an added token just past the model vocabulary, as in Gemma 3.
    pub image: u32,
}

pub const CHAT_TEMPLATE: &str = include_str!("../../assets/gemma3_chat_template.jinja");

fn added(id: u32, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": special})
}

/// (id, content) of the named special tokens (all of them `special: true`).
fn named_specials(l: &TokenLayout) -> Vec<(u32, &'static str)> {
    vec![
        (0, "<pad>"),
        (1, "<eos>"),
        (2, "<bos>"),
        (3, "<unk>"),
        (4, "<mask>"),
        (5, "[multimodal]"),
        (105, "<start_of_turn>"),
        (106, "<end_of_turn>"),
        (l.boi, "<start_of_image>"),
        (l.eoi, "<end_of_image>"),
        (l.image, "<image_soft_token>"),
    ]
}

/// The model vocabulary (ids 0..image) as pieces.
fn vocab_pieces(l: &TokenLayout) -> Vec<String> {
    let n = l.image as usize;
    let mut pieces: Vec<Option<String>> = vec![None; n];
    for (id, s) in named_specials(l) {
        if (id as usize) < n {
            pieces[id as usize] = Some(s.to_string());
        }
    }
    pieces[107] = Some("\n".into());
    let mut next = 108usize;
    let mut place = |pieces: &mut Vec<Option<String>>, s: String| {
        while pieces[next].is_some() {
            next += 1;
        }
        pieces[next] = Some(s);
    };
    for b in 0..=255u8 {
        place(&mut pieces, format!("<0x{b:02X}>"));
    }
    place(&mut pieces, "▁".into());
    for c in '!'..='~' {
        place(&mut pieces, c.to_string());
    }
    let mut unused = 0;
    pieces
        .into_iter()
        .map(|p| {
            p.unwrap_or_else(|| {
                unused += 1;
                format!("<unused{}>", unused - 1)
            })
        })
        .collect()
}

pub fn tokenizer_json(l: &TokenLayout) -> Value {
    let pieces = vocab_pieces(l);
    let mut vocab = Map::new();
    for (id, p) in pieces.iter().enumerate() {
        vocab.insert(p.clone(), json!(id));
    }
    let mut added_tokens: Vec<(u32, Value)> =
        named_specials(l).into_iter().map(|(id, s)| (id, added(id, s, true))).collect();
    // Gemma registers its low `<unusedN>` pieces (ids 6..105) as special added tokens; the filler
    // pieces of the large synthetic vocabulary stay plain vocabulary entries, so loading the
    // full-size tokenizer does not build a matcher over a quarter-million added tokens.
    for (id, p) in pieces.iter().enumerate().take(105) {
        if p.starts_with("<unused") {
            added_tokens.push((id as u32, added(id as u32, p, true)));
        }
    }
    added_tokens.sort_by_key(|(id, _)| *id);
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
}

pub fn tokenizer_config_json(l: &TokenLayout) -> Value {
    let mut decoder = Map::new();
    for (id, s) in named_specials(l) {
        decoder.insert(
            id.to_string(),
            json!({"content": s, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true}),
        );
    }
    json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "added_tokens_decoder": decoder,
        "boi_token": "<start_of_image>",
        "bos_token": "<bos>",
        "chat_template": CHAT_TEMPLATE.trim_end(),
        "clean_up_tokenization_spaces": false,
        "eoi_token": "<end_of_image>",
        "eos_token": "<eos>",
        "extra_special_tokens": {
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"
        },
        "image_token": "<image_soft_token>",
        "model_max_length": 1e30,
        "pad_token": "<pad>",
        "processor_class": "Gemma3Processor",
        "sp_model_kwargs": null,
        "spaces_between_special_tokens": false,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": false
    })
}

pub fn special_tokens_map_json() -> Value {
    let tok =
        |s: &str| json!({"content": s, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false});
    json!({
        "boi_token": "<start_of_image>",
        "bos_token": tok("<bos>"),
        "eoi_token": "<end_of_image>",
        "eos_token": tok("<eos>"),
        "image_token": "<image_soft_token>",
        "pad_token": tok("<pad>"),
        "unk_token": tok("<unk>")
    })
}

pub fn generation_config_json() -> Value {
    json!({
        "bos_token_id": 2, "cache_implementation": "hybrid", "do_sample": true, "eos_token_id": [1, 106],
        "pad_token_id": 0, "top_k": 64, "top_p": 0.95, "transformers_version": "4.50.0.dev0"
    })
}
