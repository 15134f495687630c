//! infer/eval: one prompt builder for training and answering, answer parsing (LLaVA's rules and
//! ours), the official breakdown on a hand-checked set, KV-cached greedy decoding equal to full
//! recomputation, and eval resuming without asking a question twice.

mod common;

use candle_core::{Device, Tensor};
use common::{qlora, Fixture};
use gemmaclip::data::prompt::{encode, model_turn, user_turn, Target};
use gemmaclip::data::scienceqa::Problem;
use gemmaclip::eval::{breakdown, parse_answer, Scored};
use gemmaclip::generate::{generate, greedy_without_cache, GenerateOptions};
use gemmaclip::model::gemma3::BaseFormat;

fn problem() -> Problem {
    Problem {
        pid: "x".into(),
        question: "Which is a mammal?".into(),
        choices: vec!["shark".into(), "whale".into(), "trout".into()],
        answer: 1,
        hint: "".into(),
        lecture: "Mammals breathe air.".into(),
        solution: "A whale is a mammal.".into(),
        ..Default::default()
    }
}

#[test]
fn training_and_answering_share_one_prompt() {
    let p = problem();
    let user = user_turn(&p.question, &p.hint, &p.choices, Some(3));
    assert_eq!(
        user,
        "<bos><start_of_turn>user\n<start_of_image><image_soft_token><image_soft_token><image_soft_token><end_of_image>\n\
         Question: Which is a mammal?\nContext: N/A\nChoices: A) shark; B) whale; C) trout<end_of_turn>\n<start_of_turn>model\n"
    );
    assert_eq!(
        model_turn(&p, Target::Mcot),
        "Step-by-step reasoning:\nMammals breathe air.\nA whale is a mammal.\n\nFinal Answer:\nB) whale<end_of_turn>"
    );
    assert_eq!(model_turn(&p, Target::Answer), "Final Answer:\nB) whale<end_of_turn>");
    // the training row starts with exactly the ids infer sends, and labels begin where it ends
    let tok = tokenizers::Tokenizer::from_file(common::tiny_dir().join("llm/tokenizer.json")).unwrap();
    let cfg = common::forward::llm_cfg();
    let e = encode(&tok, &p, Some(3), cfg.image_token_index, Target::Mcot, 4096).unwrap();
    let prompt_ids = tok.encode(user.as_str(), false).unwrap().get_ids().to_vec();
    assert_eq!(&e.ids[..prompt_ids.len()], &prompt_ids[..]);
    assert!(e.labels[..prompt_ids.len()].iter().all(|&l| l == -100));
    assert!(e.labels[prompt_ids.len()..].iter().all(|&l| l >= 0));
    assert_eq!(e.ids.iter().filter(|&&i| i == cfg.image_token_index).count(), 3);
}

#[test]
fn answers_parse_like_llava_and_ours() {
    let cases: [(&str, usize, Option<usize>); 16] = [
        ("Step-by-step reasoning:\nWhales breathe air.\n\nFinal Answer:\nB) whale", 3, Some(1)),
        ("Final Answer: (C) trout", 3, Some(2)),
        ("Final Answer:\nA.", 2, Some(0)),
        ("Final Answer:\nD) x", 3, None), // past the choices, and nothing else to go on
        ("B", 3, Some(1)),                // LLaVA: a bare option letter
        ("  C  ", 3, Some(2)),
        ("E", 4, None), // a valid option letter beyond the choices is wrong
        ("A. Photosynthesis", 3, Some(0)),
        ("A.Photosynthesis", 3, None),
        ("The answer is B.", 3, Some(1)),
        ("The answer is B", 3, None), // LLaVA's regex needs one more character after the letter
        ("The answer is A. Or maybe The answer is B.", 3, None), // two matches: FAILED
        ("I think it is whale", 3, None),
        ("", 3, None),
        ("Final Answer:\nwhale\nThe answer is C.", 3, Some(2)), // our block unreadable, LLaVA rule applies
        ("F", 6, None),                                         // LLaVA's options stop at E
    ];
    for (text, n, want) in cases {
        assert_eq!(parse_answer(text, n), want, "{text:?}");
    }
}

#[test]
fn breakdown_matches_hand_computed_values() {
    let s = |subject: &str, grade: &str, txt: bool, img: bool, ok: bool| Scored {
        subject: subject.into(),
        grade: grade.into(),
        has_text: txt,
        has_image: img,
        correct: ok,
    };
    let rows = vec![
        s("natural science", "grade1", true, true, true),
        s("natural science", "grade7", false, true, false),
        s("natural science", "grade12", false, false, true),
        s("social science", "grade6", true, false, true),
        s("social science", "grade8", false, false, false),
        s("language science", "grade2", false, false, true),
        s("language science", "grade3", true, false, false),
        s("language science", "grade10", false, true, true),
    ];
    let got: Vec<(&str, usize, usize)> = breakdown(&rows).iter().map(|c| (c.name, c.correct, c.count)).collect();
    assert_eq!(
        got,
        vec![
            ("NAT", 2, 3),
            ("SOC", 1, 2),
            ("LAN", 2, 3),
            ("TXT", 2, 3),
            ("IMG", 2, 3),
            ("NO", 2, 3),
            ("G1-6", 3, 4),
            ("G7-12", 2, 4),
            ("Avg", 5, 8)
        ]
    );
    let avg = breakdown(&rows).last().unwrap().accuracy.unwrap();
    assert!((avg - 62.5).abs() < 1e-12);
}

#[test]
fn kv_cached_greedy_equals_recomputation_with_padding_past_the_window() {
    let dev = Device::Cpu;
    let f = Fixture::load("parity.safetensors");
    let (vlm, _) = qlora::model(&dev, BaseFormat::Nf4);
    let window = vlm.llm.cfg.sliding_window;
    let ids = f.rows_i64("vlm.input_ids");
    let mask = f.rows_i64("vlm.attention_mask");
    // the two prompts of the fixture batch (with their image blocks), cut where their model turn starts
    let labels = f.rows_i64("vlm.labels");
    let prompts: Vec<Vec<u32>> = ids
        .iter()
        .zip(&labels)
        .zip(&mask)
        .map(|((r, l), m)| {
            let end = l.iter().position(|&x| x >= 0).unwrap_or(m.iter().filter(|&&v| v == 1).count());
            r[..end].iter().map(|&x| x as u32).collect()
        })
        .collect();
    assert_ne!(prompts[0].len(), prompts[1].len(), "the batch must need padding");
    assert!(prompts.iter().all(|p| p.len() > 2 * window));
    let px: Tensor = f.get("vlm.pixel_values").clone();
    let n = 3 * window; // decode well past the sliding window
    let opts = GenerateOptions::greedy(n, vec![]);
    let (batched, _) = generate(&vlm, &prompts, Some(&px), &opts, &mut |_, _| {}).unwrap();
    // a cache that starts with room for one new token and doubles it 1, 2, 4, ... on the way
    let small_room = GenerateOptions { cache_room: 1, ..opts.clone() };
    let (grown, _) = generate(&vlm, &prompts, Some(&px), &small_room, &mut |_, _| {}).unwrap();
    for (b, p) in prompts.iter().enumerate() {
        assert_eq!(grown[b].tokens, batched[b].tokens, "row {b} through a growing cache");
        let one = px.narrow(0, b, 1).unwrap();
        let reference = greedy_without_cache(&vlm, p, Some(&one), n, &[]).unwrap();
        assert_eq!(batched[b].tokens, reference, "row {b}");
        let (alone, _) = generate(&vlm, std::slice::from_ref(p), Some(&one), &opts, &mut |_, _| {}).unwrap();
        assert_eq!(alone[0].tokens, reference, "row {b} alone");
    }
    println!("{} tokens per row, cached (batched, padded, growing) == recomputed", n);
    let empty = generate(&vlm, &[prompts[0].clone(), vec![]], Some(&px), &opts, &mut |_, _| {}).unwrap_err();
    assert_eq!(empty.to_string(), "prompt 1 of the batch has no tokens");
}

#[test]
fn eval_resumes_without_repeating_questions() {
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("GEMMACLIP_CACHE", cache.path());
    let out = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_gemmaclip");
    let run = |limit: &str| {
        let o = std::process::Command::new(exe)
            .env("GEMMACLIP_CACHE", cache.path())
            .args([
                "eval",
                "--preset",
                "tiny",
                "--split",
                "validation",
                "--max-new-tokens",
                "4",
                "--batch-size",
                "2",
                "--limit",
                limit,
            ])
            .arg("--projector-path")
            .arg(common::fixture_path("lora_init/projector.safetensors"))
            .arg("--adapter-dir")
            .arg(common::fixture_path("lora_init"))
            .arg("--output-dir")
            .arg(out.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    run("3");
    let first = std::fs::read_to_string(out.path().join("predictions.jsonl")).unwrap();
    assert_eq!(first.lines().count(), 3);
    let log = run("7");
    assert!(log.contains("3 of 7 questions already answered"), "{log}");
    let all = std::fs::read_to_string(out.path().join("predictions.jsonl")).unwrap();
    assert!(all.starts_with(&first), "earlier answers are kept as they were");
    let pids: Vec<String> = all
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["pid"].as_str().unwrap().to_string())
        .collect();
    let mut unique = pids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((pids.len(), unique.len()), (7, 7));
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(results["results"].as_object().unwrap().len(), 7);
    assert_eq!(results["breakdown"].as_array().unwrap().last().unwrap()["count"], 7);
}

#[test]
fn infer_cli_answers_in_json_and_rejects_bad_input_in_one_line() {
    let cache = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_gemmaclip");
    let run = |extra: &[&str]| {
        let o = std::process::Command::new(exe)
            .env("GEMMACLIP_CACHE", cache.path())
            .args(["infer", "--preset", "tiny", "--max-new-tokens", "6"])
            .arg("--adapter-dir")
            .arg(common::fixture_path("lora_init"))
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let diagram = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sample_diagram.png");
    let projector = common::fixture_path("lora_init/projector.safetensors");
    let (code, out, err) = run(&[
        "--image-path",
        diagram.to_str().unwrap(),
        "--projector-path",
        projector.to_str().unwrap(),
        "--question",
        "Which process is shown in the diagram?",
        "--choices",
        "A) Photosynthesis; B) The Water Cycle; C) The Carbon Cycle",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["prompt_tokens"].as_u64().unwrap() > 16);
    assert!(v["generated_tokens"].as_u64().unwrap() <= 6);
    for k in ["reasoning", "answer", "text", "time_to_first_token_ms", "decode_tokens_per_s"] {
        assert!(v.get(k).is_some(), "{k}");
    }
    // an image question without the projector, a missing image, too few choices: one line each
    for (extra, needle) in [
        (vec!["--image-path", diagram.to_str().unwrap(), "--question", "q", "--choices", "a; b"], "--projector-path"),
        (
            vec![
                "--image-path",
                "/nonexistent.png",
                "--projector-path",
                projector.to_str().unwrap(),
                "--question",
                "q",
                "--choices",
                "a; b",
            ],
            "/nonexistent.png",
        ),
        (vec!["--question", "q", "--choices", "only one"], "--choices"),
    ] {
        let (code, _, err) = run(&extra);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(needle) && err.trim().lines().count() == 1, "{err}");
    }
}
