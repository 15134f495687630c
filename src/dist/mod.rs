//! Data-parallel training over several workers (issue: training on several GPUs): the collectives
//! behind a trait (`comm.rs`) and the rule that splits the single-worker data order across ranks
//! (`crate::data::order::rank_rows`). What is here is the part a CPU can run and test; the NCCL
//! communicator, the launcher and rank-0-only output are not built yet.

pub mod comm;
