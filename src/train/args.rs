//! The flags of `gemmaclip train`: one struct, parsed by clap, saved as `args.json` and in every
//! checkpoint, and validated in one place.

use crate::data::image::Aspect;
use crate::data::prompt::Target;
use crate::peft::lora::{LoraSpec, DEFAULT_TARGETS};
use crate::train::schedule::Schedule;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct TrainArgs {
    /// Where the adapter, projector, tokenizer, metrics and checkpoints go.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// The embedded tiny random model and the bundled ScienceQA sample (offline; ignores --model,
    /// --vision-model and --data).
    #[arg(long, value_parser = ["tiny"])]
    pub preset: Option<String>,
    /// Gemma-3 model: a directory in the hub layout or a hub id (cache, else download).
    #[arg(long, default_value = "google/gemma-3-4b-it")]
    pub model: String,
    /// CLIP vision tower: a directory or a hub id.
    #[arg(long, default_value = "openai/clip-vit-large-patch14-336")]
    pub vision_model: String,
    /// ScienceQA in the derek-thomas/ScienceQA parquet layout: a directory or a hub dataset id.
    #[arg(long, default_value = "derek-thomas/ScienceQA")]
    pub data: String,
    /// Passes over the training rows (fractions allowed); ignored when --max-steps is given.
    #[arg(long, default_value_t = 1.0)]
    pub num_train_epochs: f64,
    /// Optimizer steps to run (overrides --num-train-epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 1)]
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 8)]
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = 1e-4)]
    pub learning_rate: f64,
    /// AdamW weight decay on the LoRA and projector weights.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Learning-rate schedule after the warmup (decays to 0 for cosine and linear).
    #[arg(long, value_enum, default_value = "cosine")]
    pub lr_scheduler_type: Schedule,
    /// Fraction of the steps spent warming the learning rate up from 0.
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    /// Clip the global gradient norm to this value (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Accepted as the Trainer's `--bf16 True`: a GPU always computes in bf16 (with f32 LoRA masters
    /// and optimizer state); the CPU computes in f32 either way (candle's CPU matmul has no bf16).
    #[arg(long)]
    pub bf16: bool,
    /// Accepted for the original project's command lines. Fused attention is on whenever it can
    /// run, with or without this flag: on a GPU (bf16), cuDNN's fused attention forward and backward
    /// when libcudnn 9 loads (else one message and composed ops); GEMMACLIP_COMPOSED=attention turns
    /// it off. The CPU runs composed ops.
    #[arg(long)]
    pub use_flash_attention_2: bool,
    /// Recompute each layer in the backward pass instead of keeping its activations: on by default
    /// (a 1,144-token row of the 4B model peaks near 8 GiB instead of 31 GiB); turn it off with
    /// `--gradient-checkpointing false` for speed when memory allows.
    #[arg(long, default_value_t = true)]
    pub gradient_checkpointing: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraArgs,
    /// Linears that get adapters (comma-separated; of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")]
    pub lora_target_modules: Vec<String>,
    /// Keep the frozen base in bf16 instead of NF4.
    #[arg(long)]
    pub no_4bit: bool,
    /// Train on the first N usable rows only.
    #[arg(long)]
    pub max_train_samples: Option<usize>,
    /// Longer rows are cut (their tail loses its labels); a row left with no supervised token or
    /// with its image block cut is skipped at load.
    #[arg(long, visible_alias = "max-length", default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Model-turn target: chain-of-thought (mcot) or the final answer alone.
    #[arg(long, value_enum, default_value = "mcot")]
    pub target: Target,
    /// Pad images to a square with the CLIP mean colour (LLaVA-1.5) or resize and centre-crop.
    #[arg(long, value_enum, default_value = "pad")]
    pub image_aspect: Aspect,
    /// Seed of the LoRA init, the data order and the dropout masks.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Save a resumable checkpoint every N optimizer steps (0: only at the end or on Ctrl-C).
    #[arg(long, default_value_t = 500)]
    pub save_steps: usize,
    /// Keep at most N checkpoints (the newest; older ones are deleted as new ones are written).
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Write a metrics.jsonl record every N optimizer steps.
    #[arg(long, default_value_t = 10)]
    pub logging_steps: usize,
    /// Supervised rows per lm_head / log-softmax chunk.
    #[arg(long, default_value_t = 256)]
    pub loss_chunk: usize,
    /// Continue from the latest valid checkpoint in --output-dir, or from the checkpoint directory given.
    #[arg(long, visible_alias = "resume-from-checkpoint", num_args = 0..=1, value_name = "CHECKPOINT")]
    #[serde(skip)]
    pub resume: Option<Option<PathBuf>>,
    /// Start a fresh run in an --output-dir that holds an earlier run, deleting that run's files.
    #[arg(long)]
    #[serde(skip)]
    pub overwrite_output_dir: bool,
    /// What the run trains on, set by the run (not a flag): SHA-256 identities of the base model,
    /// the vision tower and the training split, so a resume compares those rather than paths,
    /// which may move.
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<serde_json::Value>,
    #[command(flatten)]
    #[serde(skip)]
    pub launch: crate::dist::env::LaunchArgs,
    /// Megabytes of f32 gradients per bucket that several ranks sum while the backward of the
    /// layers below goes on (the Trainer's `ddp_bucket_cap_mb`); 0: one sum after the backward.
    /// Off by default until the overlap is measured on the GPU machines. The sums are the same
    /// (bit for bit over TCP and with two NCCL ranks; with more, NCCL may add in another order
    /// for another length), so a resume may change it; every rank of a run must use one value.
    #[arg(long, default_value_t = 0.0)]
    #[serde(skip)]
    pub ddp_bucket_cap_mb: f64,
    /// Stop (with a checkpoint) after this many optimizer steps of this invocation.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub stop_after: Option<usize>,
}

/// The adapter's shape, shared by `train` and `bench train-step`.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct LoraArgs {
    /// LoRA rank.
    #[arg(long, default_value_t = 64)]
    pub lora_r: usize,
    /// LoRA alpha; the update is scaled by alpha / r.
    #[arg(long, default_value_t = 128.0)]
    pub lora_alpha: f64,
    /// Dropout on the LoRA input, in [0, 1).
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f32,
}

impl LoraArgs {
    pub fn spec(&self, targets: &[String]) -> LoraSpec {
        LoraSpec { r: self.lora_r, alpha: self.lora_alpha, dropout: self.lora_dropout, targets: targets.to_vec() }
    }

    pub fn validate(&self) -> Result<()> {
        if self.lora_r == 0 {
            bail!("--lora-r must be at least 1");
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            bail!("--lora-alpha must be a positive number, got {}", self.lora_alpha);
        }
        if !(self.lora_dropout.is_finite() && (0.0..1.0).contains(&self.lora_dropout)) {
            bail!("--lora-dropout must be in [0, 1), got {}", self.lora_dropout);
        }
        Ok(())
    }
}

/// Settings a resumed run may change: they alter neither the model nor the schedule nor the data
/// (gradient checkpointing trades memory for time and computes the same gradients; `--model`,
/// `--vision-model` and `--data` are where things are, and `sources` says what they are).
pub const RESUMABLE_CHANGES: [&str; 10] = [
    "output_dir",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "loss_chunk",
    "use_flash_attention_2",
    "gradient_checkpointing",
    "model",
    "vision_model",
    "data",
];

/// Settings a resume judges by the number of steps they come to (the trainer state's
/// `total_steps`), so that the message can say why a run cannot be lengthened.
pub const RUN_LENGTH: [&str; 2] = ["num_train_epochs", "max_steps"];

impl TrainArgs {
    /// Parses train flags as the command line does (the defaults, snake_case spellings and
    /// optional boolean values are the CLI's), e.g. for tests.
    pub fn from_flags<I: IntoIterator<Item = S>, S: Into<std::ffi::OsString> + Clone>(flags: I) -> Result<Self> {
        use clap::{Args, FromArgMatches};
        let cmd = crate::cli::hf::hf_conventions(Self::augment_args(
            clap::Command::new("train").no_binary_name(true).allow_negative_numbers(true),
        ));
        let matches = cmd.try_get_matches_from(flags)?;
        Ok(Self::from_arg_matches(&matches)?)
    }

    pub fn preset_tiny(&self) -> bool {
        self.preset.is_some()
    }

    pub fn four_bit(&self) -> bool {
        !self.no_4bit
    }

    /// Every check of the flags, each failure one line naming the flag.
    pub fn validate(&self) -> Result<()> {
        for (flag, v) in [
            ("--per-device-train-batch-size", self.per_device_train_batch_size),
            ("--gradient-accumulation-steps", self.gradient_accumulation_steps),
            ("--logging-steps", self.logging_steps),
            ("--max-seq-len", self.max_seq_len),
            ("--loss-chunk", self.loss_chunk),
        ] {
            if v == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        for (flag, v) in [
            ("--max-steps", self.max_steps),
            ("--max-train-samples", self.max_train_samples),
            ("--save-total-limit", self.save_total_limit),
        ] {
            if v == Some(0) {
                bail!("{flag} must be at least 1");
            }
        }
        let positive = |flag: &str, v: f64| -> Result<()> {
            if !(v.is_finite() && v > 0.0) {
                bail!("{flag} must be a positive number, got {v}");
            }
            Ok(())
        };
        let non_negative = |flag: &str, v: f64| -> Result<()> {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{flag} must be a number of at least 0, got {v}");
            }
            Ok(())
        };
        positive("--learning-rate", self.learning_rate)?;
        non_negative("--weight-decay", self.weight_decay)?;
        non_negative("--max-grad-norm", self.max_grad_norm)?;
        if self.max_steps.is_none() {
            positive("--num-train-epochs", self.num_train_epochs)?;
        }
        if !(self.warmup_ratio.is_finite() && (0.0..=1.0).contains(&self.warmup_ratio)) {
            bail!("--warmup-ratio must be in [0, 1], got {}", self.warmup_ratio);
        }
        self.lora.validate()?;
        let unknown: Vec<&str> =
            self.lora_target_modules.iter().map(|s| s.trim()).filter(|s| !DEFAULT_TARGETS.contains(s)).collect();
        if !unknown.is_empty() {
            bail!("--lora-target-modules: unknown module(s) {unknown:?}; Gemma-3's linears are {DEFAULT_TARGETS:?}");
        }
        if self.lora_target_modules.is_empty() {
            bail!("--lora-target-modules names no module");
        }
        Ok(())
    }

    /// The settings of `self` that differ from `saved` and may not change on resume, as
    /// "name: saved -> now" lines.
    pub fn resume_conflicts(&self, saved: &TrainArgs) -> Result<Vec<String>> {
        let (now, was) = (serde_json::to_value(self)?, serde_json::to_value(saved)?);
        let (Some(now), Some(was)) = (now.as_object(), was.as_object()) else { return Ok(vec![]) };
        let mut out = vec![];
        for (k, v) in now {
            // the per-device batch may change with the number of ranks: the trainer state judges
            // the global micro-batch (check_resume_settings)
            if RESUMABLE_CHANGES.contains(&k.as_str())
                || RUN_LENGTH.contains(&k.as_str())
                || k == "per_device_train_batch_size"
            {
                continue;
            }
            let old = was.get(k).unwrap_or(&serde_json::Value::Null);
            // checkpoints of older versions recorded no sources: nothing to compare
            if k == "sources" && old.is_null() {
                continue;
            }
            if old != v {
                out.push(format!("--{} {old} -> {v}", k.replace('_', "-")));
            }
        }
        Ok(out)
    }
}
