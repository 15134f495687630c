use anyhow::Result;
use clap::{Parser, Subcommand};
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
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { preset, out, seed } => {
            checkpoint::init(preset, &out, seed)?;
            println!("wrote {} and {}", out.join("llm").display(), out.join("vision").display());
            Ok(())
        }
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
