//! Parity with transformers: the tiny checkpoint through our models against reference tensors
//! made by tools/reference/make_parity_fixtures.py (transformers' Gemma3ForCausalLM,
//! CLIPVisionModel and the LLaVA-style splice), all in f32, max |diff| <= 1e-4.

mod common;

use candle_core::Device;
use common::{forward, max_abs_diff, tiny_dir, Fixture};

const TOL: f32 = 1e-4;

fn fixture() -> Fixture {
    let f = Fixture::load("parity.safetensors");
    // The fixtures were made from `init --preset tiny --seed 0`; if the generator changed, every
    // comparison below would fail for that reason alone, so say so first.
    let ours = forward::gemma(&Device::Cpu).embed_tokens.get(1).unwrap();
    assert_eq!(
        max_abs_diff(&ours, f.get("check.embed_tokens_row1")),
        0.0,
        "the tiny checkpoint differs from the one the fixtures were made from: regenerate them (tools/reference/README.md)"
    );
    f
}

#[test]
fn gemma_logits_match_transformers_past_the_sliding_window() {
    let f = fixture();
    let n = f.get("text.input_ids").dim(1).unwrap();
    assert!(n > 2 * forward::llm_cfg().text.sliding_window);
    let err = max_abs_diff(&forward::text_logits(&f, &Device::Cpu), f.get("text.logits"));
    println!("gemma logits, {n} tokens: max |diff| = {err:.3e}");
    assert!(err <= TOL, "max |diff| {err}");
}

#[test]
fn gemma_padded_batch_matches_transformers_on_valid_positions() {
    let f = fixture();
    let reference = f.get("batch.logits");
    let mut worst = 0f32;
    for (b, ours) in forward::batch_logits(&f, &Device::Cpu).iter().enumerate() {
        let theirs = reference.get(b).unwrap().narrow(0, 0, ours.dim(0).unwrap()).unwrap();
        worst = worst.max(max_abs_diff(ours, &theirs));
    }
    println!("gemma padded batch logits: max |diff| = {worst:.3e}");
    assert!(worst <= TOL, "max |diff| {worst}");
}

#[test]
fn clip_layer_minus_two_matches_transformers() {
    let f = fixture();
    let err = max_abs_diff(&forward::clip_features(&f, &Device::Cpu), f.get("clip.features"));
    println!("clip hidden_states[-2][:, 1:]: max |diff| = {err:.3e}");
    assert!(err <= TOL, "max |diff| {err}");
}

#[test]
fn llava_forward_loss_and_supervised_logits_match_transformers() {
    let f = fixture();
    let (loss, logits, n) = forward::llava(&f, &Device::Cpu);
    let loss_err = (loss - f.get("vlm.loss").to_scalar::<f32>().unwrap()).abs();
    let logit_err = max_abs_diff(&logits, f.get("vlm.supervised_logits"));
    println!(
        "llava forward: {n} supervised positions, loss |diff| = {loss_err:.3e}, logits max |diff| = {logit_err:.3e}"
    );
    assert!(loss_err <= TOL && logit_err <= TOL, "loss {loss_err}, logits {logit_err}");
}

#[test]
fn tokenizer_json_encodes_like_transformers() {
    let f = fixture();
    let tok = tokenizers::Tokenizer::from_file(tiny_dir().join("llm/tokenizer.json")).unwrap();
    let text = &f.metadata["text.prompt"];
    let ours = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
    let theirs: Vec<u32> = f.rows_i64("text.input_ids")[0].iter().map(|&x| x as u32).collect();
    assert_eq!(ours, theirs);
    // with special tokens, the post-processor prepends <bos> as Gemma's does
    assert_eq!(tok.encode("Hi", true).unwrap().get_ids()[0], 2);
}
