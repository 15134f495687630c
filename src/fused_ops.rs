//! Which fused GPU ops may run. Each has a composed counterpart (the CPU path, and the reference it
//! is tested against); `GEMMACLIP_COMPOSED=attention,lora,rope,mlp,loss,graph,backward` (or `all`, or `1`) makes a whole run use the
//! composed forms instead, for comparisons, and `force_composed` does the same from code (tests).

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedOp {
    /// cuDNN's fused attention (src/model/cudnn_attention.rs)
    Attention,
    /// One op per LoRA linear with a hand-written backward (src/peft/fused_lora.rs)
    Lora,
    /// q/k RMSNorm + RoPE as one op each way (src/model/qk_rope.rs)
    NormRope,
    /// The MLP's gelu_tanh(gate) * up as one op each way (src/model/gelu_mul.rs)
    GeluMul,
    /// The training loss from bf16 logits, one op each way (src/train/fused_ce.rs)
    CrossEntropy,
    /// CUDA graphs: generation's greedy decode step (src/model/cuda_graph.rs) and the frozen CLIP
    /// tower (src/model/vision_graph.rs), captured once and replayed
    DecodeGraph,
    /// Training's decoder-layer backward written by hand from the recompute's recorded fused ops
    /// (src/train/layer_backward.rs) instead of candle's autograd, and the checkpointed first pass
    /// run without a graph, each residual step fused with the norm after it
    LayerBackward,
}

impl FusedOp {
    fn name(self) -> &'static str {
        match self {
            FusedOp::Attention => "attention",
            FusedOp::Lora => "lora",
            FusedOp::NormRope => "rope",
            FusedOp::GeluMul => "mlp",
            FusedOp::CrossEntropy => "loss",
            FusedOp::DecodeGraph => "graph",
            FusedOp::LayerBackward => "backward",
        }
    }
    fn flag(self) -> &'static AtomicBool {
        static ATTENTION: AtomicBool = AtomicBool::new(false);
        static LORA: AtomicBool = AtomicBool::new(false);
        static NORM_ROPE: AtomicBool = AtomicBool::new(false);
        static GELU_MUL: AtomicBool = AtomicBool::new(false);
        static CROSS_ENTROPY: AtomicBool = AtomicBool::new(false);
        static DECODE_GRAPH: AtomicBool = AtomicBool::new(false);
        static LAYER_BACKWARD: AtomicBool = AtomicBool::new(false);
        match self {
            FusedOp::Attention => &ATTENTION,
            FusedOp::Lora => &LORA,
            FusedOp::NormRope => &NORM_ROPE,
            FusedOp::GeluMul => &GELU_MUL,
            FusedOp::CrossEntropy => &CROSS_ENTROPY,
            FusedOp::DecodeGraph => &DECODE_GRAPH,
            FusedOp::LayerBackward => &LAYER_BACKWARD,
        }
    }
}

/// Whether `op` may run fused (before its own device and dtype checks).
pub fn allowed(op: FusedOp) -> bool {
    if op.flag().load(Ordering::SeqCst) {
        return false;
    }
    // read once: this runs for every fused op of every forward
    static COMPOSED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let composed = COMPOSED.get_or_init(|| {
        let v = std::env::var("GEMMACLIP_COMPOSED").unwrap_or_default();
        v.split(',').map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect()
    });
    !composed.iter().any(|c| c == "all" || c == "1" || c == op.name())
}

/// Makes the forwards that follow use `op`'s composed form (true) or the fused one again.
pub fn force_composed(op: FusedOp, on: bool) {
    op.flag().store(on, Ordering::SeqCst);
}
