//! The command line as someone coming from transformers + PEFT + TRL types it: HfArgumentParser's
//! booleans (`--bf16 True`) and snake_case flags (`--output_dir`), gradient checkpointing on by
//! default, `--run-dir` for infer and eval, help on every flag, shell completions, and the original
//! project's own train / infer / eval commands running end to end on the tiny preset.

use gemmaclip::cli::{self, Command};
use gemmaclip::train::args::TrainArgs;
use std::path::Path;

fn gemmaclip(cache: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_gemmaclip"))
        .env("GEMMACLIP_CACHE", cache)
        .args(args)
        .output()
        .unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
}

/// Every command of the tree, the root first, with its path ("gemmaclip bench generate").
fn all_commands() -> Vec<(String, clap::Command)> {
    fn walk(prefix: &str, cmd: &clap::Command, out: &mut Vec<(String, clap::Command)>) {
        let name = format!("{prefix} {}", cmd.get_name()).trim().to_string();
        out.push((name.clone(), cmd.clone()));
        for sc in cmd.get_subcommands() {
            walk(&name, sc, out);
        }
    }
    let mut cmd = cli::command();
    cmd.build();
    let mut out = vec![];
    walk("", &cmd, &mut out);
    out
}

fn train_flags(extra: &[&str]) -> TrainArgs {
    let mut flags = vec!["--output_dir", "out"];
    flags.extend(extra);
    TrainArgs::from_flags(flags).unwrap()
}

fn infer_cli(extra: &[&str]) -> Box<cli::InferCli> {
    let mut args = vec!["gemmaclip", "infer", "--question", "q", "--choices", "a; b"];
    args.extend(extra);
    match cli::try_parse_from(args).unwrap_or_else(|e| panic!("{extra:?}: {e}")).command {
        Command::Infer(i) => i,
        _ => unreachable!(),
    }
}

#[test]
fn boolean_flags_take_an_optional_true_false_value_as_hf_argument_parser_does() {
    // argparse's string_to_bool, case-insensitive
    for v in ["yes", "true", "t", "y", "1", "True", "TRUE", "Yes", "T", "Y"] {
        assert!(train_flags(&["--bf16", v]).bf16, "{v}");
    }
    for v in ["no", "false", "f", "n", "0", "False", "FALSE", "No", "F", "N"] {
        assert!(!train_flags(&["--bf16", v]).bf16, "{v}");
    }
    // alone = true; absent = the default; followed by another flag, that flag is still read
    assert!(train_flags(&["--bf16"]).bf16);
    assert!(!train_flags(&[]).bf16);
    let a = train_flags(&["--bf16", "--lora-r", "8", "--use-flash-attention-2", "--no-4bit", "false"]);
    assert!(a.bf16 && a.use_flash_attention_2 && !a.no_4bit && a.lora.lora_r == 8);
    let a = train_flags(&["--overwrite-output-dir", "True", "--no_4bit", "TRUE", "--bf16", "1", "--bf16=0"]);
    assert!(a.overwrite_output_dir && a.no_4bit && !a.bf16, "the last of a repeated flag wins");
    // a value that is not a boolean names the flag
    let e = TrainArgs::from_flags(["--output-dir", "o", "--bf16", "maybe"]).unwrap_err().to_string();
    assert!(e.contains("--bf16") && e.contains("maybe"), "{e}");

    // infer's --json: last on the line, before another flag, with a value
    assert!(infer_cli(&["--json"]).json);
    assert!(!infer_cli(&[]).json);
    let i = infer_cli(&["--json", "--no-4bit", "--seed", "3"]);
    assert!(i.json && i.model.no_4bit && i.sampling.seed == 3);
    assert!(!infer_cli(&["--json", "false", "--no_4bit", "no"]).json);
    // eval and both bench commands
    for args in [
        vec!["eval", "--output-dir", "o", "--no_4bit", "True"],
        vec!["bench", "generate", "--model", "m", "--vision-model", "v", "--no-4bit", "true"],
        vec!["bench", "train-step", "--model", "m", "--vision_model", "v", "--no_4bit", "Y"],
    ] {
        let with_bin: Vec<&str> = std::iter::once("gemmaclip").chain(args.iter().copied()).collect();
        let c = cli::try_parse_from(&with_bin).unwrap_or_else(|e| panic!("{args:?}: {e}")).command;
        let no_4bit = match c {
            Command::Eval(e) => e.model.no_4bit,
            Command::Bench { what: cli::BenchCommand::Generate(g) } => g.no_4bit,
            Command::Bench { what: cli::BenchCommand::TrainStep(t) } => t.no_4bit,
            _ => unreachable!(),
        };
        assert!(no_4bit, "{args:?}");
    }
    // no flag anywhere is a bare switch that would refuse `True`
    for (name, cmd) in all_commands() {
        for arg in cmd.get_arguments() {
            assert!(
                !matches!(arg.get_action(), clap::ArgAction::SetTrue | clap::ArgAction::SetFalse),
                "{name} --{}: a switch that takes no true/false value",
                arg.get_id()
            );
        }
    }
}

#[test]
fn every_long_flag_also_takes_its_snake_case_spelling() {
    let mut checked = 0;
    for (name, cmd) in all_commands() {
        for arg in cmd.get_arguments() {
            let aliases = arg.get_all_aliases().unwrap_or_default();
            for long in arg.get_long().into_iter().chain(aliases.iter().copied()) {
                if long.contains('-') {
                    let snake = long.replace('-', "_");
                    assert!(aliases.contains(&snake.as_str()), "{name} --{long}: no --{snake}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 60, "{checked}");
    // the seed's train line, word for word
    let a = TrainArgs::from_flags([
        "--output_dir",
        "out",
        "--num_train_epochs",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--learning_rate",
        "2e-4",
        "--bf16",
        "True",
        "--use_flash_attention_2",
        "True",
        "--gradient_checkpointing",
        "True",
        "--lora_r",
        "8",
        "--lora_alpha",
        "16",
        "--lora_dropout",
        "0.1",
        "--max_train_samples",
        "2",
        "--max_steps",
        "2",
        "--save_total_limit",
        "3",
        "--max_length",
        "512",
        "--resume_from_checkpoint",
        "out/checkpoints/step-1",
        "--warmup_ratio",
        "0.1",
        "--lr_scheduler_type",
        "linear",
        "--lora_target_modules",
        "q_proj,v_proj",
    ])
    .unwrap();
    assert_eq!(a.output_dir, Path::new("out"));
    assert_eq!((a.num_train_epochs, a.per_device_train_batch_size, a.gradient_accumulation_steps), (2.0, 4, 2));
    assert_eq!((a.learning_rate, a.lora.lora_r, a.lora.lora_alpha, a.lora.lora_dropout), (2e-4, 8, 16.0, 0.1));
    assert!(a.bf16 && a.use_flash_attention_2 && a.gradient_checkpointing);
    assert_eq!((a.max_train_samples, a.max_steps, a.save_total_limit, a.max_seq_len), (Some(2), Some(2), Some(3), 512));
    assert_eq!(a.resume, Some(Some("out/checkpoints/step-1".into())));
    assert_eq!(a.lora_target_modules, ["q_proj", "v_proj"]);
    // infer and eval, through the whole command line
    let i = infer_cli(&["--max_new_tokens", "4", "--run_dir", "r", "--top_p", "0.5", "--image_path", "x.png"]);
    assert_eq!((i.max_new_tokens, i.sampling.top_p), (4, 0.5));
    assert_eq!(i.model.run_dir.as_deref(), Some(Path::new("r")));
    match cli::try_parse_from(["gemmaclip", "eval", "--output_dir", "o", "--per_device_eval_batch_size", "4"])
        .unwrap()
        .command
    {
        Command::Eval(e) => assert_eq!((e.batch_size, e.output_dir.to_str()), (Some(4), Some("o"))),
        _ => unreachable!(),
    }
    // a negative number still reaches validation, which names the flag
    let a = train_flags(&["--learning_rate", "-1"]);
    assert!(a.validate().unwrap_err().to_string().starts_with("--learning-rate"));
}

#[test]
fn gradient_checkpointing_is_on_unless_turned_off() {
    assert!(train_flags(&[]).gradient_checkpointing);
    assert!(!train_flags(&["--gradient-checkpointing", "false"]).gradient_checkpointing);
    assert!(!train_flags(&["--gradient_checkpointing", "False"]).gradient_checkpointing);
    assert!(train_flags(&["--gradient-checkpointing"]).gradient_checkpointing);
    let cmd = all_commands().into_iter().find(|(n, _)| n == "gemmaclip train").unwrap().1;
    let arg = cmd.get_arguments().find(|a| a.get_id() == "gradient_checkpointing").unwrap();
    let help = arg.get_help().unwrap().to_string();
    assert!(help.contains("on by default") && help.contains("--gradient-checkpointing false"), "{help}");
    // an older run saved with it off resumes with the new default: it changes memory, not the math
    let old = train_flags(&["--gradient-checkpointing", "false"]);
    assert!(train_flags(&[]).resume_conflicts(&old).unwrap().is_empty());
}

#[test]
fn every_flag_and_argument_has_help() {
    let mut missing = vec![];
    for (name, cmd) in all_commands() {
        assert!(cmd.get_about().is_some() || name == "gemmaclip help", "{name}: no about");
        for arg in cmd.get_arguments() {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            if help.trim().is_empty() {
                missing.push(format!(
                    "{name} {}",
                    arg.get_long().map(|l| format!("--{l}")).unwrap_or(arg.get_id().to_string())
                ));
            }
        }
    }
    assert!(missing.is_empty(), "flags without help: {missing:?}");
}

#[test]
fn init_takes_output_dir_like_every_other_command() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (flag, sub) in [("--output-dir", "a"), ("--output_dir", "b"), ("--out", "c")] {
        let out = dir.path().join(sub);
        let (code, stdout, err) = gemmaclip(cache.path(), &["init", "--preset", "tiny", flag, out.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{flag}: {err}");
        assert!(stdout.contains("wrote"), "{stdout}");
        assert!(out.join("llm/config.json").is_file() && out.join("vision/config.json").is_file(), "{flag}");
    }
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let (code, _, err) = gemmaclip(cache.path(), &["init", "--preset", "tiny", "--output-dir", file.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: --output-dir") && err.trim().lines().count() == 1, "{err}");
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let cache = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = gemmaclip(cache.path(), &["completions", shell]);
        assert_eq!(code, Some(0), "{shell}: {err}");
        assert!(out.len() > 500 && out.contains("train") && out.contains("output-dir"), "{shell}: {out}");
    }
    let (code, _, err) = gemmaclip(cache.path(), &["completions", "tcsh"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("tcsh"), "{err}");
}

#[test]
fn run_dir_mistakes_say_what_was_meant() {
    let cache = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let r = run.path().to_str().unwrap();
    std::fs::create_dir_all(run.path().join("lora_adapter")).unwrap();
    let q = ["infer", "--preset", "tiny", "--question", "q", "--choices", "a; b"];
    let with = |extra: &[&str]| {
        let mut a = q.to_vec();
        a.extend(extra);
        gemmaclip(cache.path(), &a)
    };
    // the run directory given as the adapter, the projector or the tokenizer
    for (flag, inside) in [
        ("--adapter-dir", "lora_adapter"),
        ("--projector-path", "projector.safetensors"),
        ("--tokenizer-dir", "tokenizer"),
    ] {
        let (code, _, err) = with(&[flag, r]);
        assert_eq!(code, Some(1), "{err}");
        let meant = run.path().join(inside);
        assert!(
            err.starts_with(&format!("error: {flag} {r}"))
                && err.contains(&format!("did you mean {} (or --run-dir {r})?", meant.display()))
                && err.trim().lines().count() == 1,
            "{err}"
        );
    }
    // a directory that is no run, and a run that has only checkpoints
    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) = with(&["--run-dir", empty.path().to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: --run-dir") && err.contains("lora_adapter/"), "{err}");
    std::fs::create_dir_all(empty.path().join("checkpoints/step-4")).unwrap();
    std::fs::create_dir_all(empty.path().join("checkpoints/step-8")).unwrap();
    let (_, _, err) = with(&["--run-dir", empty.path().to_str().unwrap()]);
    assert!(err.contains("has not finished") && err.contains("checkpoints/step-8"), "{err}");
    let (code, _, err) = with(&["--run-dir", "/nonexistent/run"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: --run-dir /nonexistent/run") && err.trim().lines().count() == 1, "{err}");
}

/// The original project's commands, snake_case and `True` values included, on the tiny preset:
/// train writes the run, infer and eval read it through `--run-dir` alone.
#[test]
fn the_seed_commands_run_as_written() {
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let run = work.path().join("run");
    let r = run.to_str().unwrap();
    #[rustfmt::skip]
    let (code, _, err) = gemmaclip(cache.path(), &[
        "train", "--preset", "tiny", "--output_dir", r, "--num_train_epochs", "1",
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-4",
        "--bf16", "True", "--use_flash_attention_2", "True", "--gradient_checkpointing", "True",
        "--lora_r", "8", "--lora_alpha", "16", "--max_train_samples", "2", "--max_steps", "2",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(run.join("lora_adapter/adapter_model.safetensors").is_file());
    assert!(run.join("projector.safetensors").is_file() && run.join("tokenizer/tokenizer.json").is_file());
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("args.json")).unwrap()).unwrap();
    assert_eq!((saved["bf16"].as_bool(), saved["gradient_checkpointing"].as_bool()), (Some(true), Some(true)));

    let question = ["--question", "Which is a mammal?", "--choices", "A) x; B) y", "--max_new_tokens", "4", "--json"];
    let infer = |extra: &[&str]| {
        let mut a = vec!["infer"];
        a.extend(extra);
        a.extend(question);
        let (code, out, err) = gemmaclip(cache.path(), &a);
        assert_eq!(code, Some(0), "{extra:?}: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        v["text"].as_str().unwrap().to_string()
    };
    let answer = infer(&["--preset", "tiny", "--run-dir", r]);
    // the same run through its final checkpoint, through the three paths, and with --preset
    // taken from the run's args.json
    let step = run.join("checkpoints/step-2");
    assert_eq!(infer(&["--preset", "tiny", "--run_dir", step.to_str().unwrap()]), answer);
    let (ad, pr, tk) = (run.join("lora_adapter"), run.join("projector.safetensors"), run.join("tokenizer"));
    #[rustfmt::skip]
    let explicit = infer(&["--preset", "tiny", "--adapter-dir", ad.to_str().unwrap(), "--projector-path",
        pr.to_str().unwrap(), "--tokenizer-dir", tk.to_str().unwrap()]);
    assert_eq!(explicit, answer);
    assert_eq!(infer(&["--run-dir", r]), answer, "the run's preset is the default");
    // the base model alone answers otherwise (the adapter after 2 steps at 1e-4 may not change
    // 4 greedy tokens, so only that it runs is checked)
    infer(&["--preset", "tiny"]);

    let results = work.path().join("eval");
    #[rustfmt::skip]
    let (code, _, err) = gemmaclip(cache.path(), &[
        "eval", "--preset", "tiny", "--run-dir", r, "--split", "validation", "--limit", "2",
        "--max_new_tokens", "4", "--output_dir", results.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let preds = std::fs::read_to_string(results.join("predictions.jsonl")).unwrap();
    assert_eq!(preds.lines().count(), 2);
    assert!(results.join("results.json").is_file());
}

#[test]
fn run_dir_fills_in_what_no_flag_named() {
    let run = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(run.path().join("lora_adapter")).unwrap();
    std::fs::create_dir_all(run.path().join("tokenizer")).unwrap();
    std::fs::write(run.path().join("projector.safetensors"), "").unwrap();
    std::fs::write(
        run.path().join("args.json"),
        r#"{"preset": null, "model": "me/gemma", "vision_model": "me/clip", "image_aspect": "crop", "data": "me/sqa"}"#,
    )
    .unwrap();
    let r = run.path().to_str().unwrap();
    let resolved = |extra: &[&str]| {
        let mut a = vec!["--run-dir", r];
        a.extend(extra);
        infer_cli(&a).model.resolve().unwrap()
    };
    let m = resolved(&[]);
    let a = &m.answerer;
    assert_eq!(
        (a.model.model.as_str(), a.model.vision_model.as_str(), a.model.preset_tiny),
        ("me/gemma", "me/clip", false)
    );
    assert_eq!(a.image_aspect, gemmaclip::data::image::Aspect::Crop);
    assert_eq!(m.run_data.as_deref(), Some("me/sqa"));
    let adapter = a.adapter_dir.as_ref().unwrap();
    assert_eq!((adapter.path.clone(), adapter.flag), (run.path().join("lora_adapter"), "--run-dir"));
    assert_eq!(a.projector_path.as_ref().unwrap().path, run.path().join("projector.safetensors"));
    assert_eq!(a.tokenizer_dir.as_ref().unwrap().path, run.path().join("tokenizer"));
    // explicit flags win over the run's files and arguments
    let m = resolved(&["--projector-path", "p.safetensors", "--model", "other/gemma", "--image-aspect", "pad"]);
    let a = &m.answerer;
    let projector = a.projector_path.as_ref().unwrap();
    assert_eq!((projector.path.to_str(), projector.flag), (Some("p.safetensors"), "--projector-path"));
    assert_eq!((a.model.model.as_str(), a.model.vision_model.as_str()), ("other/gemma", "me/clip"));
    assert_eq!(a.image_aspect, gemmaclip::data::image::Aspect::Pad);
    assert_eq!(a.adapter_dir.as_ref().unwrap().flag, "--run-dir");
    // the run's tiny preset holds only while no base model is named here
    std::fs::write(run.path().join("args.json"), r#"{"preset": "tiny", "model": "google/gemma-3-4b-it"}"#).unwrap();
    assert!(resolved(&[]).answerer.model.preset_tiny);
    assert!(!resolved(&["--model", "local/gemma"]).answerer.model.preset_tiny);
    // without --run-dir, the defaults of old
    let m = infer_cli(&[]).model.resolve().unwrap();
    assert_eq!(m.answerer.model.model, "google/gemma-3-4b-it");
    assert!(m.answerer.adapter_dir.is_none() && m.answerer.projector_path.is_none());
}
