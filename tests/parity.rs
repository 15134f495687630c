//! Parity with transformers: the tiny checkpoint through our models against reference tensors
//! made by tools/reference/make_parity_fixtures.py (transformers' Gemma3ForCausalLM,
//! CLIPVisionModel and the LLaVA-style splice), all in f32, max |diff| <= 1e-4.

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::{max_abs_diff, tiny_dir, Fixture};
use gemmaclip::config::{ClipVisionConfig, LlmConfig};
use gemmaclip::model::clip::ClipVision;
use gemmaclip::model::gemma3::Gemma3Text;
use gemmaclip::model::projector::Projector;
use gemmaclip::model::vlm::{Supervised, Vlm};
use gemmaclip::weights::Weights;

const TOL: f32 = 1e-4;

fn fixture() -> Fixture {
    let f = Fixture::load("parity.safetensors");
    // The fixtures were made from `init --preset tiny --seed 0`; if the generator changed, every
    // comparison below would fail for that reason alone, so say so first.
    let llm = gemma();
    let ours = llm.embed_tokens.get(1).unwrap();
    assert_eq!(
        max_abs_diff(&ours, f.get("check.embed_tokens_row1")),
        0.0,
        "the tiny checkpoint differs from the one the fixtures were made from: regenerate them (tools/reference/README.md)"
    );
    f
}

fn llm_cfg() -> LlmConfig {
    LlmConfig::from_file(&tiny_dir().join("llm/config.json")).unwrap()
}

fn gemma() -> Gemma3Text {
    let w = Weights::open(&tiny_dir().join("llm"), DType::F32, &Device::Cpu).unwrap();
    Gemma3Text::load(w, &llm_cfg().text).unwrap()
}

fn clip() -> ClipVision {
    let dir = tiny_dir().join("vision");
    let cfg = ClipVisionConfig::from_file(&dir.join("config.json")).unwrap();
    ClipVision::load(Weights::open(&dir, DType::F32, &Device::Cpu).unwrap(), &cfg).unwrap()
}

fn ids_u32(rows: &[Vec<i64>]) -> Tensor {
    let flat: Vec<u32> = rows.iter().flatten().map(|&x| x as u32).collect();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

fn all_logits(llm: &Gemma3Text, hidden: &Tensor) -> Tensor {
    let (b, l, h) = hidden.dims3().unwrap();
    llm.logits(&hidden.reshape((b * l, h)).unwrap()).unwrap().reshape((b, l, ())).unwrap()
}

#[test]
fn gemma_logits_match_transformers_past_the_sliding_window() {
    let f = fixture();
    let llm = gemma();
    let ids = f.rows_i64("text.input_ids");
    assert!(ids[0].len() > 2 * llm.cfg.sliding_window);
    let hidden = llm.forward_embeds(&llm.embed(&ids_u32(&ids)).unwrap(), None).unwrap();
    let logits = all_logits(&llm, &hidden).squeeze(0).unwrap();
    let err = max_abs_diff(&logits, f.get("text.logits"));
    println!("gemma logits, {} tokens: max |diff| = {err:.3e}", ids[0].len());
    assert!(err <= TOL, "max |diff| {err}");
}

#[test]
fn gemma_padded_batch_matches_transformers_on_valid_positions() {
    let f = fixture();
    let llm = gemma();
    let ids = f.rows_i64("batch.input_ids");
    let mask = f.rows_i64("batch.attention_mask");
    let valid: Vec<Vec<bool>> = mask.iter().map(|r| r.iter().map(|&m| m == 1).collect()).collect();
    let hidden = llm.forward_embeds(&llm.embed(&ids_u32(&ids)).unwrap(), Some(&valid)).unwrap();
    let logits = all_logits(&llm, &hidden);
    let reference = f.get("batch.logits");
    let mut worst = 0f32;
    for (b, row) in valid.iter().enumerate() {
        let n = row.iter().filter(|&&v| v).count();
        let ours = logits.get(b).unwrap().narrow(0, 0, n).unwrap();
        let theirs = reference.get(b).unwrap().narrow(0, 0, n).unwrap();
        worst = worst.max(max_abs_diff(&ours, &theirs));
    }
    println!("gemma padded batch logits: max |diff| = {worst:.3e}");
    assert!(worst <= TOL, "max |diff| {worst}");
}

#[test]
fn clip_layer_minus_two_matches_transformers() {
    let f = fixture();
    let feats = clip().forward(f.get("clip.pixel_values")).unwrap();
    let err = max_abs_diff(&feats, f.get("clip.features"));
    println!("clip hidden_states[-2][:, 1:]: max |diff| = {err:.3e}");
    assert!(err <= TOL, "max |diff| {err}");
}

#[test]
fn llava_forward_loss_and_supervised_logits_match_transformers() {
    let f = fixture();
    let path = common::fixture_path("parity.safetensors");
    let pw = Weights::open_file(&path, DType::F32, &Device::Cpu)
        .unwrap()
        .with_prefix_of(&["vlm.projector."], "linear_1.weight")
        .unwrap();
    let vision = clip();
    let llm = gemma();
    let projector = Projector::load(&pw, vision.cfg.hidden_size, llm.cfg.hidden_size).unwrap();
    let vlm = Vlm { vision, projector, llm, cfg: llm_cfg() };

    let ids: Vec<Vec<u32>> = f.rows_i64("vlm.input_ids").iter().map(|r| r.iter().map(|&x| x as u32).collect()).collect();
    let valid: Vec<Vec<bool>> = f.rows_i64("vlm.attention_mask").iter().map(|r| r.iter().map(|&m| m == 1).collect()).collect();
    let sup = Supervised::from_labels(&f.rows_i64("vlm.labels"));
    let embeds = vlm.input_embeds(&ids, Some(f.get("vlm.pixel_values"))).unwrap();
    let hidden = vlm.llm.forward_embeds(&embeds, Some(&valid)).unwrap();
    let (loss, logits) = vlm.loss(&hidden, &sup).unwrap();
    let loss_err = (loss.to_scalar::<f32>().unwrap() - f.get("vlm.loss").to_scalar::<f32>().unwrap()).abs();
    let logit_err = max_abs_diff(&logits, f.get("vlm.supervised_logits"));
    println!(
        "llava forward: {} supervised positions, loss |diff| = {loss_err:.3e}, logits max |diff| = {logit_err:.3e}",
        sup.rows.len()
    );
    assert_eq!(logits.dim(D::Minus1).unwrap(), vlm.llm.cfg.vocab_size);
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
    // and with special tokens, the post-processor prepends <bos> as Gemma's does
    assert_eq!(tok.encode("Hi", true).unwrap().get_ids()[0], 2);
}
