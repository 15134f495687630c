//! The command line against odd and hostile input: numbers clap lets through, streaming that must
//! never cut a character in half, choices past Z, bad configs and adapter configs: each one clear
//! line naming what is at fault and a non-zero exit, never a panic.

mod common;

use gemmaclip::infer::Streamer;
use std::path::Path;
use std::process::Command;

fn gemmaclip(cache: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_gemmaclip")).env("GEMMACLIP_CACHE", cache).args(args).output().unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
}

#[test]
fn numbers_the_parser_lets_through_are_refused_naming_the_flag() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    for (args, flag) in [
        (vec!["--learning-rate", "-1"], "--learning-rate"),
        (vec!["--learning-rate=-1"], "--learning-rate"),
        (vec!["--learning-rate", "NaN"], "--learning-rate"),
        (vec!["--max-steps", "0"], "--max-steps"),
        (vec!["--lora-alpha", "-2"], "--lora-alpha"),
        (vec!["--num-train-epochs", "inf"], "--num-train-epochs"),
    ] {
        let mut all = vec!["train", "--preset", "tiny", "--output-dir", o];
        all.extend(&args);
        let (code, _, err) = gemmaclip(cache.path(), &all);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.starts_with(&format!("error: {flag}")) && err.trim().lines().count() == 1, "{args:?}: {err}");
    }
    // nothing was written for a refused run
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn too_short_max_seq_len_skips_rows_at_load_naming_the_flag() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let (code, _, err) = gemmaclip(
        cache.path(),
        &["train", "--preset", "tiny", "--max-steps", "1", "--max-seq-len", "12", "--output-dir"]
            .into_iter()
            .chain([out.path().to_str().unwrap()])
            .collect::<Vec<_>>(),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--max-seq-len 12 leaves no supervised token"), "{err}");
    assert!(err.contains("--max-seq-len 12 cuts into its image block"), "{err}");
    assert!(err.lines().last().unwrap().contains("no training rows left"), "{err}");
}

#[test]
fn streaming_never_cuts_a_character_and_equals_the_final_text() {
    // byte-fallback pieces: the text decoded so far ends in U+FFFD until the character is whole
    let steps = ["Caf", "Caf\u{FFFD}", "Café", "Café \u{FFFD}\u{FFFD}", "Café 🦀", "Café 🦀 ok"];
    let mut s = Streamer::default();
    let mut shown = String::new();
    for t in steps {
        shown += &s.update(t);
        assert!(!shown.contains('\u{FFFD}'), "{shown:?}");
    }
    shown += &s.finish("Café 🦀 ok");
    assert_eq!(shown, "Café 🦀 ok");
    // a decode that rewrites what was shown never makes it slice inside a character
    let mut s = Streamer::default();
    let _ = s.update("ab");
    assert_eq!(s.update("aé"), "");
    assert_eq!(s.finish("aéz"), "z");

    // sampled outputs of the tiny model, streamed: no seed may crash, and what streams is the text
    let cache = tempfile::tempdir().unwrap();
    for seed in 0..10 {
        let seed = seed.to_string();
        let common = [
            "infer",
            "--preset",
            "tiny",
            "--max-new-tokens",
            "24",
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--seed",
            &seed,
            "--question",
            "Which one?",
            "--choices",
            "A) é; B) 🦀",
        ];
        let (code, streamed, err) = gemmaclip(cache.path(), &common);
        assert_eq!(code, Some(0), "seed {seed}: {err}");
        let (code, json, err) = gemmaclip(cache.path(), &[&common[..], &["--json"]].concat());
        assert_eq!(code, Some(0), "seed {seed}: {err}");
        let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(streamed.strip_suffix('\n').unwrap(), v["text"].as_str().unwrap(), "seed {seed}");
    }
}

#[test]
fn choices_past_z_are_refused() {
    let cache = tempfile::tempdir().unwrap();
    let many: Vec<String> = (0..200).map(|i| format!("c{i}")).collect();
    let many = many.join("; ");
    let (code, _, err) = gemmaclip(cache.path(), &["infer", "--preset", "tiny", "--question", "q", "--choices", &many]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--choices") && err.contains("26") && err.trim().lines().count() == 1, "{err}");
}

#[test]
fn zero_sized_configs_and_string_numbers_in_adapter_configs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = common::tiny_dir();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("llm/config.json")).unwrap()).unwrap();
    let mut bad = cfg.clone();
    let text = if bad.get("text_config").is_some() { &mut bad["text_config"] } else { &mut bad };
    text["num_hidden_layers"] = serde_json::json!(0);
    text.as_object_mut().unwrap().remove("layer_types");
    let path = dir.path().join("config.json");
    std::fs::write(&path, bad.to_string()).unwrap();
    let e = gemmaclip::config::LlmConfig::from_file(&path).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("num_hidden_layers"), "{e}");

    let ad = dir.path().join("adapter");
    std::fs::create_dir_all(&ad).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(common::fixture_path("lora_init").join(f), ad.join(f)).unwrap();
    }
    let path = ad.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["lora_alpha"] = serde_json::json!("128");
    std::fs::write(&path, v.to_string()).unwrap();
    let e = match gemmaclip::peft::adapter::Adapter::load(&ad, &candle_core::Device::Cpu) {
        Ok(_) => panic!("lora_alpha \"128\" was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("adapter_config.json") && e.contains("lora_alpha"), "{e}");
}

#[test]
fn preprocessor_configs_with_wrong_values_are_errors() {
    use gemmaclip::data::image::{Aspect, ImageProcessor};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preprocessor_config.json");
    // absent: CLIP's values (with a warning)
    assert_eq!(ImageProcessor::from_dir(dir.path(), 336, Aspect::Pad).unwrap().std[0], 0.268_629_54);
    for (bad, key) in [
        (r#"{"image_std": "0.27"}"#, "image_std"),
        (r#"{"image_mean": [0.5, 0.5]}"#, "image_mean"),
        (r#"{"image_std": [0.2, 0, 0.2]}"#, "image_std"),
    ] {
        std::fs::write(&path, bad).unwrap();
        let e = ImageProcessor::from_dir(dir.path(), 336, Aspect::Pad).unwrap_err().to_string();
        assert!(e.contains("preprocessor_config.json") && e.contains(key), "{bad}: {e}");
    }
}
