//! Runs that must not be lost: a fresh run never writes over an earlier one, a resume with other
//! settings or from a damaged checkpoint is caught, a diverging run stops before writing
//! non-finite weights, and the files a run writes read back (metrics with a torn last line).

mod common;

use gemmaclip::train::metrics::{self, Record};
use gemmaclip::train::run::{train, TrainArgs};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

fn cache() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let d = DIR.get_or_init(|| tempfile::tempdir().unwrap()).path();
    std::env::set_var("GEMMACLIP_CACHE", d);
    d
}

/// A short tiny-preset run: 3 steps of 2 rows, a checkpoint after every step.
fn args(out: &Path, extra: &[&str]) -> TrainArgs {
    cache();
    let mut flags = vec![
        "--output-dir",
        out.to_str().unwrap(),
        "--preset",
        "tiny",
        "--lora-r",
        "4",
        "--gradient-checkpointing",
        "false",
    ];
    flags.extend([
        "--lora-alpha",
        "8",
        "--max-steps",
        "3",
        "--gradient-accumulation-steps",
        "1",
        "--per-device-train-batch-size",
        "2",
        "--max-train-samples",
        "6",
        "--save-steps",
        "1",
        "--logging-steps",
        "1",
        "--learning-rate",
        "1e-3",
    ]);
    flags.extend(extra);
    TrainArgs::from_flags(flags).unwrap()
}

fn run(a: &TrainArgs) -> Result<(usize, usize), String> {
    train(a, Arc::new(AtomicBool::new(false))).map_err(|e| {
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        chain.join(": ")
    })
}

#[test]
fn a_fresh_run_does_not_overwrite_an_earlier_one() {
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("metrics.jsonl"), "{\"step\":1}\n").unwrap();
    std::fs::write(out.path().join("args.json"), "{}").unwrap();
    let e = run(&args(out.path(), &[])).unwrap_err();
    // no checkpoint: nothing to resume, so the advice is to start over
    assert!(e.contains("saved no checkpoint") && e.contains("--overwrite-output-dir"), "{e}");
    // a flag that fails at load costs the earlier run nothing, even with --overwrite-output-dir
    let mut bad = args(out.path(), &["--overwrite-output-dir", "--model", "/nonexistent/gemma"]);
    bad.preset = None;
    assert!(run(&bad).is_err());
    // the earlier run's records are untouched
    assert_eq!(std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap(), "{\"step\":1}\n");
    assert_eq!(std::fs::read_to_string(out.path().join("args.json")).unwrap(), "{}");
    // told to, it starts over
    let mut a = args(out.path(), &["--overwrite-output-dir"]);
    a.stop_after = Some(1);
    assert_eq!(run(&a).unwrap(), (1, 3));
    assert_eq!(metrics::read(&out.path().join("metrics.jsonl")).unwrap().len(), 1);
}

#[test]
fn resume_checks_settings_and_falls_back_past_a_damaged_checkpoint() {
    let out = tempfile::tempdir().unwrap();
    let mut a = args(out.path(), &[]);
    a.stop_after = Some(2);
    assert_eq!(run(&a).unwrap(), (2, 3));

    // settings that change the model or the schedule must match ...
    let mut b = args(out.path(), &["--learning-rate", "2e-3", "--lora-alpha", "16"]);
    b.resume = Some(None);
    let e = run(&b).unwrap_err();
    assert!(e.contains("--learning-rate 0.001 -> 0.002") && e.contains("--lora-alpha 8.0 -> 16.0"), "{e}");
    assert!(e.lines().count() == 1, "{e}");
    // ... nothing was rewritten by the refused resume
    assert_eq!(metrics::read(&out.path().join("metrics.jsonl")).unwrap().len(), 2);

    // an inconsistent state names the file
    let ckpt2 = out.path().join("checkpoints/step-2");
    let state_path = ckpt2.join("trainer_state.json");
    let good_state = std::fs::read_to_string(&state_path).unwrap();
    std::fs::write(&state_path, good_state.replace("\"global_step\": 2", "\"global_step\": 9")).unwrap();
    let mut c = args(out.path(), &[]);
    c.resume = Some(Some(ckpt2.clone()));
    let e = run(&c).unwrap_err();
    assert!(e.contains("trainer_state.json") && e.contains("inconsistent"), "{e}");
    std::fs::write(&state_path, good_state).unwrap();

    // a damaged newest checkpoint: the one before it is used, and the run finishes
    let opt = ckpt2.join("optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    let mut d = args(out.path(), &["--logging-steps", "2"]); // allowed to change
    d.resume = Some(None);
    assert_eq!(run(&d).unwrap(), (3, 3));
    assert!(out.path().join("lora_adapter/adapter_model.safetensors").is_file());
    let steps: Vec<usize> = metrics::read(&out.path().join("metrics.jsonl")).unwrap().iter().map(|r| r.step).collect();
    assert_eq!(steps, vec![1, 2, 3]);

    // resuming a finished run says so and changes nothing
    let mut f = args(out.path(), &[]);
    f.resume = Some(None);
    assert_eq!(run(&f).unwrap(), (3, 3));
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_writes_no_bad_weights() {
    let out = tempfile::tempdir().unwrap();
    // an absurd learning rate blows the weights up after the first update
    let a = args(out.path(), &["--learning-rate", "1e30", "--lr-scheduler-type", "constant", "--warmup-ratio", "0"]);
    let e = run(&a).unwrap_err();
    assert!(e.contains("step 2:") && e.contains("diverged") && e.contains("--learning-rate"), "{e}");
    assert!(!out.path().join("lora_adapter").exists() && !out.path().join("projector.safetensors").exists());
    // every checkpoint that exists holds finite numbers, and the metrics read back
    for ckpt in ["checkpoints/step-1", "checkpoints/step-2"] {
        let p = out.path().join(ckpt).join("adapter_model.safetensors");
        if p.exists() {
            for (k, t) in candle_core::safetensors::load(&p, &candle_core::Device::Cpu).unwrap() {
                let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(v.iter().all(|x| x.is_finite()), "{ckpt} {k}");
            }
        }
    }
    assert!(!out.path().join("checkpoints/step-2").exists(), "no checkpoint of the diverged step");
    assert_eq!(metrics::read(&out.path().join("metrics.jsonl")).unwrap().len(), 1);

    // NaN and negative values never get that far: one line naming the flag
    for (flag, v) in [("--learning-rate", "NaN"), ("--learning-rate", "-1"), ("--max-steps", "0")] {
        let a = args(out.path(), &[flag, v]);
        let e = run(&a).unwrap_err();
        assert!(e.starts_with(flag), "{flag} {v}: {e}");
    }
}

#[test]
fn metrics_read_back_what_they_write_and_survive_a_torn_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    let rec = |step, loss| Record {
        step,
        epoch: 0.5,
        loss,
        lr: 1e-4,
        grad_norm: f64::INFINITY,
        samples_per_s: 1.0,
        tokens_per_s: 2.0,
        peak_memory_gib: None,
    };
    metrics::append(&path, &rec(1, 2.5)).unwrap();
    metrics::append(&path, &rec(2, f64::NAN)).unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, b"{\"step\":3,\"epo").unwrap();
    let back = metrics::read(&path).unwrap();
    assert_eq!(back.len(), 2);
    assert_eq!((back[0].loss, back[1].step), (2.5, 2));
    assert!(back[1].loss.is_nan() && back[1].grad_norm.is_nan());
    // a resume rewrites the file without the torn line
    metrics::truncate_after(&path, 2).unwrap();
    assert!(std::fs::read_to_string(&path).unwrap().ends_with("}\n"));
    // a bad line that is not the last is still an error naming the file and line
    std::fs::write(&path, "garbage\n{\"step\":1}\n").unwrap();
    let e = metrics::read(&path).unwrap_err().to_string();
    assert!(e.contains("metrics.jsonl line 1"), "{e}");
}

#[test]
fn train_flags_are_checked_in_one_place() {
    let out = tempfile::tempdir().unwrap();
    let bad = [
        (vec!["--lora-target-modules", "q_proj,qkv_proj"], "--lora-target-modules"),
        (vec!["--warmup-ratio", "1.5"], "--warmup-ratio"),
        (vec!["--lora-dropout", "1"], "--lora-dropout"),
        (vec!["--max-train-samples", "0"], "--max-train-samples"),
        (vec!["--weight-decay", "-0.1"], "--weight-decay"),
    ];
    for (flags, named) in bad {
        let e = args(out.path(), &flags).validate().unwrap_err().to_string();
        assert!(e.starts_with(named), "{flags:?}: {e}");
    }
    let e = args(out.path(), &["--lora-target-modules", "q_proj,qkv_proj"]).validate().unwrap_err().to_string();
    assert!(e.contains("qkv_proj"), "{e}");
    args(out.path(), &[]).validate().unwrap();
}

#[test]
fn a_failed_checkpoint_leaves_no_temporary_directory() {
    use candle_core::{DType, Device};
    use gemmaclip::config::{ClipVisionConfig, LlmConfig};
    use gemmaclip::model::gemma3::{BaseFormat, Gemma3Text};
    use gemmaclip::model::projector::Projector;
    use gemmaclip::train::optimizer::{AdamW, AdamWConfig};
    use gemmaclip::train::state::{self, Snapshot, TrainerState};
    let dir = common::tiny_dir();
    let cfg = LlmConfig::from_file(&dir.join("llm/config.json")).unwrap();
    let vcfg = ClipVisionConfig::from_file(&dir.join("vision/config.json")).unwrap();
    let w = gemmaclip::weights::Weights::open(&dir.join("llm"), DType::F32, &Device::Cpu).unwrap();
    // no adapters attached: writing the adapter fails half-way through the checkpoint
    let mut llm = Gemma3Text::load(w, &cfg.text, BaseFormat::Dense).unwrap();
    let projector = Projector::init(vcfg.hidden_size, cfg.text.hidden_size, 0, &Device::Cpu).unwrap();
    let (names, vars): (Vec<String>, Vec<_>) = projector.vars().into_iter().unzip();
    let opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
    let st = TrainerState {
        global_step: 1,
        total_steps: 2,
        seed: 0,
        per_device_train_batch_size: 1,
        gradient_accumulation_steps: 1,
        train_rows: 1,
        world_size: 1,
    };
    let out = tempfile::tempdir().unwrap();
    let ckpt = state::checkpoint_dir(out.path(), 1);
    let spec = gemmaclip::peft::lora::LoraSpec { r: 4, alpha: 8.0, dropout: 0.0, targets: vec![] };
    let snap = Snapshot { opt: &opt, names: &names, state: &st, args: &serde_json::json!({}) };
    assert!(state::save(&ckpt, &mut llm, &projector, &spec, "x", &snap).is_err());
    assert!(!ckpt.exists() && !ckpt.with_extension("tmp").exists(), "step-1.tmp left behind");
}

#[test]
fn the_loss_curve_draws_the_learning_rate_on_a_second_axis() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loss_curve.png");
    let records: Vec<Record> = (1..=20)
        .map(|s| Record {
            step: s,
            epoch: 0.0,
            loss: 3.0 / s as f64,
            lr: 1e-4 * s as f64 / 20.0,
            grad_norm: 1.0,
            samples_per_s: 1.0,
            tokens_per_s: 1.0,
            peak_memory_gib: None,
        })
        .collect();
    gemmaclip::train::plot::loss_curve(&records, &path).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    let is = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
    // the loss in blue, the learning rate in orange
    assert!(
        is([0, 0, 255]) > 100 && is([230, 120, 20]) > 30,
        "blue {}, orange {}",
        is([0, 0, 255]),
        is([230, 120, 20])
    );
}

#[test]
fn a_run_says_what_it_does_and_writes_what_a_user_expects() {
    let out = tempfile::tempdir().unwrap();
    let o = out.path();
    let exe = env!("CARGO_BIN_EXE_gemmaclip");
    let train = |extra: &[&str]| {
        let r = std::process::Command::new(exe)
            .env("GEMMACLIP_CACHE", cache())
            .args(["train", "--preset", "tiny", "--lora-r", "4", "--lora-dropout", "0.05", "--max-steps", "4"])
            .args(["--gradient-accumulation-steps", "1", "--save-steps", "1", "--save-total-limit", "2"])
            .arg("--output-dir")
            .arg(o)
            .args(extra)
            .output()
            .unwrap();
        (r.status.code(), String::from_utf8_lossy(&r.stderr).to_string())
    };
    let (code, err) = train(&[]);
    assert_eq!(code, Some(0), "{err}");
    // a summary first, where everything went at the end
    assert!(
        err.contains("training on ") && err.contains("trainable parameters") && err.contains("gradient checkpointing"),
        "{err}"
    );
    assert!(err.contains("adapter (PEFT): ") && err.contains("loss curve:"), "{err}");
    // the loss curve gets every step although metrics.jsonl keeps the logging windows (10 steps)
    assert_eq!(metrics::read(&o.join("metrics.jsonl")).unwrap().len(), 1);
    assert_eq!(metrics::read(&o.join("steps.jsonl")).unwrap().iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2, 3, 4]);
    // --save-total-limit 2 keeps the two newest checkpoints
    let mut ckpts: Vec<String> = std::fs::read_dir(o.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    ckpts.sort();
    assert_eq!(ckpts, ["step-3", "step-4"]);
    // the dropout as the user wrote it, the tiny preset's real paths, and one mode for every file
    let config = std::fs::read_to_string(o.join("lora_adapter/adapter_config.json")).unwrap();
    assert!(config.contains("\"lora_dropout\": 0.05,"), "{config}");
    let args: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(o.join("args.json")).unwrap()).unwrap();
    assert!(Path::new(args["model"].as_str().unwrap()).join("config.json").is_file(), "{args}");
    assert!(Path::new(args["data"].as_str().unwrap()).join("train.parquet").is_file(), "{args}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fn modes(d: &Path, out: &mut std::collections::BTreeMap<u32, String>) {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    modes(&p, out);
                } else {
                    out.insert(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, p.display().to_string());
                }
            }
        }
        let mut m = std::collections::BTreeMap::new();
        modes(o, &mut m);
        assert_eq!(m.len(), 1, "files with different permissions: {m:?}");
    }
    // a finished run says so; a longer one says in words why it cannot be
    let (code, err) = train(&["--resume"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("the run is finished (4 of 4 steps)"), "{err}");
    let (code, err) = train(&["--resume", "--max-steps", "8"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("planned for 4 steps and these settings give 8") && err.contains("cannot be lengthened"),
        "{err}"
    );
}

#[test]
fn accumulation_equals_one_batch_of_the_same_rows() {
    // Two rows of different target lengths: one step of batch 2 and one step of 2 x 1 accumulated
    // must see the same loss and gradient (the mean over all supervised tokens of the step, not the
    // mean of the two micro-batch means). No dropout, no clipping, so only summation order differs.
    let run_with = |batch: &str, ga: &str| {
        let out = tempfile::tempdir().unwrap();
        let mut a = args(out.path(), &["--per-device-train-batch-size", batch, "--gradient-accumulation-steps", ga]);
        a.lora.lora_dropout = 0.0;
        a.max_grad_norm = 0.0;
        a.max_steps = Some(1);
        a.max_train_samples = Some(2);
        assert_eq!(run(&a).unwrap(), (1, 1));
        let r = metrics::read(&out.path().join("metrics.jsonl")).unwrap();
        (r[0].loss, r[0].grad_norm)
    };
    let (one_batch, accumulated) = (run_with("2", "1"), run_with("1", "2"));
    println!(
        "batch 2: loss {:.8} grad norm {:.8}; 2 x 1: {:.8} {:.8}",
        one_batch.0, one_batch.1, accumulated.0, accumulated.1
    );
    assert!((one_batch.0 - accumulated.0).abs() <= 1e-5 * one_batch.0.abs(), "{one_batch:?} {accumulated:?}");
    assert!((one_batch.1 - accumulated.1).abs() <= 1e-4 * one_batch.1.abs(), "{one_batch:?} {accumulated:?}");
}

#[test]
fn a_resume_past_a_damaged_checkpoint_never_prunes_its_own_progress() {
    let out = tempfile::tempdir().unwrap();
    let o = out.path();
    let mut a = args(o, &["--max-steps", "6"]);
    a.stop_after = Some(4);
    assert_eq!(run(&a).unwrap(), (4, 6));
    // step-4 damaged, step-3 gone: the resume starts from step-2
    let opt = o.join("checkpoints/step-4/optimizer.safetensors");
    std::fs::write(&opt, b"not safetensors").unwrap();
    std::fs::remove_dir_all(o.join("checkpoints/step-3")).unwrap();
    let mut b = args(o, &["--max-steps", "6", "--save-total-limit", "1"]);
    b.resume = Some(None);
    b.stop_after = Some(1);
    assert_eq!(run(&b).unwrap(), (3, 6));
    // the damaged one is set aside, the new step-3 kept (pruning counted only steps up to 3)
    let mut names: Vec<String> = std::fs::read_dir(o.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["step-3", "step-4.unusable"]);
    let mut c = args(o, &["--max-steps", "6"]);
    c.resume = Some(None);
    assert_eq!(run(&c).unwrap(), (6, 6));
}

#[test]
fn a_resume_on_another_base_model_is_refused_and_a_moved_one_is_not() {
    let out = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap();
    let (same, other) = (models.path().join("same"), models.path().join("other"));
    gemmaclip::init::init(gemmaclip::init::Preset::Tiny, &same, 0).unwrap();
    gemmaclip::init::init(gemmaclip::init::Preset::Tiny, &other, 1).unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/scienceqa-sample");
    let with = |dir: &Path| {
        let mut a = args(out.path(), &["--data", sample.to_str().unwrap()]);
        a.preset = None;
        a.model = dir.join("llm").display().to_string();
        a.vision_model = dir.join("vision").display().to_string();
        a
    };
    let mut a = with(&same);
    a.stop_after = Some(1);
    assert_eq!(run(&a).unwrap(), (1, 3));
    // the same weights elsewhere: fine
    let moved = models.path().join("moved");
    std::fs::rename(&same, &moved).unwrap();
    let mut b = with(&moved);
    b.resume = Some(None);
    b.stop_after = Some(1);
    assert_eq!(run(&b).unwrap(), (2, 3));
    // other weights of the same shapes: refused, naming what differs
    let mut c = with(&other);
    c.resume = Some(None);
    let e = run(&c).unwrap_err();
    assert!(e.contains("--sources") && e.contains("model_sha256"), "{e}");
}
