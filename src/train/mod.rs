//! Training: one step's loss and gradients (with or without gradient checkpointing); the loop,
//! optimizer and schedule build on it.

pub mod optimizer;
pub mod step;
