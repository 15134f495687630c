//! `gemmaclip merge`: what PEFT's `merge_and_unload()` does, for a gemmaclip run. Every weight a
//! LoRA adapter touches becomes W' = W + scale * B A (scale = lora_alpha / r, or lora_alpha /
//! sqrt(r) with use_rslora), computed in f32 and rounded once to the output dtype; every other
//! tensor of the checkpoint is copied through under its own name. The result is the base model's
//! directory in the hub layout (weights sharded as `save_pretrained` shards them, config, generation
//! config, tokenizer and processor files) with the trained projector beside it and a
//! `merge_info.json` saying what was merged, so `Gemma3ForConditionalGeneration.from_pretrained`
//! loads it, and so does gemmaclip itself (`--model OUT --projector-path OUT/projector.safetensors`,
//! no adapter).
//!
//! W is read from the base checkpoint as it is published, tensor by tensor (one tensor in memory at
//! a time), never from the NF4 copy training quantized: see [`EXACTNESS`].

use crate::config::LlmConfig;
use crate::hub;
use crate::model::projector::Projector;
use crate::peft::adapter::{self, Adapter};
use crate::peft::lora::DEFAULT_TARGETS;
use crate::peft::nf4;
use crate::safetensors_out::{write_atomic, write_checkpoint, StDtype, TensorEntry};
use crate::weights::{checkpoint_files, Format, Weights};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// What the merged model is and is not (the command's long help, and the output's README).
pub const EXACTNESS: &str = "\
Exactness: W' = W + scale * B A is computed in f32 from the base checkpoint's own dense weights and \
rounded once to --dtype (bf16: to nearest even; a bf16 base's other tensors are copied unchanged); \
with --dtype f32 it is PEFT's merge_and_unload() on the same base. W is the original weight, not \
the NF4-dequantized one that QLoRA trained against, so the merged model is NOT the NF4 + LoRA model \
you trained: it is your adapter on the unquantized base, and differs from the trained model by the \
base's NF4 quantization error. On the tiny test model (random f32 weights, max |logit| 3.9, where \
NF4's error is far larger than on a real model) the largest logit difference of a bf16 merge is \
5.2e-2 to the exact dense-base LoRA model and 1.7 to the unmerged NF4 + LoRA model (the same 1.7 \
that separates dense + LoRA from NF4 + LoRA). --merge-into nf4 adds the adapter to the NF4 round \
trip of every q/k/v/o/gate/up/down weight instead, which reproduces the trained NF4 + LoRA model up \
to the output rounding (4.6e-2 in bf16, 6e-6 in f32 on the tiny model), at the cost of baking the \
quantization error into a dense checkpoint.";

/// The output dtype of the merged checkpoint (every floating tensor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MergeDtype {
    Bf16,
    F32,
}

impl MergeDtype {
    fn st(self) -> StDtype {
        match self {
            MergeDtype::Bf16 => StDtype::BF16,
            MergeDtype::F32 => StDtype::F32,
        }
    }
    /// The name transformers' config.json uses.
    fn torch_name(self) -> &'static str {
        match self {
            MergeDtype::Bf16 => "bfloat16",
            MergeDtype::F32 => "float32",
        }
    }
    fn flag(self) -> &'static str {
        match self {
            MergeDtype::Bf16 => "bf16",
            MergeDtype::F32 => "f32",
        }
    }
}

/// Which base weights the adapter is added to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MergeInto {
    /// The checkpoint's own dense weights (PEFT's merge_and_unload on the unquantized base).
    Dense,
    /// The NF4 round trip (blocks of 64, as training quantizes) of every q/k/v/o/gate/up/down
    /// weight, adapted or not: the weights the adapter was trained against.
    Nf4,
}

impl MergeInto {
    fn name(self) -> &'static str {
        match self {
            MergeInto::Dense => "dense",
            MergeInto::Nf4 => "nf4",
        }
    }
}

/// `gemmaclip merge`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_long_help = EXACTNESS)]
pub struct MergeArgs {
    /// The embedded tiny random model (what `train --preset tiny` trained); ignores --model.
    #[arg(long, value_parser = ["tiny"])]
    pub preset: Option<String>,
    /// The base Gemma-3 checkpoint the adapter was trained on: a directory in the hub layout or a
    /// hub id [default: the --run-dir's, else google/gemma-3-4b-it]. Its original dense weights are
    /// merged into, never the NF4-dequantized ones (see --merge-into).
    #[arg(long)]
    pub model: Option<String>,
    /// The LoRA adapter (PEFT layout: adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR", required_unless_present = "run_dir")]
    pub adapter_dir: Option<PathBuf>,
    /// A train output directory (its lora_adapter/, projector.safetensors and tokenizer/) or one of
    /// its checkpoints (DIR/checkpoints/step-N); the run's --preset and --model become the defaults.
    /// --adapter-dir, --projector-path and --tokenizer-dir, when given too, take precedence.
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// The trained projector, written beside the merged checkpoint as projector.safetensors (f32).
    #[arg(long, value_name = "FILE", conflicts_with = "no_projector")]
    pub projector_path: Option<PathBuf>,
    /// Merge the language model only (text-only use): no projector.safetensors.
    #[arg(long)]
    pub no_projector: bool,
    /// Where the tokenizer files come from; defaults to the run's tokenizer/, else the model's.
    #[arg(long, value_name = "DIR")]
    pub tokenizer_dir: Option<PathBuf>,
    /// The merged checkpoint's directory.
    #[arg(long, value_name = "DIR")]
    pub output_dir: PathBuf,
    /// Replace the files of an --output-dir that is not empty.
    #[arg(long)]
    pub overwrite_output_dir: bool,
    /// Dtype of every floating tensor written.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: MergeDtype,
    /// Base weights the adapter is added to: the checkpoint's dense ones (PEFT's merge), or their
    /// NF4 round trip (the weights QLoRA trained against).
    #[arg(long, value_enum, default_value = "dense")]
    pub merge_into: MergeInto,
}

const DEFAULT_MODEL: &str = "google/gemma-3-4b-it";
/// Tokenizer files, taken from the tokenizer directory, else from the model's.
const TOKENIZER_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
];
/// Other files of the model directory that travel with the weights (config.json is edited).
const MODEL_FILES: [&str; 3] = ["generation_config.json", "preprocessor_config.json", "processor_config.json"];
/// How the text model's tensors may be nested in the checkpoint (as `Gemma3Text::load` accepts).
const TEXT_PREFIXES: [&str; 4] = ["language_model.model.", "model.language_model.", "model.", ""];
/// Elements converted per chunk when a tensor is copied through.
const COPY_CHUNK: usize = 1 << 22;

/// A tensor's dtype in an input checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InDtype {
    F32,
    BF16,
    F16,
}

impl InDtype {
    fn size(self) -> usize {
        match self {
            InDtype::F32 => 4,
            InDtype::BF16 | InDtype::F16 => 2,
        }
    }
    fn same_as(self, out: StDtype) -> bool {
        matches!((self, out), (InDtype::F32, StDtype::F32) | (InDtype::BF16, StDtype::BF16))
    }
}

/// One tensor of a safetensors file: where its bytes are.
#[derive(Debug, Clone)]
struct Stored {
    name: String,
    dtype: InDtype,
    shape: Vec<usize>,
    file: usize,
    /// Absolute byte offset in the file.
    start: u64,
}

impl Stored {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The tensors of one safetensors file, in the order of their data.
fn read_header(path: &Path, file: usize) -> Result<Vec<Stored>> {
    let what = || format!("{}: not a readable safetensors file", path.display());
    let mut f = std::fs::File::open(path).with_context(what)?;
    let len = f.metadata().with_context(what)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).with_context(what)?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 1 << 30 {
        bail!("{}: header length {n} does not fit the file ({len} bytes)", what());
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).with_context(what)?;
    // safetensors' own header type checks names, dtypes, shapes and that the offsets tile the data
    let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header).with_context(what)?;
    let data_start = 8 + n;
    let mut out = vec![];
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => InDtype::F32,
            safetensors::Dtype::BF16 => InDtype::BF16,
            safetensors::Dtype::F16 => InDtype::F16,
            other => bail!(
                "{}: tensor `{name}` has dtype {other:?} (merge reads f32, bf16 and f16 checkpoints; \
                 a pre-quantized checkpoint cannot be merged into)",
                path.display()
            ),
        };
        let (begin, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        let numel: usize = info.shape.iter().product();
        if end < begin || end - begin != (numel * dtype.size()) as u64 || data_start + end > len {
            bail!("{}: tensor `{name}`'s data_offsets do not match its shape or the file size", path.display());
        }
        out.push(Stored { name, dtype, shape: info.shape.clone(), file, start: data_start + begin });
    }
    out.sort_by_key(|s| s.start);
    Ok(out)
}

fn decode(bytes: &[u8], dtype: InDtype) -> Vec<f32> {
    match dtype {
        InDtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        InDtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        InDtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    }
}

/// Little-endian bytes of `vals` in `dtype`; bf16 rounds to nearest even, as torch does.
fn encode(vals: &[f32], dtype: StDtype) -> Vec<u8> {
    match dtype {
        StDtype::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        StDtype::BF16 => vals.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
    }
}

/// What happens to a tensor on its way out, other than being copied through.
enum Action {
    /// + scale * B A of this adapter module; `nf4` first replaces W by its NF4 round trip.
    Merge { module: String, nf4: bool },
    /// The NF4 round trip only (a quantized linear the adapter does not touch, with --merge-into nf4).
    Nf4,
}

/// Whether a text-model path (`layers.3.mlp.up_proj.weight`) is a linear that training quantizes.
fn is_quantized_linear(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("layers.") else { return false };
    let Some((n, rest)) = rest.split_once('.') else { return false };
    let Some(module) = rest.strip_suffix(".weight") else { return false };
    n.parse::<usize>().is_ok()
        && ["self_attn.", "mlp."].iter().any(|p| module.strip_prefix(p).is_some_and(|m| DEFAULT_TARGETS.contains(&m)))
}

fn nf4_round_trip(w: &[f32]) -> Vec<f32> {
    let (packed, absmax) = nf4::quantize_cpu(w);
    nf4::dequantize_cpu(&packed, &absmax, w.len())
}

/// The inputs, resolved from the flags.
struct Sources {
    model_dir: PathBuf,
    model_name: String,
    /// How messages name the model (`--model X`, `--preset tiny`, or the run's).
    model_flag: String,
    adapter_dir: PathBuf,
    adapter_flag: String,
    projector: Option<(PathBuf, String)>,
    tokenizer_dir: PathBuf,
}

fn resolve_sources(a: &MergeArgs) -> Result<Sources> {
    let run_flag = a.run_dir.as_ref().map(|d| format!("--run-dir {}", d.display()));
    let run = a.run_dir.as_deref().map(|d| crate::load::RunDir::open(d, "--run-dir")).transpose()?;
    let (adapter_dir, adapter_flag) = match (&a.adapter_dir, &run, &run_flag) {
        (Some(d), _, _) => (d.clone(), format!("--adapter-dir {}", d.display())),
        (None, Some(r), Some(flag)) => (r.adapter_dir.clone(), flag.clone()),
        _ => bail!("no adapter: pass --adapter-dir or --run-dir"),
    };
    if !adapter_dir.is_dir() {
        bail!("{adapter_flag}: no such directory");
    }
    let projector = if a.no_projector {
        None
    } else if let Some(p) = &a.projector_path {
        if !p.is_file() {
            bail!("--projector-path {}: no such file", p.display());
        }
        Some((p.clone(), format!("--projector-path {}", p.display())))
    } else if let (Some(r), Some(flag)) = (&run, &run_flag) {
        let Some(p) = &r.projector_path else {
            bail!("{flag}: no projector.safetensors (pass --projector-path, or --no-projector for a text-only merge)");
        };
        Some((p.clone(), flag.clone()))
    } else {
        bail!(
            "no projector: pass --projector-path (a train run's projector.safetensors), or --no-projector \
             for a text-only merge"
        );
    };
    // the model: the flags, else the run's own (so a tiny run is never merged into a download)
    let run_arg = |k: &str| run.as_ref().and_then(|r| r.arg(k));
    let tiny = a.preset.is_some() || (a.model.is_none() && run_arg("preset").is_some_and(|p| p == "tiny"));
    let (model_dir, model_name, model_flag) = if tiny {
        let flag = if a.preset.is_some() { "--preset tiny".to_string() } else { "the run's --preset tiny".to_string() };
        (hub::tiny_model()?.0, "gemmaclip/tiny".to_string(), flag)
    } else {
        let (model, flag) = match (&a.model, run_arg("model")) {
            (Some(m), _) => (m.clone(), "--model"),
            (None, Some(m)) => (m, "the run's --model"),
            (None, None) => (DEFAULT_MODEL.to_string(), "--model"),
        };
        (hub::resolve_model(&model, flag)?, model.clone(), format!("{flag} {model}"))
    };
    let tokenizer_dir = match (&a.tokenizer_dir, run.as_ref().and_then(|r| r.tokenizer_dir.clone())) {
        (Some(d), _) => {
            if !d.join("tokenizer.json").is_file() {
                bail!("--tokenizer-dir {}: no tokenizer.json", d.display());
            }
            d.clone()
        }
        (None, Some(d)) => d,
        (None, None) => model_dir.clone(),
    };
    Ok(Sources { model_dir, model_name, model_flag, adapter_dir, adapter_flag, projector, tokenizer_dir })
}

/// Refuses an output directory that holds files (unless told to overwrite) or that is an input.
fn check_output(a: &MergeArgs, s: &Sources) -> Result<()> {
    let out = &a.output_dir;
    let flag = format!("--output-dir {}", out.display());
    if out.exists() && !out.is_dir() {
        bail!("{flag}: exists and is not a directory");
    }
    if !out.exists() {
        return Ok(());
    }
    let canon = out.canonicalize().with_context(|| format!("{flag}: cannot resolve"))?;
    for (dir, what) in [(&s.model_dir, "the base model's directory"), (&s.adapter_dir, "the adapter's directory")] {
        if dir.canonicalize().is_ok_and(|d| d == canon) {
            bail!("{flag}: is {what}; write the merged checkpoint elsewhere");
        }
    }
    let non_empty = std::fs::read_dir(out).with_context(|| format!("{flag}: cannot read"))?.next().is_some();
    if non_empty && !a.overwrite_output_dir {
        bail!("{flag}: holds files; pass --overwrite-output-dir to replace them, or choose an empty directory");
    }
    Ok(())
}

/// What `run` did, for its summary line and for tests.
#[derive(Debug)]
pub struct MergeReport {
    pub tensors: usize,
    pub modules_merged: usize,
    pub scale: f64,
    pub files: Vec<PathBuf>,
}

pub fn run(a: &MergeArgs) -> Result<MergeReport> {
    let s = resolve_sources(a)?;
    check_output(a, &s)?;
    let model_flag = s.model_flag.clone();

    // the adapter and what its config says beyond LoraSpec
    let (adapter, scale) = Adapter::load(&s.adapter_dir, &Device::Cpu).with_context(|| s.adapter_flag.clone())?;
    let adapter_cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(s.adapter_dir.join(adapter::CONFIG_NAME)).with_context(|| s.adapter_flag.clone())?,
    )
    .with_context(|| s.adapter_flag.clone())?;
    let use_rslora = adapter_cfg.get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
    let trained_on = adapter_cfg.get("base_model_name_or_path").and_then(Value::as_str).unwrap_or("").to_string();
    let another_model = || {
        if trained_on.is_empty() {
            "an adapter for another model?".to_string()
        } else {
            format!("an adapter for another model? its adapter_config.json names `{trained_on}`")
        }
    };

    // the base checkpoint: every tensor, in file and data order
    let cfg = LlmConfig::from_file(&s.model_dir.join("config.json")).with_context(|| model_flag.clone())?;
    let (format, files) = checkpoint_files(&s.model_dir).with_context(|| model_flag.clone())?;
    if format == Format::Pth {
        bail!("{model_flag}: the checkpoint is a PyTorch .bin; merge reads safetensors checkpoints only");
    }
    let mut stored = vec![];
    for (i, f) in files.iter().enumerate() {
        stored.extend(read_header(f, i).with_context(|| model_flag.clone())?);
    }
    let by_name: HashMap<&str, &Stored> = stored.iter().map(|t| (t.name.as_str(), t)).collect();
    let Some(prefix) = TEXT_PREFIXES.iter().find(|p| by_name.contains_key(format!("{p}embed_tokens.weight").as_str()))
    else {
        bail!("{model_flag}: no `embed_tokens.weight` under any of {TEXT_PREFIXES:?}; is this a Gemma-3 checkpoint?");
    };

    // every adapter module must land on a weight of its shape
    let mut actions: HashMap<String, Action> = HashMap::new();
    for (module, (la, lb)) in &adapter.modules {
        let name = format!("{prefix}{module}.weight");
        let Some(w) = by_name.get(name.as_str()) else {
            bail!("{}: module `{module}` has no weight `{name}` in {model_flag} ({})", s.adapter_flag, another_model());
        };
        let (r, i) = la.dims2()?;
        let (o, _) = lb.dims2()?;
        if w.shape != [o, i] {
            bail!(
                "{}: module `{module}`: lora_A [{r}, {i}] and lora_B [{o}, {r}] do not fit `{name}` {:?} of {model_flag} ({})",
                s.adapter_flag,
                w.shape,
                another_model()
            );
        }
        actions.insert(name, Action::Merge { module: module.clone(), nf4: a.merge_into == MergeInto::Nf4 });
    }
    if a.merge_into == MergeInto::Nf4 {
        for t in &stored {
            let quantized = t.name.strip_prefix(prefix).is_some_and(is_quantized_linear);
            if quantized && !actions.contains_key(&t.name) {
                actions.insert(t.name.clone(), Action::Nf4);
            }
        }
    }

    // the projector, checked against the model's hidden size before anything is written
    let projector = match &s.projector {
        None => None,
        Some((path, flag)) => Some(load_projector(path, cfg.text.hidden_size).with_context(|| flag.clone())?),
    };

    let out = &a.output_dir;
    std::fs::create_dir_all(out).with_context(|| format!("--output-dir {}: cannot create", out.display()))?;
    let dtype = a.dtype.st();
    let entries: Vec<TensorEntry> =
        stored.iter().map(|t| TensorEntry { name: t.name.clone(), shape: t.shape.clone(), dtype }).collect();
    let mut readers = files
        .iter()
        .map(|f| std::fs::File::open(f).with_context(|| format!("cannot open {}", f.display())))
        .collect::<Result<Vec<_>>>()?;
    let bar = crate::device::progress_bar(stored.len(), 0);
    bar.set_message("tensors");
    let mut merged = 0;
    let written = write_checkpoint(out, &entries, crate::init::MAX_SHARD_BYTES, |e, sink| {
        let t = by_name[e.name.as_str()];
        let reader = &mut readers[t.file];
        reader.seek(SeekFrom::Start(t.start)).with_context(|| format!("{}: cannot seek", files[t.file].display()))?;
        match actions.get(&t.name) {
            None => copy_through(t, reader, dtype, sink).with_context(|| files[t.file].display().to_string())?,
            Some(action) => {
                let mut bytes = vec![0u8; t.numel() * t.dtype.size()];
                reader
                    .read_exact(&mut bytes)
                    .with_context(|| format!("{}: cannot read `{}`", files[t.file].display(), t.name))?;
                let mut w = decode(&bytes, t.dtype);
                drop(bytes);
                if matches!(action, Action::Nf4 | Action::Merge { nf4: true, .. }) {
                    w = nf4_round_trip(&w);
                }
                if let Action::Merge { module, .. } = action {
                    let (la, lb) = &adapter.modules[module];
                    let base = Tensor::from_vec(w, (t.shape[0], t.shape[1]), &Device::Cpu)?;
                    // PEFT's get_delta_weight: (B @ A) * scaling, then added to the weight
                    let delta = (lb.matmul(la)? * scale)?;
                    w = (base + delta)?.flatten_all()?.to_vec1::<f32>()?;
                    merged += 1;
                }
                sink.write_all(&encode(&w, dtype))?;
            }
        }
        bar.inc(1);
        Ok(())
    })?;
    bar.finish_and_clear();
    if merged != adapter.modules.len() {
        bail!("internal: merged {merged} of {} adapter modules", adapter.modules.len());
    }
    remove_stale_weights(out, &written)?;

    let mut files_out = written;
    files_out.push(write_config(&s.model_dir, out, a.dtype)?);
    for f in MODEL_FILES {
        files_out.extend(copy_file(&s.model_dir.join(f), &out.join(f))?);
    }
    let mut tokenizer_sources = vec![];
    for f in TOKENIZER_FILES {
        let from = [&s.tokenizer_dir, &s.model_dir].into_iter().map(|d| d.join(f)).find(|p| p.is_file());
        if let Some(from) = from {
            files_out.extend(copy_file(&from, &out.join(f))?);
            tokenizer_sources.push(absolute(&from));
        }
    }
    if !out.join("tokenizer.json").is_file() {
        eprintln!(
            "warning: no tokenizer.json in {} or {}; the merged checkpoint has no tokenizer",
            s.tokenizer_dir.display(),
            s.model_dir.display()
        );
    }
    if let Some(p) = &projector {
        let path = out.join("projector.safetensors");
        p.save(&path)?;
        files_out.push(path);
    }

    let info = json!({
        "base_model": s.model_name,
        "base_model_dir": absolute(&s.model_dir),
        "adapter_dir": absolute(&s.adapter_dir),
        "adapter_base_model_name_or_path": trained_on,
        "r": adapter.spec.r,
        "lora_alpha": adapter.spec.alpha,
        "use_rslora": use_rslora,
        "scale": scale,
        "target_modules": adapter.spec.targets,
        "modules_merged": merged,
        "merged_into": a.merge_into.name(),
        "dtype": a.dtype.flag(),
        "tensors": stored.len(),
        "projector": s.projector.as_ref().map(|(p, _)| absolute(p)),
        "tokenizer_files": tokenizer_sources,
        "formula": "W' = W + scale * lora_B @ lora_A, in f32, rounded once to dtype",
        "gemmaclip_version": env!("CARGO_PKG_VERSION"),
    });
    let readme = readme(&info, projector.is_some());
    let path = out.join("README.md");
    write_atomic(&path, readme.as_bytes())?;
    files_out.push(path);
    // written last: its presence says the directory is complete
    let path = out.join("merge_info.json");
    write_atomic(&path, (serde_json::to_string_pretty(&info)? + "\n").as_bytes())?;
    files_out.push(path);

    println!(
        "merged {merged} LoRA modules (r {}, alpha {}, scale {scale}) into {} tensors of {} ({}, {} base) -> {}",
        adapter.spec.r,
        adapter.spec.alpha,
        stored.len(),
        s.model_name,
        a.dtype.flag(),
        a.merge_into.name(),
        out.display()
    );
    Ok(MergeReport { tensors: stored.len(), modules_merged: merged, scale, files: files_out })
}

/// Streams one tensor from `reader` (positioned at its data) to `sink` in the output dtype.
fn copy_through(t: &Stored, reader: &mut std::fs::File, dtype: StDtype, sink: &mut dyn Write) -> Result<()> {
    let mut left = t.numel();
    let mut buf = vec![0u8; COPY_CHUNK.min(left.max(1)) * t.dtype.size()];
    while left > 0 {
        let n = COPY_CHUNK.min(left);
        let bytes = &mut buf[..n * t.dtype.size()];
        reader.read_exact(bytes).with_context(|| format!("cannot read `{}`", t.name))?;
        if t.dtype.same_as(dtype) {
            sink.write_all(bytes)?;
        } else {
            sink.write_all(&encode(&decode(bytes, t.dtype), dtype))?;
        }
        left -= n;
    }
    Ok(())
}

/// Reads and shape-checks a projector file (any layout `Projector::load` knows).
fn load_projector(path: &Path, text_dim: usize) -> Result<Projector> {
    let heads = read_header(path, 0)?;
    let first = heads
        .iter()
        .find(|t| t.name.ends_with("linear_1.weight") || t.name.ends_with("mm_projector.0.weight"))
        .with_context(|| format!("{}: no projector weights (linear_1.weight)", path.display()))?;
    let [out_dim, vision_dim] = first.shape[..] else {
        bail!("{}: `{}` is not a matrix", path.display(), first.name);
    };
    if out_dim != text_dim {
        bail!(
            "{}: `{}` {:?} projects to {out_dim}, but the model's hidden size is {text_dim} (a projector for another model?)",
            path.display(),
            first.name,
            first.shape
        );
    }
    Projector::load(&Weights::open_file(path, DType::F32, &Device::Cpu)?, vision_dim, text_dim)
}

/// config.json with its dtype fields set to the output dtype (byte for byte when they already say so).
fn write_config(model_dir: &Path, out: &Path, dtype: MergeDtype) -> Result<PathBuf> {
    let src = model_dir.join("config.json");
    let text = std::fs::read_to_string(&src).with_context(|| format!("cannot read {}", src.display()))?;
    let mut v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", src.display()))?;
    let mut changed = false;
    let mut set = |obj: &mut Value| {
        for k in ["torch_dtype", "dtype"] {
            if let Some(x) = obj.get_mut(k) {
                if x.as_str() != Some(dtype.torch_name()) {
                    *x = json!(dtype.torch_name());
                    changed = true;
                }
            }
        }
    };
    set(&mut v);
    for sub in ["text_config", "vision_config"] {
        if let Some(s) = v.get_mut(sub) {
            set(s);
        }
    }
    let path = out.join("config.json");
    if changed {
        write_atomic(&path, (serde_json::to_string_pretty(&v)? + "\n").as_bytes())?;
    } else {
        write_atomic(&path, text.as_bytes())?;
    }
    Ok(path)
}

fn absolute(p: &Path) -> String {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf()).display().to_string()
}

fn copy_file(from: &Path, to: &Path) -> Result<Option<PathBuf>> {
    if !from.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
    write_atomic(to, &bytes)?;
    Ok(Some(to.to_path_buf()))
}

/// Weight files of an earlier checkpoint in the output directory that this one did not write (an
/// old index would otherwise win over a new single file).
fn remove_stale_weights(out: &Path, written: &[PathBuf]) -> Result<()> {
    let ours: HashSet<&std::ffi::OsStr> = written.iter().filter_map(|p| p.file_name()).collect();
    for e in std::fs::read_dir(out).with_context(|| format!("cannot read {}", out.display()))? {
        let e = e?;
        let name = e.file_name();
        let n = name.to_string_lossy();
        let weights = (n.starts_with("model") && (n.ends_with(".safetensors") || n == "model.safetensors.index.json"))
            || n.starts_with("pytorch_model");
        if weights && !ours.contains(name.as_os_str()) && e.path().is_file() {
            std::fs::remove_file(e.path()).with_context(|| format!("cannot remove {}", e.path().display()))?;
        }
    }
    Ok(())
}

fn readme(info: &Value, has_projector: bool) -> String {
    let targets: Vec<&str> =
        info["target_modules"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let mut s = format!(
        "# Merged gemmaclip checkpoint\n\n\
         `{base}` with the LoRA adapter `{adapter}` merged in by `gemmaclip merge` {version}: every targeted \
         weight ({targets}) is W' = W + {scale} * lora_B @ lora_A (r {r}, lora_alpha {alpha}{rs}), computed in \
         f32 and written as {dtype}; {n} modules merged into the {into} base weights, every other tensor copied \
         through. `merge_info.json` has the details.\n\n\
         Load it with `Gemma3ForConditionalGeneration.from_pretrained(dir)` (transformers), or with \
         gemmaclip as a base model without an adapter (`--model dir`).\n",
        base = info["base_model"].as_str().unwrap_or("?"),
        adapter = info["adapter_dir"].as_str().unwrap_or("?"),
        version = info["gemmaclip_version"].as_str().unwrap_or("?"),
        targets = targets.join(", "),
        scale = info["scale"],
        r = info["r"],
        alpha = info["lora_alpha"],
        rs = if info["use_rslora"].as_bool() == Some(true) { ", use_rslora" } else { "" },
        dtype = info["dtype"].as_str().unwrap_or("?"),
        n = info["modules_merged"],
        into = info["merged_into"].as_str().unwrap_or("?"),
    );
    if has_projector {
        s.push_str(
            "\n`projector.safetensors` is the trained LLaVA projector (Linear, GELU, Linear; f32), which maps \
             CLIP ViT-L/14-336 features (layer -2, CLS dropped) into this model's embedding space; \
             gemmaclip reads it with `--projector-path`.\n",
        );
    }
    s.push('\n');
    s.push_str(EXACTNESS);
    s.push('\n');
    s
}
