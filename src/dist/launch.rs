//! `gemmaclip train --nproc-per-node N`: starts N worker processes of this same command on this
//! host, one GPU each, with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
//! MASTER_PORT), and waits for them. Ctrl-C is passed on to every worker once (they save a
//! checkpoint and stop together); a worker that fails stops the others (they notice through the
//! control links; any still running 10 s later are killed), and the launcher says which it was.

use crate::dist::control::STOPPED_FOR_ANOTHER;
use crate::dist::env::{LaunchArgs, DEFAULT_PORT};
use anyhow::{bail, Context, Result};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Ctrl-C presses the launcher has seen (set by the handler `main` installs).
pub static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);

/// How long the other workers get to stop on their own after one fails.
const GRACE: Duration = Duration::from_secs(10);

fn describe(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(9)) => "was killed (SIGKILL)".into(),
        (None, Some(sig)) => format!("was ended by signal {sig}"),
        _ => "ended".into(),
    }
}

/// The GPUs workers get, one each: CUDA_VISIBLE_DEVICES's entries if set, else 0..n.
fn gpus(n: usize) -> Result<Option<Vec<String>>> {
    if !cfg!(feature = "cuda") || !candle_core::utils::cuda_is_available() {
        return Ok(None);
    }
    let list: Vec<String> = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) => v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        Err(_) => (0..n).map(|i| i.to_string()).collect(),
    };
    if list.len() < n {
        bail!("--nproc-per-node {n}: only {} GPU(s) visible (CUDA_VISIBLE_DEVICES)", list.len());
    }
    Ok(Some(list))
}

/// A free TCP port on this host for a one-host run.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free port for the rendezvous")?;
    Ok(l.local_addr()?.port())
}

/// Runs the workers of this host to the end. Returns the exit code the launcher should end with
/// (0, or 130 when interrupted); a failed worker is an error naming it.
pub fn run(l: &LaunchArgs) -> Result<i32> {
    let n = l.nproc_per_node.expect("called with --nproc-per-node");
    if n == 0 {
        bail!("--nproc-per-node must be at least 1");
    }
    if l.nnodes == 0 || l.node_rank >= l.nnodes {
        bail!("--node-rank {} must be below --nnodes {}", l.node_rank, l.nnodes);
    }
    let world = n * l.nnodes;
    let port = match l.master_port {
        Some(p) => p,
        None if l.nnodes == 1 => free_port()?,
        None => DEFAULT_PORT,
    };
    let gpus = gpus(n)?;
    let exe = std::env::current_exe().context("finding this executable to start the workers")?;
    let mut children: Vec<(usize, Child)> = vec![];
    for local in 0..n {
        let rank = l.node_rank * n + local;
        let mut cmd = Command::new(&exe);
        cmd.args(std::env::args_os().skip(1))
            .env("WORLD_SIZE", world.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", &l.master_addr)
            .env("MASTER_PORT", port.to_string())
            // Ctrl-C reaches the workers once, through the launcher, not twice from the terminal
            .process_group(0);
        if let Some(g) = &gpus {
            cmd.env("CUDA_VISIBLE_DEVICES", &g[local]);
        }
        // SAFETY: prctl is async-signal-safe; a worker whose launcher dies is ended too.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                for (_, c) in &mut children {
                    let _ = c.kill();
                }
                return Err(e).with_context(|| format!("starting worker rank {rank}"));
            }
        }
    }
    let mut status: Vec<Option<ExitStatus>> = vec![None; n];
    let mut first_failure: Option<(usize, ExitStatus)> = None;
    let mut failed_at: Option<Instant> = None;
    let mut forwarded = 0;
    while status.iter().any(Option::is_none) {
        let presses = INTERRUPTS.load(Ordering::SeqCst);
        while forwarded < presses {
            forwarded += 1;
            // twice: the workers quit without a checkpoint; a third time: killed
            let signal = if forwarded >= 3 { libc::SIGKILL } else { libc::SIGINT };
            for ((_, c), s) in children.iter().zip(&status) {
                if s.is_none() {
                    // SAFETY: signals a child this process started and has not reaped
                    unsafe { libc::kill(c.id() as i32, signal) };
                }
            }
        }
        let mut failed_now = vec![];
        for (i, (rank, c)) in children.iter_mut().enumerate() {
            if status[i].is_none() {
                if let Some(s) = c.try_wait()? {
                    status[i] = Some(s);
                    if !s.success() && s.code() != Some(130) {
                        failed_now.push((*rank, s));
                    }
                }
            }
        }
        // of workers ending together, one ended by a signal or by its own error is the cause; the
        // others stopped because of it
        failed_now.sort_by_key(|(rank, s)| (s.signal().is_none(), s.code() == Some(STOPPED_FOR_ANOTHER), *rank));
        if first_failure.is_none() && !failed_now.is_empty() {
            first_failure = Some(failed_now[0]);
            failed_at = Some(Instant::now());
        }
        if failed_at.is_some_and(|t| t.elapsed() > GRACE) {
            for (i, (rank, c)) in children.iter_mut().enumerate() {
                if status[i].is_none() {
                    eprintln!("rank {rank} still running {} s after the failure: killing it", GRACE.as_secs());
                    let _ = c.kill();
                    status[i] = Some(c.wait()?);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // after Ctrl-C twice, workers end as they may: that was asked for
    if forwarded >= 2 {
        return Ok(130);
    }
    if let Some((rank, s)) = first_failure {
        bail!("worker rank {rank} {}; the run stopped", describe(s));
    }
    Ok(if status.iter().flatten().any(|s| s.code() == Some(130)) { 130 } else { 0 })
}
