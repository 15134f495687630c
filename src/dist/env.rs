//! Who this process is in a data-parallel run: torchrun's environment variables (`WORLD_SIZE`,
//! `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), which `gemmaclip train --nproc-per-node N`
//! sets for the workers it starts and which a user may set by hand (or with torchrun) instead.

use anyhow::{bail, Context, Result};

/// The launch flags of `gemmaclip train` (torchrun's names). They are not training settings: a
/// run's arguments, its checkpoints and a resume do not record or compare them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LaunchArgs {
    /// Start one worker process per GPU on this host (data-parallel training over NCCL; CPU
    /// workers talk over TCP). Each worker sees one GPU (CUDA_VISIBLE_DEVICES).
    #[arg(long)]
    pub nproc_per_node: Option<usize>,
    /// Hosts taking part (run the same command on each, with its own --node-rank).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This host's place among the --nnodes hosts; the host of rank 0 is node 0.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of the host of rank 0, which the other ranks contact to start.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// TCP port rank 0 listens on to start the run (one host: a free port when not given; several
    /// hosts: 29500 when not given).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Seconds the ranks wait for each other at the start before giving up.
    #[arg(long, default_value_t = 300)]
    pub rendezvous_timeout: u64,
    /// Seconds a rank may go without finishing a training step (or an eval batch) before the run
    /// stops as hung, naming the rank (0: wait forever).
    #[arg(long, default_value_t = 1800)]
    pub collective_timeout: u64,
}

/// torchrun's default port.
pub const DEFAULT_PORT: u16 = 29500;

/// One worker's place in a run of several.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerEnv {
    pub rank: usize,
    pub world: usize,
    /// Its index among the workers of its host (the GPU it takes when it sees several).
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

fn var(name: &str) -> Result<Option<String>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => bail!("environment variable {name}: {e}"),
    }
}

fn parsed<T: std::str::FromStr>(name: &str, default: Option<T>) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match var(name)? {
        Some(v) => v.trim().parse().map_err(|e| anyhow::anyhow!("environment variable {name}={v:?}: {e}")),
        None => default.with_context(|| format!("environment variable {name} is not set (WORLD_SIZE is)")),
    }
}

impl WorkerEnv {
    /// This process's place, when WORLD_SIZE says it is one of several; None for a run of one.
    pub fn from_env() -> Result<Option<Self>> {
        if var("WORLD_SIZE")?.is_none() {
            return Ok(None);
        }
        let world: usize = parsed("WORLD_SIZE", None)?;
        if world == 0 {
            bail!("environment variable WORLD_SIZE=0: a run needs at least one worker");
        }
        if world == 1 {
            return Ok(None);
        }
        let rank: usize = parsed("RANK", None)?;
        if rank >= world {
            bail!("environment variable RANK={rank} is not below WORLD_SIZE={world}");
        }
        let local_rank = parsed("LOCAL_RANK", Some(rank))?;
        let master_addr = var("MASTER_ADDR")?.unwrap_or_else(|| "127.0.0.1".into());
        let master_port = parsed("MASTER_PORT", Some(DEFAULT_PORT))?;
        Ok(Some(Self { rank, world, local_rank, master_addr, master_port }))
    }

    /// The CUDA ordinal this worker takes: 0 when CUDA_VISIBLE_DEVICES shows it one GPU (as the
    /// launcher arranges), else its local rank.
    pub fn cuda_ordinal(&self) -> usize {
        match std::env::var("CUDA_VISIBLE_DEVICES") {
            Ok(v) if v.split(',').filter(|s| !s.trim().is_empty()).count() == 1 => 0,
            _ => self.local_rank,
        }
    }
}
