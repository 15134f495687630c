//! The models, in our own code: CLIP vision tower, projector, Gemma-3 text model and their assembly.

pub mod attention;
pub mod clip;
#[cfg(feature = "cuda")]
pub mod cuda_graph;
#[cfg(feature = "cuda")]
pub mod cudnn_attention;
pub mod decode;
#[cfg(feature = "cuda")]
pub mod decode_attention;
#[cfg(feature = "cuda")]
pub mod device_sampling;
pub mod fused_attention;
#[cfg(feature = "cuda")]
pub mod gelu_mul;
pub mod gemma3;
pub mod kv_cache;
pub mod layer_context;
pub mod linear;
pub mod ops;
pub mod projector;
#[cfg(feature = "cuda")]
pub mod qk_rope;
pub mod rope;
#[cfg(feature = "cuda")]
pub mod tape;
pub mod vlm;
