//! `gemmaclip eval` directories: answers carry a fingerprint of what produced them, so a resume
//! never mixes two models, two settings or two splits; predictions stay in pid order and the time
//! spent adds up over resumed runs.

mod common;

use std::path::Path;
use std::process::Command;

fn eval(cache: &Path, out: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_gemmaclip"))
        .env("GEMMACLIP_CACHE", cache)
        .args(["eval", "--preset", "tiny", "--max-new-tokens", "3", "--batch-size", "5"])
        .arg("--projector-path")
        .arg(common::fixture_path("lora_init/projector.safetensors"))
        .arg("--output-dir")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stderr).to_string())
}

fn pids(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("predictions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["pid"].as_str().unwrap().to_string())
        .collect()
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn resumes_only_what_the_same_model_and_settings_produced() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let (c, o) = (cache.path(), out.path());
    let ours = common::fixture_path("lora_init");
    let other = common::fixture_path("peft_saved");
    let with = |adapter: &Path, extra: &[&str]| {
        let mut v = vec!["--split", "validation", "--adapter-dir", adapter.to_str().unwrap()];
        v.extend(extra);
        eval(c, o, &v)
    };
    let (code, err) = with(&ours, &["--limit", "3"]);
    assert_eq!(code, Some(0), "{err}");
    let first_seconds = json(&o.join("eval.json"))["seconds"].as_f64().unwrap();
    assert!(first_seconds > 0.0);

    // another adapter, other generation settings, another split: refused, nothing changed
    let before = std::fs::read_to_string(o.join("predictions.jsonl")).unwrap();
    for (adapter, extra, needle) in [
        (&other, vec!["--limit", "12"], "adapter"),
        (&ours, vec!["--limit", "12", "--temperature", "0.7"], "temperature"),
        (&ours, vec!["--limit", "12", "--max-new-tokens", "4"], "max_new_tokens"),
    ] {
        let (code, err) = with(adapter, &extra);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("another model or other settings") && err.contains(needle), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let (code, err) = eval(c, o, &["--split", "test", "--adapter-dir", ours.to_str().unwrap(), "--limit", "2"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("holds answers for the \"validation\" split"), "{err}");
    assert_eq!(std::fs::read_to_string(o.join("predictions.jsonl")).unwrap(), before);

    // the same model and settings resume: pids in numeric order, the time adds up
    let (code, err) = with(&ours, &["--limit", "12"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("3 of 12 questions already answered"), "{err}");
    let expected: Vec<String> = (0..12).map(|i| format!("validation-{i}")).collect();
    assert_eq!(pids(o), expected);
    let seconds = json(&o.join("eval.json"))["seconds"].as_f64().unwrap();
    assert!(seconds > first_seconds, "{seconds} <= {first_seconds}");
    assert_eq!(json(&o.join("results.json"))["seconds"].as_f64().unwrap(), seconds);
    assert!(o.join("accuracy.png").is_file() && o.join("breakdown.txt").is_file());

    // told to start over, another adapter answers from scratch
    let (code, err) = with(&other, &["--limit", "2", "--overwrite-output-dir"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(pids(o), ["validation-0", "validation-1"]);
}

#[test]
fn answers_of_unknown_origin_are_not_reused() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    // a predictions.jsonl written by an older version (no eval.json, no fingerprints)
    std::fs::write(
        out.path().join("predictions.jsonl"),
        "{\"pid\":\"validation-0\",\"prompt_kind\":\"text\",\"text\":\"A\",\"predicted\":\"A\",\"predicted_index\":0,\"answer\":\"A\",\"correct\":true}\n",
    )
    .unwrap();
    let (code, err) = eval(cache.path(), out.path(), &["--split", "validation", "--limit", "2"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unknown origin") && err.contains("--overwrite-output-dir"), "{err}");
}

#[test]
fn another_dataset_under_the_same_split_is_not_resumed() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/scienceqa-sample");
    for f in ["train", "validation", "test"] {
        std::fs::copy(sample.join(format!("{f}.parquet")), data.path().join(format!("{f}.parquet"))).unwrap();
    }
    let tiny = common::tiny_dir();
    let run = || {
        let o = Command::new(env!("CARGO_BIN_EXE_gemmaclip"))
            .env("GEMMACLIP_CACHE", cache.path())
            .args(["eval", "--split", "validation", "--limit", "2", "--max-new-tokens", "2"])
            .arg("--model")
            .arg(tiny.join("llm"))
            .arg("--vision-model")
            .arg(tiny.join("vision"))
            .arg("--projector-path")
            .arg(common::fixture_path("lora_init/projector.safetensors"))
            .arg("--data")
            .arg(data.path())
            .arg("--output-dir")
            .arg(out.path())
            .output()
            .unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stderr).to_string())
    };
    let (code, err) = run();
    assert_eq!(code, Some(0), "{err}");
    // the same directory, other rows under the same pids
    std::fs::copy(sample.join("test.parquet"), data.path().join("validation.parquet")).unwrap();
    let (code, err) = run();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("data_sha256"), "{err}");
}

#[test]
fn a_run_trained_on_the_bf16_base_is_evaluated_on_it() {
    let cache = tempfile::tempdir().unwrap();
    let run_dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_gemmaclip");
    let train = Command::new(exe)
        .env("GEMMACLIP_CACHE", cache.path())
        .args(["train", "--preset", "tiny", "--no-4bit", "--max-steps", "1", "--gradient-accumulation-steps", "1"])
        .args(["--lora-r", "4", "--gradient-checkpointing", "false", "--output-dir"])
        .arg(run_dir.path())
        .output()
        .unwrap();
    assert!(train.status.success(), "{}", String::from_utf8_lossy(&train.stderr));
    let o = Command::new(exe)
        .env("GEMMACLIP_CACHE", cache.path())
        .args(["eval", "--split", "validation", "--limit", "1", "--max-new-tokens", "2", "--run-dir"])
        .arg(run_dir.path())
        .arg("--output-dir")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&out.path().join("eval.json"))["fingerprint"]["sources"]["four_bit"], false);
}

#[test]
fn two_workers_answer_as_one_and_take_in_what_an_interrupted_worker_left() {
    let cache = tempfile::tempdir().unwrap();
    let dirs = tempfile::tempdir().unwrap();
    let (one, two, resumed) = (dirs.path().join("one"), dirs.path().join("two"), dirs.path().join("resumed"));
    let c = cache.path();
    let nine = ["--limit", "9", "--batch-size", "1"];
    assert_eq!(eval(c, &one, &nine).0, Some(0));
    let (code, err) = eval(c, &two, &[&nine[..], &["--nproc-per-node", "2"]].concat());
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("answered 9 questions by 2 workers"), "{err}");
    let read = |d: &Path| std::fs::read_to_string(d.join("predictions.jsonl")).unwrap();
    // greedy answers of one question at a time: the same text, in the same (pid) order
    assert_eq!(read(&one), read(&two));
    assert!(std::fs::read_dir(&two).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".rank")));
    assert_eq!(json(&one.join("results.json"))["results"], json(&two.join("results.json"))["results"]);

    // a run of three questions whose last answer sits in a worker's file, as a run cut short leaves it
    assert_eq!(eval(c, &resumed, &["--limit", "3", "--batch-size", "1"]).0, Some(0));
    let text = read(&resumed);
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(resumed.join("predictions.jsonl"), lines[..2].join("\n") + "\n").unwrap();
    std::fs::write(resumed.join("predictions.rank1.jsonl"), lines[2].to_string() + "\n").unwrap();
    let (code, err) = eval(c, &resumed, &[&nine[..], &["--nproc-per-node", "2"]].concat());
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("resuming: 3 of 9 questions already answered"), "{err}");
    assert_eq!(read(&one), read(&resumed));
    assert!(!resumed.join("predictions.rank1.jsonl").exists());
}
