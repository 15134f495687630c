//! Training: one step's loss and gradients (with or without gradient checkpointing), the
//! optimizer, the schedule, run checkpoints, metrics and the loop that ties them together.

pub mod args;
pub mod data_parallel;
#[cfg(feature = "cuda")]
pub mod fused;
#[cfg(feature = "cuda")]
pub mod fused_ce;
pub mod grad_buckets;
#[cfg(feature = "cuda")]
pub mod layer_backward;
pub mod layer_pass;
pub mod metrics;
pub mod optimizer;
pub mod plot;
mod resume;
pub mod run;
pub mod schedule;
pub mod state;
pub mod step;
