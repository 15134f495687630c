use anyhow::Result;
use gemmaclip::cli::{self, Command};
use gemmaclip::train::args::TrainArgs;

/// `train --nproc-per-node N` outside a worker: start the workers and wait for them.
fn launch(args: &TrainArgs) -> Result<()> {
    ctrlc::set_handler(|| {
        let presses = gemmaclip::dist::launch::INTERRUPTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if presses == 0 {
            eprintln!("\ninterrupt: the workers save a checkpoint after this step (Ctrl-C again to quit now)");
        }
    })?;
    let code = gemmaclip::dist::launch::run(&args.launch)?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

fn train(args: TrainArgs) -> Result<()> {
    if args.launch.nproc_per_node.is_some() && std::env::var_os("WORLD_SIZE").is_none() {
        return launch(&args);
    }
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupted.clone();
    // of the workers of a run of several, rank 0 speaks for the run
    let speaks = std::env::var("RANK").map_or(true, |r| r.trim() == "0");
    ctrlc::set_handler(move || {
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // a second Ctrl-C does not wait for the checkpoint; a worker of several skips exit
            // handlers, which could wait on a collective whose peers are gone
            if std::env::var_os("WORLD_SIZE").is_some() {
                // SAFETY: ends the process without running anything more of it
                unsafe { libc::_exit(130) }
            }
            std::process::exit(130);
        }
        if speaks {
            eprintln!("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit now)");
        }
    })?;
    let (done, total) = gemmaclip::train::run::train(&args, interrupted.clone())?;
    if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
        if speaks {
            eprintln!("stopped at step {done}; continue with --resume");
        }
        std::process::exit(130);
    }
    if !speaks {
        return Ok(());
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
        if std::env::var_os("WORLD_SIZE").is_some() {
            // a worker of several: exit handlers could wait on a NCCL kernel that waits for a
            // rank that is gone
            // SAFETY: ends the process without running anything more of it
            unsafe { libc::_exit(1) }
        }
        std::process::exit(1);
    }
}
