//! This process as one rank of a data-parallel run: the rendezvous, the control links that stop
//! the run together, and the communicator (NCCL between GPUs where the build has it, else TCP
//! through rank 0).

use crate::dist::comm::{AbortOnDrop, Communicator};
use crate::dist::control::Control;
use crate::dist::env::WorkerEnv;
use crate::dist::rendezvous::rendezvous;
use anyhow::Result;
use candle_core::Device;
use std::sync::Arc;
use std::time::Duration;

pub struct Worker {
    pub env: WorkerEnv,
    pub comm: Box<dyn Communicator>,
    control: Arc<Control>,
}

/// Whether a worker's collectives may go through NCCL (on a GPU of an `nccl` build), and on
/// which stream: the device's own (every collective in line with the kernels), or one of NCCL's
/// own beside it (gradient buckets summed while the backward goes on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nccl {
    No,
    InLine,
    Beside,
}

impl Nccl {
    /// A training run's: beside the compute stream when it sums gradient buckets.
    pub fn for_buckets(cap_mb: f64) -> Self {
        if cap_mb > 0.0 {
            Self::Beside
        } else {
            Self::InLine
        }
    }
}

/// Runs `work` as this process's part of a run of several when WORLD_SIZE says so, else alone
/// (`None`). A worker first meets the others, who must bring the same `settings` (what they must
/// agree on, paths excluded), with NCCL on `dev` as `nccl` says; how `work` ends (an
/// error, a panic) reaches the others, so they stop naming this rank instead of waiting.
pub fn as_worker<T>(
    dev: &Device,
    settings: &str,
    rendezvous_timeout: Duration,
    nccl: Nccl,
    work: impl FnOnce(Option<&Worker>) -> Result<T>,
) -> Result<T> {
    use sha2::Digest;
    let Some(env) = WorkerEnv::from_env()? else { return work(None) };
    let fingerprint = sha2::Sha256::digest(settings.as_bytes()).into();
    let w = Worker::join(env, dev, fingerprint, rendezvous_timeout, nccl)?;
    let guard = AbortOnDrop::new(w.comm.as_ref());
    let done = work(Some(&w));
    guard.disarm();
    match &done {
        Ok(_) => w.finish(),
        Err(e) => w.abort(&format!("{e:#}")),
    }
    done
}

impl Worker {
    /// Meets the other ranks (they must bring the same `fingerprint` of their settings) and sets
    /// up the collectives on `dev`: NCCL where `want` asks, the build has it and `dev` is a GPU.
    pub fn join(env: WorkerEnv, dev: &Device, fingerprint: [u8; 32], timeout: Duration, want: Nccl) -> Result<Self> {
        let want_nccl = want != Nccl::No;
        let nccl = want_nccl && cfg!(feature = "nccl") && dev.is_cuda();
        let payload = || -> Result<Vec<u8>> {
            #[cfg(feature = "nccl")]
            if nccl {
                return crate::dist::nccl::new_id();
            }
            Ok(vec![])
        };
        let links = rendezvous(&env, fingerprint, payload, timeout)?;
        let control = Control::start(env.rank, links.control)?;
        let comm: Box<dyn Communicator> = if nccl {
            #[cfg(feature = "nccl")]
            {
                Box::new(crate::dist::nccl::NcclComm::new(
                    dev,
                    (env.rank, env.world),
                    &links.payload,
                    want == Nccl::Beside,
                    control.clone(),
                )?)
            }
            #[cfg(not(feature = "nccl"))]
            unreachable!("nccl is false without the feature")
        } else {
            if want_nccl && dev.is_cuda() && env.rank == 0 {
                eprintln!("note: this build has no NCCL, so gradients travel through rank 0 over TCP (slow); build with --features nccl for GPUs");
            }
            Box::new(crate::dist::tcp::TcpComm::new(env.rank, env.world, links.data, control.clone()))
        };
        Ok(Self { env, comm, control })
    }

    /// Rank 0 writes the run's files and prints its progress.
    pub fn is_main(&self) -> bool {
        self.env.rank == 0
    }

    /// This rank finished a unit of work (see `start_watch`).
    pub fn progress(&self) {
        self.control.progress()
    }

    /// From now on a rank that makes no progress for `timeout` stops the run (0: never).
    pub fn start_watch(&self, timeout: Duration) -> Result<()> {
        if !timeout.is_zero() {
            self.control.watch_progress(timeout)?;
        }
        Ok(())
    }

    /// This rank is done; the others may see its links close.
    pub fn finish(&self) {
        self.control.finish()
    }

    /// This rank failed with `why`: every other rank stops, naming it.
    pub fn abort(&self, why: &str) {
        self.control.abort(why)
    }
}
