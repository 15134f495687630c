use anyhow::Result;
use clap::{Parser, Subcommand};
use gemmaclip::bench;
use gemmaclip::init::{self, Preset};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "gemmaclip",
    version,
    about = "QLoRA fine-tuning and inference of a CLIP + Gemma-3 vision-language model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write random-weight model directories (OUT/llm, OUT/vision) in the hub's exact layout.
    Init {
        /// Which shapes to write.
        #[arg(long, value_enum)]
        preset: Preset,
        /// Output directory; gets llm/ and vision/.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the random weights; the same seed writes the same bytes.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Fine-tune the projector and LoRA adapters on ScienceQA (multimodal chain-of-thought).
    Train(Box<TrainCli>),
    /// Answer one image + question + choices prompt with a trained adapter and projector.
    Infer(Box<InferCli>),
    /// ScienceQA accuracy with the official breakdown (NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg).
    Eval(Box<EvalCli>),
    /// Measure speed and memory on synthetic inputs of real shapes (compare with
    /// ../shared/bench/hf_reference.py on the same GPU).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(clap::Args)]
struct TrainCli {
    /// Where the adapter, projector, tokenizer, metrics and checkpoints go.
    #[arg(long)]
    output_dir: PathBuf,
    /// The embedded tiny random model and the bundled ScienceQA sample (offline; ignores --model,
    /// --vision-model and --data).
    #[arg(long, value_parser = ["tiny"])]
    preset: Option<String>,
    /// Gemma-3 model: a directory in the hub layout or a hub id in the Hugging Face cache.
    #[arg(long, default_value = "google/gemma-3-4b-it")]
    model: String,
    /// CLIP vision tower: a directory or a hub id in the cache.
    #[arg(long, default_value = "openai/clip-vit-large-patch14-336")]
    vision_model: String,
    /// ScienceQA in the derek-thomas/ScienceQA parquet layout: a directory or a hub dataset id in the cache.
    #[arg(long, default_value = "derek-thomas/ScienceQA")]
    data: String,
    #[arg(long, default_value_t = 1.0)]
    num_train_epochs: f64,
    /// Optimizer steps to run (overrides --num-train-epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value_t = 1)]
    per_device_train_batch_size: usize,
    #[arg(long, default_value_t = 8)]
    gradient_accumulation_steps: usize,
    #[arg(long, default_value_t = 1e-4)]
    learning_rate: f64,
    /// AdamW weight decay on the LoRA and projector weights.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, value_enum, default_value = "cosine")]
    lr_scheduler_type: gemmaclip::train::schedule::Schedule,
    #[arg(long, default_value_t = 0.03)]
    warmup_ratio: f64,
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Compute in bf16 (the default on a GPU; the CPU computes in f32 unless this is given).
    #[arg(long)]
    bf16: bool,
    /// Accepted for the original project's command lines; this build attends with its own kernels.
    #[arg(long)]
    use_flash_attention_2: bool,
    #[arg(long)]
    gradient_checkpointing: bool,
    #[arg(long, default_value_t = 64)]
    lora_r: usize,
    #[arg(long, default_value_t = 128.0)]
    lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f32,
    /// Linears that get adapters (comma-separated module names).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")]
    lora_target_modules: Vec<String>,
    /// Keep the frozen base in bf16 instead of NF4.
    #[arg(long)]
    no_4bit: bool,
    #[arg(long)]
    max_train_samples: Option<usize>,
    /// Longer rows are cut (their tail loses its labels).
    #[arg(long, default_value_t = 2048)]
    max_seq_len: usize,
    /// Model-turn target: chain-of-thought (mcot) or the final answer alone.
    #[arg(long, value_enum, default_value = "mcot")]
    target: gemmaclip::data::prompt::Target,
    /// Pad images to a square with the CLIP mean colour (LLaVA-1.5) or resize and centre-crop.
    #[arg(long, value_enum, default_value = "pad")]
    image_aspect: gemmaclip::data::image::Aspect,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Save a resumable checkpoint every N optimizer steps (0: only at the end or on Ctrl-C).
    #[arg(long, default_value_t = 500)]
    save_steps: usize,
    #[arg(long, default_value_t = 10)]
    logging_steps: usize,
    /// Supervised rows per lm_head / log-softmax chunk.
    #[arg(long, default_value_t = 256)]
    loss_chunk: usize,
    /// Continue from the latest checkpoint in --output-dir, or from the checkpoint directory given.
    #[arg(long, num_args = 0..=1, value_name = "CHECKPOINT")]
    resume: Option<Option<PathBuf>>,
    /// Stop (with a checkpoint) after this many optimizer steps of this invocation.
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
}

/// The model flags `infer` and `eval` share.
#[derive(clap::Args)]
struct AnswerModelCli {
    /// The embedded tiny random model (what `train --preset tiny` trained); ignores --model and --vision-model.
    #[arg(long, value_parser = ["tiny"])]
    preset: Option<String>,
    #[arg(long, default_value = "google/gemma-3-4b-it")]
    model: String,
    #[arg(long, default_value = "openai/clip-vit-large-patch14-336")]
    vision_model: String,
    /// A LoRA adapter directory (ours or one PEFT wrote); without it, the base model answers.
    #[arg(long)]
    adapter_dir: Option<PathBuf>,
    /// The trained projector (`projector.safetensors` of a train run); needed for image questions.
    #[arg(long)]
    projector_path: Option<PathBuf>,
    /// Tokenizer directory (a train run's `tokenizer/`); defaults to the model's.
    #[arg(long)]
    tokenizer_dir: Option<PathBuf>,
    /// Keep the base in bf16 instead of NF4.
    #[arg(long)]
    no_4bit: bool,
    #[arg(long, value_enum, default_value = "pad")]
    image_aspect: gemmaclip::data::image::Aspect,
}

impl AnswerModelCli {
    fn load(&self) -> Result<gemmaclip::infer::Answerer> {
        let model = gemmaclip::infer::ModelArgs {
            preset_tiny: self.preset.is_some(),
            model: self.model.clone(),
            vision_model: self.vision_model.clone(),
            four_bit: !self.no_4bit,
        };
        gemmaclip::infer::load_answerer(&gemmaclip::infer::AnswererArgs {
            model: &model,
            adapter_dir: self.adapter_dir.as_deref(),
            projector_path: self.projector_path.as_deref(),
            tokenizer_dir: self.tokenizer_dir.as_deref(),
            image_aspect: self.image_aspect,
        })
    }
}

#[derive(clap::Args)]
struct InferCli {
    #[command(flatten)]
    model: AnswerModelCli,
    /// The image (PNG/JPEG); leave out for a text-only question.
    #[arg(long)]
    image_path: Option<PathBuf>,
    #[arg(long)]
    question: String,
    /// The question's context (ScienceQA's hint); "N/A" when empty.
    #[arg(long, default_value = "")]
    context: String,
    /// "A) Photosynthesis; B) The Water Cycle; C) The Carbon Cycle", or plain "x; y; z".
    #[arg(long)]
    choices: String,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// 0 = no limit.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object (reasoning, answer, text, token counts, timings) instead of streaming.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct EvalCli {
    #[command(flatten)]
    model: AnswerModelCli,
    /// ScienceQA in the derek-thomas/ScienceQA parquet layout: a directory or a hub dataset id in the
    /// cache (with --preset tiny: the bundled sample).
    #[arg(long, default_value = "derek-thomas/ScienceQA")]
    data: String,
    #[arg(long, value_parser = ["test", "validation"], default_value = "test")]
    split: String,
    /// Only the first N questions.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// predictions.jsonl (resumed if present), results.json and breakdown.txt go here.
    #[arg(long)]
    output_dir: PathBuf,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time to first token and decode speed at batch 1 (greedy, no early stop); one JSON line.
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        vision_model: PathBuf,
        #[arg(long)]
        no_4bit: bool,
        /// Prompt length in tokens, image block included.
        #[arg(long, default_value_t = 800)]
        prompt: usize,
        #[arg(long, default_value_t = 256)]
        new: usize,
        /// Attach fresh LoRA adapters of this rank (0: the base model alone).
        #[arg(long, default_value_t = 0)]
        lora_r: usize,
    },
    /// One QLoRA step (forward, backward, clipping, AdamW) on one sample; one JSON line per setting.
    TrainStep {
        /// Gemma-3 checkpoint directory (hub layout), e.g. OUT/llm from `init`.
        #[arg(long)]
        model: PathBuf,
        /// CLIP checkpoint directory, e.g. OUT/vision from `init`.
        #[arg(long)]
        vision_model: PathBuf,
        /// Keep the base in bf16 instead of NF4.
        #[arg(long)]
        no_4bit: bool,
        /// Gradient checkpointing: on, off, or both (two JSON lines).
        #[arg(long, value_parser = ["on", "off", "both"], default_value = "both")]
        checkpointing: String,
        #[arg(long, default_value_t = 1024)]
        seq: usize,
        #[arg(long, default_value_t = 256)]
        label_tokens: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 64)]
        lora_r: usize,
        #[arg(long, default_value_t = 128.0)]
        lora_alpha: f64,
        #[arg(long, default_value_t = 0.05)]
        lora_dropout: f32,
        /// Supervised rows per lm_head / log-softmax chunk.
        #[arg(long, default_value_t = 256)]
        loss_chunk: usize,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { preset, out, seed } => {
            init::init(preset, &out, seed)?;
            println!("wrote {} and {}", out.join("llm").display(), out.join("vision").display());
            Ok(())
        }
        Command::Train(t) => train(*t),
        Command::Infer(i) => {
            if i.max_new_tokens == 0 {
                anyhow::bail!("--max-new-tokens must be at least 1");
            }
            if !(i.top_p > 0.0 && i.top_p <= 1.0) || i.temperature < 0.0 {
                anyhow::bail!("--top-p must be in (0, 1] and --temperature at least 0");
            }
            let m = i.model.load()?;
            let options = gemmaclip::generate::GenerateOptions {
                max_new_tokens: i.max_new_tokens,
                temperature: i.temperature,
                top_p: i.top_p,
                top_k: i.top_k,
                seed: i.seed,
                stop_ids: m.stop_ids(),
            };
            gemmaclip::infer::infer(
                &m,
                &gemmaclip::infer::InferArgs {
                    image_path: i.image_path,
                    question: i.question,
                    context: i.context,
                    choices: i.choices,
                    options,
                    json: i.json,
                },
            )
        }
        Command::Eval(e) => {
            if e.batch_size == 0 || e.max_new_tokens == 0 {
                anyhow::bail!("--batch-size and --max-new-tokens must be at least 1");
            }
            let data_dir = if e.model.preset.is_some() {
                gemmaclip::hub::sample_dataset()?
            } else {
                gemmaclip::hub::resolve_dataset(&e.data, "--data")?
            };
            let m = e.model.load()?;
            gemmaclip::infer::eval(
                &m,
                &data_dir,
                &gemmaclip::infer::EvalArgs {
                    split: e.split,
                    limit: e.limit,
                    batch_size: e.batch_size,
                    max_new_tokens: e.max_new_tokens,
                    output_dir: e.output_dir,
                },
            )?;
            Ok(())
        }
        Command::Bench { what } => match what {
            BenchCommand::Generate { model, vision_model, no_4bit, prompt, new, lora_r } => {
                if new < 2 {
                    anyhow::bail!("--new must be at least 2");
                }
                bench::generate(&bench::GenerateArgs { model, vision_model, four_bit: !no_4bit, prompt, new, lora_r })
            }
            BenchCommand::TrainStep {
                model,
                vision_model,
                no_4bit,
                checkpointing,
                seq,
                label_tokens,
                steps,
                warmup,
                lora_r,
                lora_alpha,
                lora_dropout,
                loss_chunk,
            } => {
                if steps == 0 {
                    anyhow::bail!("--steps must be at least 1");
                }
                let checkpointing = match checkpointing.as_str() {
                    "on" => vec![true],
                    "off" => vec![false],
                    _ => vec![false, true],
                };
                bench::train_step(&bench::TrainStepArgs {
                    model,
                    vision_model,
                    four_bit: !no_4bit,
                    checkpointing,
                    seq,
                    label_tokens,
                    steps,
                    warmup,
                    lora_r,
                    lora_alpha,
                    lora_dropout,
                    loss_chunk,
                })
            }
        },
    }
}

fn train(t: TrainCli) -> Result<()> {
    for (flag, v) in [
        ("--per-device-train-batch-size", t.per_device_train_batch_size),
        ("--gradient-accumulation-steps", t.gradient_accumulation_steps),
        ("--lora-r", t.lora_r),
        ("--logging-steps", t.logging_steps),
        ("--max-seq-len", t.max_seq_len),
        ("--loss-chunk", t.loss_chunk),
    ] {
        if v == 0 {
            anyhow::bail!("{flag} must be at least 1");
        }
    }
    if !(0.0..1.0).contains(&t.lora_dropout) {
        anyhow::bail!("--lora-dropout must be in [0, 1), got {}", t.lora_dropout);
    }
    if t.max_steps.is_none() && t.num_train_epochs <= 0.0 {
        anyhow::bail!("--num-train-epochs must be positive");
    }
    if t.use_flash_attention_2 {
        eprintln!("note: --use-flash-attention-2: this build attends with its own kernels (no flash-attn compiled in)");
    }
    let args = gemmaclip::train::run::TrainArgs {
        output_dir: t.output_dir,
        model: t.model,
        vision_model: t.vision_model,
        data: t.data,
        preset_tiny: t.preset.is_some(),
        num_train_epochs: t.num_train_epochs,
        max_steps: t.max_steps,
        per_device_train_batch_size: t.per_device_train_batch_size,
        gradient_accumulation_steps: t.gradient_accumulation_steps,
        learning_rate: t.learning_rate,
        weight_decay: t.weight_decay,
        lr_scheduler_type: t.lr_scheduler_type,
        warmup_ratio: t.warmup_ratio,
        max_grad_norm: t.max_grad_norm,
        lora_r: t.lora_r,
        lora_alpha: t.lora_alpha,
        lora_dropout: t.lora_dropout,
        lora_target_modules: t.lora_target_modules,
        four_bit: !t.no_4bit,
        bf16: t.bf16,
        gradient_checkpointing: t.gradient_checkpointing,
        max_train_samples: t.max_train_samples,
        max_seq_len: t.max_seq_len,
        target: t.target,
        image_aspect: t.image_aspect,
        seed: t.seed,
        save_steps: t.save_steps,
        logging_steps: t.logging_steps,
        loss_chunk: t.loss_chunk,
        stop_after: t.stop_after,
    };
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130); // a second Ctrl-C does not wait for the checkpoint
        }
        eprintln!("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit now)");
    })?;
    let (done, total) = gemmaclip::train::run::train(&args, t.resume, interrupted.clone())?;
    if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
        eprintln!("stopped at step {done}; continue with --resume");
        std::process::exit(130);
    }
    if done == total {
        println!("wrote {}", args.output_dir.display());
    } else {
        println!("stopped at step {done} with a checkpoint in {}; continue with --resume", args.output_dir.display());
    }
    Ok(())
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        // One line: the outermost context first, then its causes.
        let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", msg.join(": "));
        std::process::exit(1);
    }
}
