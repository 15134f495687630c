//! `gemmaclip merge` against PEFT's `merge_and_unload()` (tests/fixtures/merge, made by
//! tools/reference/make_merge_fixture.py from the committed adapter tests/fixtures/lora_init):
//! merged weights within 1e-6 and the merged model's logits within 1e-4 in f32; what a bf16 merge
//! costs against the unmerged NF4 + LoRA model (printed); copy-through of every other tensor,
//! sharded input, run directories, and the errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, max_abs_diff, tiny_dir, Fixture};
use gemmaclip::config::LlmConfig;
use gemmaclip::model::gemma3::{BaseFormat, Gemma3Text};
use gemmaclip::peft::adapter::Adapter;
use gemmaclip::safetensors_out::{write_checkpoint, StDtype, TensorEntry};
use gemmaclip::weights::Weights;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const WEIGHT_TOL: f32 = 1e-6;
const LOGIT_TOL: f32 = 1e-4;
const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// One gemmaclip cache for the whole test binary (the tiny preset is written there once).
fn cache() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

fn gemmaclip(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_gemmaclip")).env("GEMMACLIP_CACHE", cache()).args(args).output().unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn adapter_dir() -> PathBuf {
    fixture_path("lora_init")
}

/// `merge --preset tiny` of the fixture adapter into `out`, with more flags; panics on failure.
fn merge_tiny(out: &Path, extra: &[&str]) -> String {
    let adapter = adapter_dir();
    let projector = adapter.join("projector.safetensors");
    let mut args = vec!["merge", "--preset", "tiny", "--adapter-dir", s(&adapter), "--output-dir", s(out)];
    if !extra.contains(&"--no-projector") && !extra.contains(&"--projector-path") {
        args.extend(["--projector-path", s(&projector)]);
    }
    args.extend(extra);
    let (code, stdout, stderr) = gemmaclip(&args);
    assert_eq!(code, Some(0), "merge {extra:?} failed: {stderr}");
    stdout
}

fn load_all(dir: &Path) -> HashMap<String, Tensor> {
    let (_, files) = gemmaclip::weights::checkpoint_files(dir).unwrap();
    files.iter().flat_map(|f| candle_core::safetensors::load(f, &Device::Cpu).unwrap()).collect()
}

fn prompt_ids() -> Vec<u32> {
    let f = Fixture::load("merge/peft_merged.safetensors");
    f.get("prompt.input_ids").to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
}

/// Our model from a checkpoint directory, f32 compute, optionally with the fixture adapter.
fn model(dir: &Path, base: BaseFormat, with_adapter: bool) -> Gemma3Text {
    let cfg = LlmConfig::from_file(&dir.join("config.json")).unwrap();
    let mut llm = Gemma3Text::load(Weights::open(dir, DType::F32, &Device::Cpu).unwrap(), &cfg.text, base).unwrap();
    if with_adapter {
        let (ad, scale) = Adapter::load(&adapter_dir(), &Device::Cpu).unwrap();
        ad.attach(&mut llm, scale).unwrap();
        llm.freeze_adapters(DType::F32).unwrap();
    }
    llm
}

/// Logits [L, V] (f32) of one prompt.
fn logits(llm: &Gemma3Text, ids: &[u32]) -> Tensor {
    let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    let hidden = llm.forward_embeds(&llm.embed(&t).unwrap(), None).unwrap();
    llm.logits(&hidden.squeeze(0).unwrap()).unwrap()
}

fn is_target(name: &str) -> bool {
    name.contains(".layers.") && TARGETS.iter().any(|t| name.ends_with(&format!(".{t}.weight")))
}

#[test]
fn f32_merge_equals_peft_merge_and_unload() {
    let f = Fixture::load("merge/peft_merged.safetensors");
    let out = tempfile::tempdir().unwrap();
    let stdout = merge_tiny(out.path(), &["--dtype", "f32"]);
    assert!(stdout.contains("merged 56 LoRA modules"), "{stdout}");
    let merged = load_all(out.path());
    let base = load_all(&tiny_dir().join("llm"));
    // a changed `init` reads as "regenerate the fixture", not as a merge bug
    let row1 = merged["language_model.model.embed_tokens.weight"].get(1).unwrap();
    assert_eq!(max_abs_diff(&row1, f.get("check.embed_tokens_row1")), 0.0, "regenerate tests/fixtures/merge");

    let mut kept = 0;
    for (k, theirs) in &f.tensors {
        if let Some(name) = k.strip_prefix("merged.") {
            let err = max_abs_diff(&merged[name], theirs);
            println!("{name}: max |ours - PEFT| = {err:.3e}");
            assert!(err <= WEIGHT_TOL, "{name}: {err}");
            kept += 1;
        }
    }
    assert_eq!(kept, 4);
    // every tensor is there, in f32; the untargeted ones bit for bit, the targeted ones moved
    assert_eq!(merged.len(), base.len());
    for (name, b) in &base {
        let m = &merged[name];
        assert_eq!(m.dtype(), DType::F32, "{name}");
        let d = max_abs_diff(m, b);
        if is_target(name) {
            assert!(d > 1e-3, "{name} was not merged ({d})");
        } else {
            assert_eq!(d, 0.0, "{name} changed");
        }
    }

    // the merged checkpoint is a plain dense base for our loader, with PEFT's merged logits
    let ours = logits(&model(out.path(), BaseFormat::Dense, false), &prompt_ids());
    let err = max_abs_diff(&ours, f.get("prompt.logits"));
    println!("merged f32 logits vs PEFT merge_and_unload: {err:.3e}");
    assert!(err <= LOGIT_TOL, "{err}");

    // the files beside the weights
    for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"] {
        assert!(out.path().join(f).is_file(), "{f}");
    }
    let projector = load_all_file(&out.path().join("projector.safetensors"));
    let trained = load_all_file(&adapter_dir().join("projector.safetensors"));
    assert_eq!(projector.len(), 4);
    for (k, v) in &trained {
        assert_eq!(max_abs_diff(&projector[k], v), 0.0, "{k}");
    }
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("merge_info.json")).unwrap()).unwrap();
    assert_eq!(info["r"], 4);
    assert_eq!(info["scale"], 2.0);
    assert_eq!(info["modules_merged"], 56);
    assert_eq!(info["dtype"], "f32");
    assert_eq!(info["merged_into"], "dense");
    assert_eq!(info["use_rslora"], false);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "float32");
}

fn load_all_file(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

#[test]
fn rslora_scales_by_alpha_over_sqrt_r() {
    let f = Fixture::load("merge/peft_merged.safetensors");
    let adapter = tempfile::tempdir().unwrap();
    std::fs::copy(adapter_dir().join("adapter_model.safetensors"), adapter.path().join("adapter_model.safetensors"))
        .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter_dir().join("adapter_config.json")).unwrap()).unwrap();
    cfg["use_rslora"] = true.into();
    std::fs::write(adapter.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let (code, _, err) = gemmaclip(&[
        "merge",
        "--preset",
        "tiny",
        "--adapter-dir",
        s(adapter.path()),
        "--no-projector",
        "--dtype",
        "f32",
        "--output-dir",
        s(out.path()),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let merged = load_all(out.path());
    let name = "language_model.model.layers.1.self_attn.k_proj.weight";
    let e = max_abs_diff(&merged[name], f.get(&format!("rslora.{name}")));
    println!("rslora {name}: {e:.3e}");
    assert!(e <= WEIGHT_TOL, "{e}");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("merge_info.json")).unwrap()).unwrap();
    assert_eq!(info["use_rslora"], true);
    assert_eq!(info["scale"], 4.0); // 8 / sqrt(4)
    assert!(!out.path().join("projector.safetensors").exists());
}

/// What a bf16 merge is and is not: measured against the unmerged models, printed for the docs.
#[test]
fn bf16_merge_against_the_unmerged_nf4_lora_model() {
    let ids = prompt_ids();
    let base_dir = tiny_dir().join("llm");
    let exact = logits(&model(&base_dir, BaseFormat::Dense, true), &ids);
    let trained = logits(&model(&base_dir, BaseFormat::Nf4, true), &ids);

    let mut measured = HashMap::new();
    for (dtype, into) in [("bf16", "dense"), ("f32", "dense"), ("bf16", "nf4"), ("f32", "nf4")] {
        let out = tempfile::tempdir().unwrap();
        merge_tiny(out.path(), &["--dtype", dtype, "--merge-into", into, "--no-projector"]);
        let w = load_all(out.path());
        let want = if dtype == "bf16" { DType::BF16 } else { DType::F32 };
        assert!(w.values().all(|t| t.dtype() == want), "{dtype}: dtypes on disk");
        let ours = logits(&model(out.path(), BaseFormat::Dense, false), &ids);
        let (vs_exact, vs_trained) = (max_abs_diff(&ours, &exact), max_abs_diff(&ours, &trained));
        println!(
            "merge --dtype {dtype} --merge-into {into}: max |logit diff| vs dense+LoRA (f32) {vs_exact:.3e}, \
             vs NF4+LoRA (f32) {vs_trained:.3e}"
        );
        measured.insert((dtype, into), (vs_exact, vs_trained, w));
    }
    let zero = exact.zeros_like().unwrap();
    println!(
        "unmerged dense+LoRA vs NF4+LoRA: {:.3e}; max |logit| {:.3}",
        max_abs_diff(&exact, &trained),
        max_abs_diff(&exact, &zero)
    );
    // f32 merges reproduce the model they merge into
    assert!(measured[&("f32", "dense")].0 <= LOGIT_TOL);
    assert!(measured[&("f32", "nf4")].1 <= LOGIT_TOL);
    // bf16 rounds W' once: the bf16 checkpoint is the f32 one rounded to nearest even
    for into in ["dense", "nf4"] {
        let (f32w, bf16w) = (&measured[&("f32", into)].2, &measured[&("bf16", into)].2);
        for (name, t) in f32w {
            let rounded = t.to_dtype(DType::BF16).unwrap();
            assert_eq!(max_abs_diff(&rounded, &bf16w[name]), 0.0, "{into} {name}");
        }
    }
    // the default merge is not the trained NF4 model: its distance to it is the NF4 error
    let (bf16_exact, bf16_trained, _) = &measured[&("bf16", "dense")];
    assert!(bf16_trained > bf16_exact, "{bf16_trained} vs {bf16_exact}");
}

/// A sharded bf16 checkpoint with tensors the merge does not know (a vision tower, Gemma's own
/// projector): every tensor comes out under its name, the unknown ones byte for byte.
#[test]
fn sharded_bf16_input_with_other_tensors_is_copied_through() {
    let model = tempfile::tempdir().unwrap();
    let src = tiny_dir().join("llm");
    for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), model.path().join(f)).unwrap();
    }
    let mut tensors: Vec<(String, Tensor)> = load_all(&src).into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors.push((
        "vision_tower.vision_model.post_layernorm.weight".into(),
        Tensor::ones(32, DType::F32, &Device::Cpu).unwrap(),
    ));
    tensors.push((
        "multi_modal_projector.mm_input_projection_weight".into(),
        Tensor::arange(0f32, 32.0 * 64.0, &Device::Cpu).unwrap().reshape((32, 64)).unwrap(),
    ));
    let tensors: Vec<(String, Tensor)> =
        tensors.into_iter().map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap())).collect();
    let entries: Vec<TensorEntry> = tensors
        .iter()
        .map(|(k, v)| TensorEntry { name: k.clone(), shape: v.dims().to_vec(), dtype: StDtype::BF16 })
        .collect();
    let by_name: HashMap<&str, &Tensor> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let written = write_checkpoint(model.path(), &entries, 200_000, |e, sink| {
        let t = by_name[e.name.as_str()].flatten_all()?.to_vec1::<half::bf16>()?;
        let bytes: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        sink.write_all(&bytes)?;
        Ok(())
    })
    .unwrap();
    assert!(written.len() > 3, "{written:?}");

    let out = tempfile::tempdir().unwrap();
    let (code, stdout, err) = gemmaclip(&[
        "merge",
        "--model",
        s(model.path()),
        "--adapter-dir",
        s(&adapter_dir()),
        "--no-projector",
        "--output-dir",
        s(out.path()),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(stdout.contains("merged 56 LoRA modules"), "{stdout}");
    let merged = load_all(out.path());
    assert_eq!(merged.len(), tensors.len());
    let (ad, scale) = Adapter::load(&adapter_dir(), &Device::Cpu).unwrap();
    for (name, t) in &tensors {
        let m = &merged[name];
        assert_eq!(m.dtype(), DType::BF16, "{name}");
        if is_target(name) {
            // bf16(f32(W) + scale * B A)
            let module = name.strip_prefix("language_model.model.").unwrap().strip_suffix(".weight").unwrap();
            let (a, b) = &ad.modules[module];
            let want = (t.to_dtype(DType::F32).unwrap() + (b.matmul(a).unwrap() * scale).unwrap())
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            assert_eq!(max_abs_diff(m, &want), 0.0, "{name}");
        } else {
            assert_eq!(max_abs_diff(m, t), 0.0, "{name}");
        }
    }
    // config.json said float32 before; the checkpoint is bf16 now
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
}

#[test]
fn a_run_dir_gives_adapter_projector_tokenizer_and_model() {
    let run = tempfile::tempdir().unwrap();
    let adapter = run.path().join("lora_adapter");
    let step = run.path().join("checkpoints/step-2");
    for d in [&adapter, &step] {
        std::fs::create_dir_all(d).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(adapter_dir().join(f), d.join(f)).unwrap();
        }
    }
    std::fs::copy(adapter_dir().join("projector.safetensors"), run.path().join("projector.safetensors")).unwrap();
    std::fs::copy(adapter_dir().join("projector.safetensors"), step.join("projector.safetensors")).unwrap();
    let tok = run.path().join("tokenizer");
    std::fs::create_dir_all(&tok).unwrap();
    std::fs::copy(tiny_dir().join("llm/tokenizer.json"), tok.join("tokenizer.json")).unwrap();
    std::fs::write(tok.join("chat_template.jinja"), "{{ run-dir marker }}").unwrap();
    // the run's own --preset is the default model (never a download of the 4B)
    std::fs::write(run.path().join("args.json"), r#"{"preset": "tiny", "model": "google/gemma-3-4b-it"}"#).unwrap();
    for dir in [run.path(), step.as_path()] {
        let out = tempfile::tempdir().unwrap();
        let (code, stdout, err) = gemmaclip(&["merge", "--run-dir", s(dir), "--output-dir", s(out.path())]);
        assert_eq!(code, Some(0), "{}: {err}", dir.display());
        assert!(stdout.contains("of gemmaclip/tiny"), "{stdout}");
        let template = std::fs::read_to_string(out.path().join("chat_template.jinja")).unwrap();
        assert_eq!(template, "{{ run-dir marker }}");
        // the files the run's tokenizer/ lacks come from the model
        assert!(out.path().join("tokenizer_config.json").is_file());
        assert!(out.path().join("projector.safetensors").is_file());
    }
    // an unfinished run points at its checkpoint
    std::fs::remove_dir_all(&adapter).unwrap();
    let out = tempfile::tempdir().unwrap();
    refused(
        &["merge", "--run-dir", s(run.path()), "--output-dir", s(&out.path().join("x"))],
        &["--run-dir", "has not finished", "checkpoints/step-2"],
    );
}

/// Asserts a refused merge: exit 1, one line on stderr that contains every `needles`.
fn refused(args: &[&str], needles: &[&str]) {
    let (code, _, err) = gemmaclip(args);
    assert_eq!(code, Some(1), "{args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected {n:?} in {err}");
    }
}

/// An adapter directory with one module of the given shapes.
fn odd_adapter(module: &str, a: (usize, usize), b: (usize, usize)) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let key = |half: &str| format!("base_model.model.model.language_model.{module}.{half}.weight");
    let t: HashMap<String, Tensor> = [
        (key("lora_A"), Tensor::zeros(a, DType::F32, &dev).unwrap()),
        (key("lora_B"), Tensor::zeros(b, DType::F32, &dev).unwrap()),
    ]
    .into();
    candle_core::safetensors::save(&t, d.path().join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        d.path().join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": "google/gemma-3-12b-it"}"#,
    )
    .unwrap();
    d
}

#[test]
fn refusals_are_one_line_naming_the_flag_or_file() {
    let adapter = adapter_dir();
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("merged");
    let base = ["merge", "--preset", "tiny", "--output-dir", s(&o)];
    let with = |extra: &[&str]| -> Vec<String> { base.iter().chain(extra).map(|x| x.to_string()).collect() };
    let run = |extra: &[&str], needles: &[&str]| {
        let args = with(extra);
        refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), needles);
        assert!(!o.exists(), "{extra:?}: wrote {}", o.display());
    };

    run(
        &["--adapter-dir", "/nonexistent/adapter", "--no-projector"],
        &["--adapter-dir /nonexistent/adapter", "no such"],
    );
    run(&["--adapter-dir", s(&adapter), "--projector-path", "/nonexistent/p.safetensors"], &["--projector-path"]);
    run(&["--adapter-dir", s(&adapter)], &["no projector", "--projector-path", "--no-projector"]);
    let empty_run = tempfile::tempdir().unwrap();
    run(&["--run-dir", s(empty_run.path())], &["--run-dir", "lora_adapter"]);
    // an adapter for another model: shapes that do not fit, a layer the model lacks
    let wide = odd_adapter("layers.0.self_attn.q_proj", (4, 3840), (4096, 4));
    run(
        &["--adapter-dir", s(wide.path()), "--no-projector"],
        &["--adapter-dir", "layers.0.self_attn.q_proj", "do not fit", "[64, 64]", "google/gemma-3-12b-it"],
    );
    let deep = odd_adapter("layers.40.mlp.up_proj", (4, 64), (128, 4));
    run(&["--adapter-dir", s(deep.path()), "--no-projector"], &["--adapter-dir", "layers.40.mlp.up_proj", "no weight"]);
    // a projector for another model
    let p = tempfile::tempdir().unwrap();
    let pp = p.path().join("projector.safetensors");
    let t: HashMap<String, Tensor> = [
        ("linear_1.weight".to_string(), Tensor::zeros((2560, 1024), DType::F32, &Device::Cpu).unwrap()),
        ("linear_1.bias".to_string(), Tensor::zeros(2560, DType::F32, &Device::Cpu).unwrap()),
    ]
    .into();
    candle_core::safetensors::save(&t, &pp).unwrap();
    run(&["--adapter-dir", s(&adapter), "--projector-path", s(&pp)], &["--projector-path", "hidden size is 64"]);

    // an output directory that holds files: refused, then replaced with --overwrite-output-dir
    std::fs::create_dir_all(&o).unwrap();
    for stale in ["model-00001-of-00002.safetensors", "model.safetensors.index.json"] {
        std::fs::write(o.join(stale), b"old").unwrap();
    }
    std::fs::write(o.join("notes.txt"), b"mine").unwrap();
    refused(
        &with(&["--adapter-dir", s(&adapter), "--no-projector"]).iter().map(String::as_str).collect::<Vec<_>>(),
        &["--output-dir", "holds files", "--overwrite-output-dir"],
    );
    assert_eq!(std::fs::read(o.join("model.safetensors.index.json")).unwrap(), b"old");
    merge_tiny(&o, &["--no-projector", "--overwrite-output-dir"]);
    assert!(o.join("model.safetensors").is_file());
    assert!(!o.join("model.safetensors.index.json").exists(), "a stale index would shadow the new weights");
    assert!(!o.join("model-00001-of-00002.safetensors").exists());
    assert_eq!(std::fs::read(o.join("notes.txt")).unwrap(), b"mine");
    // the merged checkpoint loads as a base model
    model(&o, BaseFormat::Dense, false);
}
