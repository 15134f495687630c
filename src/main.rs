use anyhow::Result;
use clap::{Parser, Subcommand};
use gemmaclip::bench;
use gemmaclip::init::{self, Preset};
use gemmaclip::train::args::TrainArgs;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "gemmaclip",
    version,
    about = "QLoRA fine-tuning and inference of a CLIP + Gemma-3 vision-language model",
    // a flag given twice keeps its last value, as Python's argparse (HfArgumentParser) does
    args_override_self = true
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
    #[command(allow_negative_numbers = true, args_override_self = true)]
    Train(Box<TrainArgs>),
    /// Answer one image + question + choices prompt with a trained adapter and projector.
    #[command(allow_negative_numbers = true, args_override_self = true)]
    Infer(Box<InferCli>),
    /// ScienceQA accuracy with the official breakdown (NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg).
    #[command(allow_negative_numbers = true, args_override_self = true)]
    Eval(Box<EvalCli>),
    /// Merge a LoRA adapter into the base Gemma-3's original dense weights (PEFT's
    /// merge_and_unload) and write a bf16/f32 checkpoint in the hub layout, projector beside it.
    Merge(Box<gemmaclip::merge::MergeArgs>),
    /// Measure speed and memory on synthetic inputs of real shapes (compare with
    /// ../shared/bench/hf_reference.py on the same GPU).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
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
    fn load(&self) -> Result<gemmaclip::load::Answerer> {
        let model = gemmaclip::load::ModelArgs {
            preset_tiny: self.preset.is_some(),
            model: self.model.clone(),
            vision_model: self.vision_model.clone(),
            four_bit: !self.no_4bit,
        };
        gemmaclip::load::load_answerer(&gemmaclip::load::AnswererArgs {
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
    Generate(bench::GenerateArgs),
    /// One QLoRA step (forward, backward, clipping, AdamW) on one sample; one JSON line per setting.
    TrainStep(bench::TrainStepArgs),
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
            gemmaclip::eval::eval(
                &m,
                &data_dir,
                &gemmaclip::eval::EvalArgs {
                    split: e.split,
                    limit: e.limit,
                    batch_size: e.batch_size,
                    max_new_tokens: e.max_new_tokens,
                    output_dir: e.output_dir,
                },
            )?;
            Ok(())
        }
        Command::Merge(m) => gemmaclip::merge::run(&m).map(|_| ()),
        Command::Bench { what } => match what {
            BenchCommand::Generate(a) => bench::generate(&a),
            BenchCommand::TrainStep(a) => bench::train_step(&a),
        },
    }
}

fn train(args: TrainArgs) -> Result<()> {
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130); // a second Ctrl-C does not wait for the checkpoint
        }
        eprintln!("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit now)");
    })?;
    let (done, total) = gemmaclip::train::run::train(&args, interrupted.clone())?;
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
