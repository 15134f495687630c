//! The command line: every subcommand's flags, and what `infer`, `eval`, `init`, `bench` and
//! `completions` do with them. `main.rs` parses, dispatches `train` (with its Ctrl-C handling) and
//! turns errors into exit codes; the tests reach the same parser through `command()`.

pub mod hf;

use crate::bench;
use crate::data::image::Aspect;
use crate::init::{self, Preset};
use crate::load::{AnswererArgs, ModelArgs, Named, RunDir};
use crate::train::args::TrainArgs;
use anyhow::{bail, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;

pub const DEFAULT_MODEL: &str = "google/gemma-3-4b-it";
pub const DEFAULT_VISION_MODEL: &str = "openai/clip-vit-large-patch14-336";
pub const DEFAULT_DATA: &str = "derek-thomas/ScienceQA";

#[derive(Parser)]
#[command(
    name = "gemmaclip",
    version,
    about = "QLoRA fine-tuning and inference of a CLIP + Gemma-3 vision-language model",
    after_help = "As with transformers' HfArgumentParser, every flag also takes its snake_case spelling \
                  (--output_dir, --per_device_train_batch_size), and boolean flags take an optional value \
                  (--bf16, --bf16 True, --gradient_checkpointing false)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Write random-weight model directories (DIR/llm, DIR/vision) in the hub's exact layout.
    Init {
        /// Which shapes to write.
        #[arg(long, value_enum)]
        preset: Preset,
        /// Output directory; gets llm/ and vision/.
        #[arg(long, visible_alias = "out", value_name = "DIR")]
        output_dir: PathBuf,
        /// Seed of the random weights; the same seed writes the same bytes.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Fine-tune the projector and LoRA adapters on ScienceQA (multimodal chain-of-thought).
    #[command(allow_negative_numbers = true)]
    Train(Box<TrainArgs>),
    /// Answer one image + question + choices prompt with a trained adapter and projector.
    #[command(allow_negative_numbers = true)]
    Infer(Box<InferCli>),
    /// ScienceQA accuracy with the official breakdown (NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg).
    #[command(allow_negative_numbers = true)]
    Eval(Box<EvalCli>),
    /// Merge a LoRA adapter into the base Gemma-3's original dense weights (PEFT's
    /// merge_and_unload) and write a bf16/f32 checkpoint in the hub layout, projector beside it.
    Merge(Box<crate::merge::MergeArgs>),
    /// Measure speed and memory on synthetic inputs of real shapes (compare with
    /// tools/bench/hf_stack.py on the same GPU).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Print a shell completion script, e.g. `gemmaclip completions bash > ~/.local/share/bash-completion/completions/gemmaclip`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The model flags `infer` and `eval` share.
#[derive(clap::Args)]
pub struct AnswerModelCli {
    /// A train output directory (its lora_adapter/, projector.safetensors and tokenizer/) or one of
    /// its checkpoints (DIR/checkpoints/step-N); the run's --preset, --model, --vision-model and
    /// --image-aspect become the defaults. --adapter-dir, --projector-path and --tokenizer-dir,
    /// when given too, take precedence over the run's files.
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// The embedded tiny random model (what `train --preset tiny` trained); ignores --model and --vision-model.
    #[arg(long, value_parser = ["tiny"])]
    pub preset: Option<String>,
    /// Gemma-3 model: a directory in the hub layout or a hub id [default: the --run-dir's, else
    /// google/gemma-3-4b-it].
    #[arg(long)]
    pub model: Option<String>,
    /// CLIP vision tower: a directory or a hub id [default: the --run-dir's, else
    /// openai/clip-vit-large-patch14-336].
    #[arg(long)]
    pub vision_model: Option<String>,
    /// A LoRA adapter directory (ours or one PEFT wrote); without it (and --run-dir), the base model answers.
    #[arg(long, value_name = "DIR")]
    pub adapter_dir: Option<PathBuf>,
    /// The trained projector (`projector.safetensors` of a train run); needed for image questions.
    #[arg(long, value_name = "FILE")]
    pub projector_path: Option<PathBuf>,
    /// Tokenizer directory (a train run's `tokenizer/`); defaults to the run's, else the model's.
    #[arg(long, value_name = "DIR")]
    pub tokenizer_dir: Option<PathBuf>,
    /// Keep the base in bf16 instead of NF4 (also taken from --run-dir when that run trained so).
    #[arg(long)]
    pub no_4bit: bool,
    /// Pad images to a square (LLaVA-1.5) or resize and centre-crop [default: the --run-dir's, else pad].
    #[arg(long, value_enum)]
    pub image_aspect: Option<Aspect>,
}

/// The model to load, with the files of `--run-dir` filled in where no flag named them.
pub struct ResolvedModel {
    pub answerer: AnswererArgs,
    /// The run's `--data`, for `eval`'s default.
    pub run_data: Option<String>,
}

impl AnswerModelCli {
    /// Explicit flags first, then the run directory's files and arguments, then the defaults.
    pub fn resolve(&self) -> Result<ResolvedModel> {
        let run = self.run_dir.as_deref().map(|d| RunDir::open(d, "--run-dir")).transpose()?;
        let run_arg = |key: &str| run.as_ref().and_then(|r| r.arg(key));
        let explicit = |p: &Option<PathBuf>, flag: &'static str| p.clone().map(|path| Named { path, flag });
        let from_run = |p: Option<PathBuf>| p.map(|path| Named { path, flag: "--run-dir" });
        // The run's preset counts only when no base model was named here.
        let preset_tiny = self.preset.is_some()
            || (self.model.is_none() && self.vision_model.is_none() && run_arg("preset").as_deref() == Some("tiny"));
        let image_aspect = match (self.image_aspect, run_arg("image_aspect")) {
            (Some(a), _) => a,
            (None, Some(s)) => <Aspect as clap::ValueEnum>::from_str(&s, true).unwrap_or(Aspect::Pad),
            (None, None) => Aspect::Pad,
        };
        let answerer = AnswererArgs {
            model: ModelArgs {
                preset_tiny,
                model: self.model.clone().or_else(|| run_arg("model")).unwrap_or_else(|| DEFAULT_MODEL.into()),
                vision_model: self
                    .vision_model
                    .clone()
                    .or_else(|| run_arg("vision_model"))
                    .unwrap_or_else(|| DEFAULT_VISION_MODEL.into()),
                // an adapter trained on the bf16 base answers on it too
                four_bit: !(self.no_4bit || run.as_ref().is_some_and(|r| r.flag("no_4bit"))),
            },
            adapter_dir: explicit(&self.adapter_dir, "--adapter-dir")
                .or_else(|| from_run(run.as_ref().map(|r| r.adapter_dir.clone()))),
            projector_path: explicit(&self.projector_path, "--projector-path")
                .or_else(|| from_run(run.as_ref().and_then(|r| r.projector_path.clone()))),
            tokenizer_dir: explicit(&self.tokenizer_dir, "--tokenizer-dir")
                .or_else(|| from_run(run.as_ref().and_then(|r| r.tokenizer_dir.clone()))),
            image_aspect,
        };
        Ok(ResolvedModel { answerer, run_data: run_arg("data") })
    }
}

#[derive(clap::Args)]
pub struct InferCli {
    #[command(flatten)]
    pub model: AnswerModelCli,
    /// The image (PNG/JPEG); leave out for a text-only question.
    #[arg(long)]
    pub image_path: Option<PathBuf>,
    /// The question to answer.
    #[arg(long)]
    pub question: String,
    /// The question's context (ScienceQA's hint); "N/A" when empty.
    #[arg(long, default_value = "")]
    pub context: String,
    /// "A) Photosynthesis; B) The Water Cycle; C) The Carbon Cycle", or plain "x; y; z".
    #[arg(long)]
    pub choices: String,
    /// Most tokens to generate (the model turn stops earlier at <end_of_turn>).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingCli,
    /// Print one JSON object (reasoning, answer, text, token counts, timings) instead of streaming.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct EvalCli {
    #[command(flatten)]
    pub model: AnswerModelCli,
    /// ScienceQA in the derek-thomas/ScienceQA parquet layout: a directory or a hub dataset id in the
    /// cache (with --preset tiny: the bundled sample) [default: the --run-dir's, else derek-thomas/ScienceQA].
    #[arg(long)]
    pub data: Option<String>,
    /// Which ScienceQA split to score.
    #[arg(long, value_parser = ["test", "validation"], default_value = "test")]
    pub split: String,
    /// Only the first N questions.
    #[arg(long, alias = "max-eval-samples")]
    pub limit: Option<usize>,
    /// Questions answered together (padded batch generation). Default: as many as the GPU's free
    /// memory holds, up to 32 (1 on the CPU).
    #[arg(long, alias = "per-device-eval-batch-size")]
    pub batch_size: Option<usize>,
    /// Most tokens to generate per answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// predictions.jsonl (resumed when it holds answers of the same model, settings and split),
    /// eval.json, results.json, breakdown.txt and accuracy.png go here.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Delete the answers already in --output-dir and start over.
    #[arg(long)]
    pub overwrite_output_dir: bool,
    #[command(flatten)]
    pub sampling: SamplingCli,
    /// `--nproc-per-node N`: N workers (one GPU each) answer the questions between them.
    #[command(flatten)]
    pub launch: crate::dist::env::LaunchArgs,
}

/// How `infer` and `eval` pick each token.
#[derive(clap::Args)]
pub struct SamplingCli {
    /// Sampling temperature; 0 = greedy (the default, as the official evaluations run).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: sample from the smallest set of tokens whose probability reaches this, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sample from the K most likely tokens only; 0 = no limit.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampling (the same seed gives the same answer).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingCli {
    fn check(&self) -> Result<()> {
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("--temperature must be a number of at least 0, got {}", self.temperature);
        }
        Ok(())
    }
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time to first token and decode speed at batch 1 (greedy, no early stop); one JSON line.
    Generate(bench::GenerateArgs),
    /// One QLoRA step (forward, backward, clipping, AdamW) on one sample; one JSON line per setting.
    TrainStep(Box<bench::TrainStepArgs>),
}

/// The whole command line with the HfArgumentParser conventions (see `hf`).
pub fn command() -> clap::Command {
    hf::hf_conventions(Cli::command())
}

/// Parses the process's arguments; prints help, version or the parse error and exits as clap does.
pub fn parse() -> Cli {
    let mut cmd = command();
    let matches = cmd.clone().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit())
}

/// Parses `args` (the first is the program name), as `parse` does, for tests.
pub fn try_parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = command().try_get_matches_from(args)?;
    Cli::from_arg_matches(&matches)
}

/// Runs every command but `train` (which `main` runs, with its interrupt handling).
pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Init { preset, output_dir, seed } => {
            init::init(preset, &output_dir, seed)?;
            println!("wrote {} and {}", output_dir.join("llm").display(), output_dir.join("vision").display());
            Ok(())
        }
        Command::Train(_) => bail!("train runs from main"),
        Command::Infer(i) => infer(*i),
        Command::Eval(e) => eval(*e),
        Command::Merge(m) => crate::merge::run(&m).map(|_| ()),
        Command::Bench { what } => match what {
            BenchCommand::Generate(a) => bench::generate(&a),
            BenchCommand::TrainStep(a) => bench::train_step(&a),
        },
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut command(), "gemmaclip", &mut std::io::stdout());
            Ok(())
        }
    }
}

fn infer(i: InferCli) -> Result<()> {
    if i.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    i.sampling.check()?;
    let m = crate::load::load_answerer(&i.model.resolve()?.answerer)?;
    let options = crate::generate::GenerateOptions {
        max_new_tokens: i.max_new_tokens,
        temperature: i.sampling.temperature,
        top_p: i.sampling.top_p,
        top_k: i.sampling.top_k,
        seed: i.sampling.seed,
        stop_ids: m.stop_ids(),
        cache_room: crate::generate::CACHE_ROOM,
    };
    crate::infer::infer(
        &m,
        &crate::infer::InferArgs {
            image_path: i.image_path,
            question: i.question,
            context: i.context,
            choices: i.choices,
            options,
            json: i.json,
        },
    )
}

fn eval(e: EvalCli) -> Result<()> {
    if e.launch.nproc_per_node.is_some() && std::env::var_os("WORLD_SIZE").is_none() {
        let code = crate::dist::launch::run(&e.launch)?;
        if code != 0 {
            std::process::exit(code);
        }
        return Ok(());
    }
    if e.batch_size == Some(0) {
        bail!("--batch-size must be at least 1");
    }
    if e.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let resolved = e.model.resolve()?;
    let data_dir = if resolved.answerer.model.preset_tiny {
        crate::hub::sample_dataset()?
    } else {
        let data = e.data.or(resolved.run_data).unwrap_or_else(|| DEFAULT_DATA.into());
        crate::hub::resolve_dataset(&data, "--data")?
    };
    e.sampling.check()?;
    let r = &resolved.answerer;
    let sources = crate::eval::fingerprint::Sources {
        model: if r.model.preset_tiny { "tiny" } else { &r.model.model },
        vision_model: if r.model.preset_tiny { "tiny" } else { &r.model.vision_model },
        four_bit: r.model.four_bit,
        image_aspect: format!("{:?}", r.image_aspect).to_lowercase(),
        adapter_dir: r.adapter_dir.as_ref().map(|n| n.path.as_path()),
        projector_path: r.projector_path.as_ref().map(|n| n.path.as_path()),
    }
    .to_json()?;
    let m = crate::load::load_answerer(&resolved.answerer)?;
    crate::eval::eval(
        &m,
        &data_dir,
        &crate::eval::EvalArgs {
            split: e.split,
            limit: e.limit,
            batch_size: e.batch_size,
            max_new_tokens: e.max_new_tokens,
            output_dir: e.output_dir,
            rendezvous_timeout: e.launch.rendezvous_timeout,
            collective_timeout: e.launch.collective_timeout,
        },
        &crate::eval::Generation {
            temperature: e.sampling.temperature,
            top_p: e.sampling.top_p,
            top_k: e.sampling.top_k,
            seed: e.sampling.seed,
            sources,
            start_over: e.overwrite_output_dir,
        },
    )?;
    Ok(())
}
