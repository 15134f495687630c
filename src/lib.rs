//! gemmaclip: QLoRA fine-tuning and inference of a LLaVA-style CLIP + Gemma-3 model on candle.
//! The binary (`src/main.rs`) is a thin CLI over this library; tests use it directly.

pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod eval;
pub mod fused_ops;
pub mod generate;
pub mod hub;
pub mod infer;
pub mod init;
pub mod load;
pub mod merge;
pub mod model;
pub mod peft;
pub mod rng;
pub mod safetensors_out;
pub mod sampling;
pub mod sha;
pub mod train;
pub mod weights;
