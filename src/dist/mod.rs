//! Data-parallel training over several workers (one process per GPU): who a process is
//! (`env.rs`), how the workers meet and stop together (`rendezvous.rs`, `control.rs`), the
//! collectives behind a trait (`comm.rs`: NCCL in `nccl.rs`, TCP in `tcp.rs`, threads for tests),
//! the launcher of `train --nproc-per-node` (`launch.rs`), and the rule that splits the
//! single-worker data order across ranks (`crate::data::order::rank_rows`).

pub mod comm;
pub mod control;
pub mod env;
pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
pub mod tcp;
mod wire;
pub mod worker;
