//! `gemmaclip train` on the tiny preset: overfitting works, outputs exist and reload in PEFT's
//! layout, resume is bit-identical, bad data gives a clear error or a counted skip.

mod common;

use candle_core::Device;
use gemmaclip::peft::adapter::Adapter;
use gemmaclip::train::metrics;
use gemmaclip::train::run::{train, TrainArgs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

fn cache() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let d = DIR.get_or_init(|| tempfile::tempdir().unwrap()).path();
    std::env::set_var("GEMMACLIP_CACHE", d);
    d
}

/// The tiny preset with the CLI's defaults, except what keeps the tests small.
fn args(out: &Path) -> TrainArgs {
    cache();
    let out = out.to_str().unwrap();
    let flags = ["--output-dir", out, "--preset", "tiny", "--lora-r", "8", "--lora-alpha", "16"];
    let mut a = TrainArgs::from_flags(flags.iter().chain(&[
        "--save-steps",
        "0",
        "--logging-steps",
        "1",
        "--loss-chunk",
        "64",
        "--gradient-checkpointing",
        "false",
    ]))
    .unwrap();
    a.gradient_accumulation_steps = 8;
    a
}

fn no_interrupt() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

#[test]
fn loss_halves_within_60_steps_and_outputs_reload() {
    let out = tempfile::tempdir().unwrap();
    let mut a = args(out.path());
    a.max_steps = Some(60);
    a.per_device_train_batch_size = 4;
    a.gradient_accumulation_steps = 1;
    a.max_train_samples = Some(8);
    a.learning_rate = 1e-2;
    a.lr_scheduler_type = gemmaclip::train::schedule::Schedule::Constant;
    a.warmup_ratio = 0.0;
    a.lora.lora_r = 16;
    a.lora.lora_alpha = 32.0;
    assert_eq!(train(&a, no_interrupt()).unwrap(), (60, 60));
    let m = metrics::read(&out.path().join("metrics.jsonl")).unwrap();
    assert_eq!(m.len(), 60);
    let (first, last) = (m[0].loss, m.last().unwrap().loss);
    println!("tiny overfit: loss {first:.4} at step 1 -> {last:.4} at step 60");
    assert!(last <= first / 2.0, "loss {first} -> {last}");

    let o = out.path();
    for f in [
        "projector.safetensors",
        "args.json",
        "metrics.jsonl",
        "loss_curve.png",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    ] {
        assert!(o.join(f).is_file(), "{f}");
    }
    let (ad, scale) = Adapter::load(&o.join("lora_adapter"), &Device::Cpu).unwrap();
    assert_eq!((ad.spec.r, scale), (16, 2.0));
    assert_eq!(ad.modules.len(), 8 * 7);
    let st = candle_core::safetensors::load(o.join("lora_adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert!(st.contains_key("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"));
    let p = candle_core::safetensors::load(o.join("projector.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(p["linear_1.weight"].dims(), &[64, 32]);
    assert_eq!(image::open(o.join("loss_curve.png")).unwrap().width(), 900);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(o.join("args.json")).unwrap()).unwrap();
    assert_eq!(saved["lora_r"], 16);
}

fn tensors(p: &Path) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = candle_core::safetensors::load(p, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn resume_is_bit_identical() {
    let straight = tempfile::tempdir().unwrap();
    let split = tempfile::tempdir().unwrap();
    let setup = |out: &Path| {
        let mut a = args(out);
        a.max_steps = Some(6);
        a.per_device_train_batch_size = 2;
        a.gradient_accumulation_steps = 2;
        a.max_train_samples = Some(6);
        a.learning_rate = 1e-3;
        a.lora.lora_dropout = 0.1;
        a.gradient_checkpointing = true;
        a
    };
    assert_eq!(train(&setup(straight.path()), no_interrupt()).unwrap(), (6, 6));
    let mut first_half = setup(split.path());
    first_half.stop_after = Some(3);
    assert_eq!(train(&first_half, no_interrupt()).unwrap(), (3, 6));
    assert!(split.path().join("checkpoints/step-3/trainer_state.json").is_file());
    assert!(!split.path().join("projector.safetensors").exists(), "not finished yet");
    let mut second_half = setup(split.path());
    second_half.resume = Some(None);
    assert_eq!(train(&second_half, no_interrupt()).unwrap(), (6, 6));

    for f in ["lora_adapter/adapter_model.safetensors", "projector.safetensors"] {
        let (a, b) = (tensors(&straight.path().join(f)), tensors(&split.path().join(f)));
        assert_eq!(a.len(), b.len());
        for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
            assert_eq!(ka, kb);
            assert!(va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()), "{f} {ka} differs after resume");
        }
    }
    let (ma, mb) = (
        metrics::read(&straight.path().join("metrics.jsonl")).unwrap(),
        metrics::read(&split.path().join("metrics.jsonl")).unwrap(),
    );
    assert_eq!(ma.len(), 6);
    assert_eq!(
        ma.iter().map(|r| (r.step, r.loss, r.lr, r.grad_norm)).collect::<Vec<_>>(),
        mb.iter().map(|r| (r.step, r.loss, r.lr, r.grad_norm)).collect::<Vec<_>>()
    );
    println!("6 steps straight == 3 + resume + 3, bit for bit (adapter, projector, losses)");
}

fn fixture(p: &str) -> PathBuf {
    common::fixture_path(p)
}

#[test]
fn cli_errors_are_one_line_naming_the_flag_or_column() {
    let exe = env!("CARGO_BIN_EXE_gemmaclip");
    let out = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let o = Command::new(exe)
            .env("GEMMACLIP_CACHE", cache())
            .args(["train", "--output-dir"])
            .arg(out.path())
            .args(extra)
            .output()
            .unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stderr).to_string())
    };
    let (code, err) = run(&["--preset", "tiny", "--per-device-train-batch-size", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--per-device-train-batch-size") && err.lines().count() == 1, "{err}");

    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/scienceqa-sample");
    let (code, err) = run(&["--model", "/nonexistent/gemma", "--data", sample.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--model") && err.lines().count() == 1, "{err}");

    let data = fixture("bad_data/missing_column");
    let (llm, vision) = {
        std::env::set_var("GEMMACLIP_CACHE", cache());
        gemmaclip::hub::tiny_model().unwrap()
    };
    let (code, err) = run(&[
        "--model",
        llm.to_str().unwrap(),
        "--vision-model",
        vision.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("column `choices` is missing") && err.lines().count() == 1, "{err}");
}
