use anyhow::Result;
use clap::{Parser, Subcommand};
use gemmaclip::bench;
use gemmaclip::checkpoint::{self, Preset};
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
    /// Measure speed and memory on synthetic inputs of real shapes (compare with
    /// ../shared/bench/hf_reference.py on the same GPU).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
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
            checkpoint::init(preset, &out, seed)?;
            println!("wrote {} and {}", out.join("llm").display(), out.join("vision").display());
            Ok(())
        }
        Command::Bench { what } => match what {
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

fn main() {
    if let Err(e) = run(Cli::parse()) {
        // One line: the outermost context first, then its causes.
        let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", msg.join(": "));
        std::process::exit(1);
    }
}
