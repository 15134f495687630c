//! The models, in our own code: CLIP vision tower, projector, Gemma-3 text model and their assembly.

pub mod clip;
pub mod gemma3;
pub mod linear;
pub mod ops;
pub mod projector;
pub mod rope;
pub mod vlm;
