use anyhow::Result;
use gemmaclip::cli::{self, Command};
use gemmaclip::train::args::TrainArgs;

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
    let result = match cli::parse().command {
        Command::Train(t) => train(*t),
        other => cli::run(other),
    };
    if let Err(e) = result {
        // One line: the outermost context first, then its causes.
        let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", msg.join(": "));
        std::process::exit(1);
    }
}
