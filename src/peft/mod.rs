//! The QLoRA pieces: NF4 frozen base weights, frozen-linear ops without weight gradients, LoRA
//! adapters, dropout masks that checkpointing can replay, and PEFT's adapter format.

pub mod adapter;
pub mod dropout;
pub mod frozen;
#[cfg(feature = "cuda")]
pub mod fused_lora;
pub mod lora;
pub mod nf4;
