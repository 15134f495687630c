//! PEFT's on-disk LoRA format (PEFT's save_pretrained / PeftModel.from_pretrained): `adapter_config.json` + `adapter_model.safetensors`
//! with keys `base_model.model.<module path>.lora_{A,B}.weight`, A [r, in], B [out, r].
//! We write the module paths `PeftModel.from_pretrained(Gemma3ForConditionalGeneration...)` expects
//! under transformers 5.x and read that form, the 4.50 form and the Gemma3ForCausalLM form.

use crate::model::gemma3::Gemma3Text;
use crate::peft::lora::{Lora, LoraSpec, DEFAULT_TARGETS};
use crate::safetensors_out::{save_tensors_atomic, write_atomic};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const CONFIG_NAME: &str = "adapter_config.json";
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";

/// Where the text model's layers sit inside the model PEFT wraps, per transformers layout:
/// 5.x / 4.52+ Gemma3ForConditionalGeneration (what we write), 4.50 Gemma3ForConditionalGeneration,
/// and the text-only Gemma3ForCausalLM.
pub const KEY_PREFIXES: [&str; 3] =
    ["base_model.model.model.language_model.", "base_model.model.language_model.model.", "base_model.model.model."];

/// `target_modules` as a regex over the language model only: bare names would also match the
/// SigLIP tower's q/k/v projections inside Gemma3ForConditionalGeneration.
pub fn target_regex(targets: &[String]) -> String {
    format!(r".*language_model.*\.({})", targets.join("|"))
}

/// Attaches fresh adapters (PEFT's init) to every targeted linear.
pub fn attach_new(model: &mut Gemma3Text, spec: &LoraSpec, seed: u64) -> Result<()> {
    for (path, lin) in model.linears_mut() {
        if !spec.targets.iter().any(|t| path.ends_with(&format!(".{t}"))) {
            continue;
        }
        let (o, i) = lin.base.shape();
        let dev = lin.base.device().clone();
        lin.lora = Some(Lora::init(&path, i, o, spec, seed, &dev)?);
    }
    Ok(())
}

/// The trainable LoRA tensors of a model as (PEFT key, Var), in a fixed order.
pub fn lora_vars(model: &mut Gemma3Text) -> Vec<(String, Var)> {
    let mut v = vec![];
    for (path, lin) in model.linears_mut() {
        if let Some(l) = &lin.lora {
            v.push((format!("{}{path}.lora_A.weight", KEY_PREFIXES[0]), l.a.clone()));
            v.push((format!("{}{path}.lora_B.weight", KEY_PREFIXES[0]), l.b.clone()));
        }
    }
    v
}

/// Gives every adapter working copies of A and B in `dtype` (None when `dtype` is f32: the
/// masters serve as they are); returned in `lora_vars`' order, for the optimizer to refresh.
pub fn working_copies(model: &mut Gemma3Text, dtype: DType) -> Result<Vec<Option<Var>>> {
    let mut out = vec![];
    for (_, lin) in model.linears_mut() {
        if let Some(l) = &mut lin.lora {
            if dtype == DType::F32 {
                l.work = None;
                out.extend([None, None]);
            } else {
                let wa = Var::from_tensor(&l.a.as_tensor().to_dtype(dtype)?)?;
                let wb = Var::from_tensor(&l.b.as_tensor().to_dtype(dtype)?)?;
                out.extend([Some(wa.clone()), Some(wb.clone())]);
                l.work = Some((wa, wb));
            }
        }
    }
    Ok(out)
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (f32), each atomically.
pub fn save(dir: &Path, model: &mut Gemma3Text, spec: &LoraSpec, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors: HashMap<String, Tensor> = lora_vars(model)
        .into_iter()
        .map(|(k, v)| Ok((k, v.as_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    if tensors.is_empty() {
        bail!("the model has no LoRA adapters to save");
    }
    let weights = dir.join(WEIGHTS_NAME);
    save_tensors_atomic(&tensors, &weights)?;
    // PEFT writes json.dumps(config, indent=2, sort_keys=True); serde_json's map is sorted too.
    let config = json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        // PEFT's lora_alpha is an int; keep it one when it is whole.
        "lora_alpha": if spec.alpha.fract() == 0.0 { json!(spec.alpha as i64) } else { json!(spec.alpha) },
        // the f32's shortest decimal (0.05, as the user wrote it), not its f64 widening 0.05000000074505806
        "lora_dropout": spec.dropout.to_string().parse::<f64>().map_or(json!(spec.dropout), |d| json!(d)),
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": spec.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": target_regex(&spec.targets),
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false
    });
    write_atomic(&dir.join(CONFIG_NAME), (serde_json::to_string_pretty(&config)? + "\n").as_bytes())
}

/// An adapter read from disk: its settings and (A, B) per module path (`layers.N.self_attn.q_proj`).
pub struct Adapter {
    pub spec: LoraSpec,
    pub modules: BTreeMap<String, (Tensor, Tensor)>,
}

fn read_config(path: &Path) -> Result<(LoraSpec, f64)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let what = path.display();
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    if let Some(t) = field("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            bail!("{what}: peft_type {t:?} is not LORA");
        }
    }
    for (k, allowed) in [("use_dora", false), ("fan_in_fan_out", false)] {
        if field(k).and_then(Value::as_bool).unwrap_or(false) != allowed {
            bail!("{what}: {k} = true is not supported");
        }
    }
    if field("bias").and_then(Value::as_str).is_some_and(|b| b != "none") {
        bail!("{what}: bias {:?} is not supported (only \"none\")", field("bias").unwrap());
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if field(k).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            bail!("{what}: a non-empty {k} is not supported");
        }
    }
    // PEFT's defaults when a key is absent; a key that is present must hold a number
    let number = |k: &str, default: f64| -> Result<f64> {
        match field(k) {
            None => Ok(default),
            Some(x) => x.as_f64().with_context(|| format!("{what}: {k} must be a number, got {x}")),
        }
    };
    let r = match field("r") {
        Some(x) => {
            x.as_u64().filter(|&r| r > 0).with_context(|| format!("{what}: r must be a positive integer, got {x}"))?
        }
        None => bail!("{what}: no \"r\" (the LoRA rank)"),
    } as usize;
    let alpha = number("lora_alpha", 8.0)?;
    if !(alpha.is_finite() && alpha > 0.0) {
        bail!("{what}: lora_alpha must be a positive number, got {alpha}");
    }
    let dropout = number("lora_dropout", 0.0)?;
    if !(0.0..1.0).contains(&dropout) {
        bail!("{what}: lora_dropout must be in [0, 1), got {dropout}");
    }
    let dropout = dropout as f32;
    let scale = if field("use_rslora").and_then(Value::as_bool).unwrap_or(false) {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    };
    Ok((LoraSpec { r, alpha, dropout, targets: vec![] }, scale))
}

impl Adapter {
    /// Reads a PEFT adapter directory into f32 tensors on `dev`.
    pub fn load(dir: &Path, dev: &Device) -> Result<(Self, f64)> {
        let (mut spec, scale) = read_config(&dir.join(CONFIG_NAME))?;
        let path = dir.join(WEIGHTS_NAME);
        if !path.is_file() {
            bail!("{}: no such file (only safetensors adapters are read)", path.display());
        }
        let tensors = candle_core::safetensors::load(&path, dev)
            .with_context(|| format!("{}: cannot read safetensors", path.display()))?;
        let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (key, t) in tensors {
            let Some(rest) = KEY_PREFIXES.iter().find_map(|p| key.strip_prefix(p)) else {
                bail!("{}: key `{key}` is not a LoRA weight of the Gemma language model", path.display());
            };
            let (module, is_a) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                (m, true)
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                (m, false)
            } else {
                bail!("{}: key `{key}` is not a lora_A/lora_B weight", path.display());
            };
            if !module.starts_with("layers.") {
                bail!("{}: key `{key}` is outside the decoder layers", path.display());
            }
            let e = halves.entry(module.to_string()).or_default();
            let t = t.to_dtype(DType::F32)?;
            if is_a {
                e.0 = Some(t)
            } else {
                e.1 = Some(t)
            }
        }
        let mut modules = BTreeMap::new();
        for (m, (a, b)) in halves {
            let (Some(a), Some(b)) = (a, b) else {
                bail!("{}: module `{m}` has only one of lora_A / lora_B", path.display());
            };
            let (ra, _) = a.dims2()?;
            let (_, rb) = b.dims2()?;
            if ra != spec.r || rb != spec.r {
                bail!(
                    "{}: module `{m}` has rank {ra}/{rb} but adapter_config.json says r = {}",
                    path.display(),
                    spec.r
                );
            }
            let name = m.rsplit('.').next().unwrap_or(&m).to_string();
            if !spec.targets.contains(&name) {
                spec.targets.push(name);
            }
            modules.insert(m, (a, b));
        }
        if modules.is_empty() {
            bail!("{}: no LoRA weights", path.display());
        }
        let rank = |t: &String| DEFAULT_TARGETS.iter().position(|d| d == t).unwrap_or(DEFAULT_TARGETS.len());
        spec.targets.sort_by_key(rank);
        Ok((Self { spec, modules }, scale))
    }

    /// Puts the adapter's weights (as trainable f32 Vars) on the matching linears of `model`.
    pub fn attach(&self, model: &mut Gemma3Text, scale: f64) -> Result<()> {
        let mut seen = 0;
        for (path, lin) in model.linears_mut() {
            let Some((a, b)) = self.modules.get(&path) else { continue };
            let (o, i) = lin.base.shape();
            if a.dims() != [self.spec.r, i] || b.dims() != [o, self.spec.r] {
                bail!(
                    "adapter module `{path}`: lora_A {:?} / lora_B {:?} do not fit a [{o}, {i}] linear of rank {}",
                    a.dims(),
                    b.dims(),
                    self.spec.r
                );
            }
            lin.lora = Some(Lora {
                a: Var::from_tensor(a)?,
                b: Var::from_tensor(b)?,
                scale,
                dropout: self.spec.dropout,
                stream: crate::rng::name_hash(&path),
                frozen: false,
                work: None,
            });
            seen += 1;
        }
        if seen != self.modules.len() {
            let known: Vec<String> = model.linears_mut().into_iter().map(|(p, _)| p).collect();
            let extra: Vec<&String> = self.modules.keys().filter(|m| !known.contains(m)).collect();
            bail!("adapter modules not in the model: {extra:?}");
        }
        Ok(())
    }
}
