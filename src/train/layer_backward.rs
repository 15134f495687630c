//! A decoder layer's backward written by hand on the GPU (the default, with checkpointing or
//! without; `GEMMACLIP_COMPOSED=backward` goes back to candle's autograd):
//! the layer's fused ops run without a graph, recording themselves (src/model/tape.rs; with
//! checkpointing in the recompute, without in the one forward), and the backward calls each op's
//! own backward in reverse, adding the gradients of a tensor read twice (the residual stream, the
//! input of q/k/v and of gate/up) once, the latter inside the LoRA linears' own GEMMs.
//! candle's autograd instead adds every gradient edge into a zero-filled tensor: on an H200 about
//! 97 ms of a 318 ms batch-4 step (tools/gpu/kprof). The ops and their backwards are the ones the
//! autograd path runs; only the sums of the q/k/v and gate/up input gradients round differently.
//! tests/gpu.rs holds it against the autograd path.

use crate::model::gemma3::DecoderLayer;
use crate::model::layer_context::LayerContext;
use crate::model::ops::residual_add as add;
use crate::model::tape::{record, record_for_later, Entry};
use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// The ops of one training layer forward, in the order they run (gemma3.rs, attention.rs).
const LAYER: [&str; 15] = [
    "gemma-rmsnorm",      // input norm
    "fused-lora-linear",  // q
    "gemma-qk-norm-rope", // q norm + rope
    "fused-lora-linear",  // k
    "gemma-qk-norm-rope", // k norm + rope
    "fused-lora-linear",  // v
    "cudnn-sdpa",
    "fused-lora-linear", // o
    "gemma-rmsnorm",     // post-attention norm
    "gemma-rmsnorm",     // pre-feedforward norm
    "fused-lora-linear", // gate
    "fused-lora-linear", // up
    "gelu-tanh-mul",
    "fused-lora-linear", // down
    "gemma-rmsnorm",     // post-feedforward norm
];

static FORCED: AtomicU8 = AtomicU8::new(0);
static LAYERS: AtomicUsize = AtomicUsize::new(0);

/// Whether the hand-written backward may run (`force`, else not `GEMMACLIP_COMPOSED=backward`).
pub fn asked() -> bool {
    match FORCED.load(Ordering::SeqCst) {
        1 => true,
        2 => false,
        _ => crate::fused_ops::allowed(crate::fused_ops::FusedOp::LayerBackward),
    }
}

/// Turns the hand-written backward on or off from code (tests), or back to the environment's say.
pub fn force(on: Option<bool>) {
    FORCED.store(on.map_or(0, |on| if on { 1 } else { 2 }), Ordering::SeqCst);
}

/// How many layers this process has back-propagated by hand (tests check that it ran).
pub fn layers_done() -> usize {
    LAYERS.load(Ordering::SeqCst)
}

/// The layer's forward over x, recorded -> its output and the record; None where its ops are not
/// all fused ones (the CPU, f32, a layer without adapters on all seven projections): the caller
/// then runs the autograd path. `later`: the backward runs only after every layer's forward
/// (`tape::record_for_later`), not right after this one.
pub fn forward_recorded(
    layer: &DecoderLayer,
    x: &Tensor,
    ctx: &LayerContext,
    later: bool,
) -> Result<Option<(Tensor, Vec<Entry>)>> {
    let forward = || layer.forward(x, ctx, None);
    let (y, tape) = if later { record_for_later(forward)? } else { record(forward)? };
    let names: Vec<&str> = tape.iter().map(Entry::name).collect();
    Ok((names == LAYER).then_some((y, tape)))
}

fn one(e: &Entry, g: &Tensor) -> Result<Tensor> {
    let Entry::One { op, x, y } = e else { bail!("layer backward: {} is not a one-input op", e.name()) };
    match op.bwd(x, y, g)? {
        Some(dx) => Ok(dx),
        None => bail!("layer backward: {} gave no input gradient", e.name()),
    }
}

/// A LoRA linear's backward: d(input), and d(A), d(B) added into their slots of `grads` (the
/// working copies' positions in `vars`).
fn lora(e: &Entry, g: &Tensor, vars: &[Var], grads: &mut [Option<Tensor>]) -> Result<Tensor> {
    let Entry::Three { op, a: x, b: wa, c: wb, y } = e else {
        bail!("layer backward: {} is not a LoRA linear", e.name())
    };
    // d(x) although x was recorded without a graph: the op knows it was recorded
    let (dx, da, db) = op.bwd(x, wa, wb, y, &g.contiguous()?)?;
    for (t, d) in [(wa, da), (wb, db)] {
        let Some(d) = d else { continue };
        let Some(i) = vars.iter().position(|v| v.as_tensor().id() == t.id()) else {
            bail!("layer backward: a LoRA matrix that is not among the trainable tensors")
        };
        grads[i] = Some(match grads[i].take() {
            Some(acc) => (acc + d)?,
            None => d,
        });
    }
    dx.ok_or_else(|| anyhow::anyhow!("layer backward: the LoRA linear gave no input gradient"))
}

/// `lora`, its input gradient added into `acc` (the sum over the linears that read the same input)
/// inside the op's own GEMM instead of by a separate add.
fn lora_adding(e: &Entry, g: &Tensor, vars: &[Var], grads: &mut [Option<Tensor>], acc: Tensor) -> Result<Tensor> {
    let id = acc.id();
    let d = crate::peft::fused_lora::backward_adding_into(acc, || lora(e, g, vars, grads))?;
    if d.id() != id {
        bail!("layer backward: {} did not add its input gradient into the sum", e.name());
    }
    Ok(d)
}

/// d(loss)/d(x) of the layer whose recorded forward is `tape`, from d(loss)/d(output) `g`; the
/// LoRA gradients go into `grads`.
pub fn backward(tape: &[Entry], g: &Tensor, vars: &[Var], grads: &mut [Option<Tensor>]) -> Result<Tensor> {
    let t = |i: usize| &tape[i];
    // y = x2 + norm_post_ff(down(gelu(gate(h2)) * up(h2))), h2 = norm_pre_ff(x2)
    let d_down = one(t(14), g)?;
    let d_mid = lora(t(13), &d_down, vars, grads)?;
    let Entry::Two { op, a: gate, b: up, y } = t(12) else { bail!("layer backward: the MLP activation") };
    let (Some(d_gate), Some(d_up)) = op.bwd(gate, up, y, &d_mid)? else { bail!("layer backward: gelu-mul gradients") };
    let d_h2 = lora(t(10), &d_gate, vars, grads)?;
    let d_h2 = lora_adding(t(11), &d_up, vars, grads, d_h2)?;
    let d_x2 = add(g, &one(t(9), &d_h2)?)?;
    // x2 = x + norm_post_attn(o(attention(rope(q(h1)), rope(k(h1)), v(h1)))), h1 = norm_in(x)
    let d_o = one(t(8), &d_x2)?;
    let d_att = lora(t(7), &d_o, vars, grads)?;
    let Entry::Three { op, a: q, b: k, c: v, y } = t(6) else { bail!("layer backward: attention") };
    let (Some(dq), Some(dk), Some(dv)) = op.bwd(q, k, v, y, &d_att.contiguous()?)? else {
        bail!("layer backward: attention gradients")
    };
    let dq = one(t(2), &dq)?;
    let dk = one(t(4), &dk)?;
    let d_h1 = lora(t(1), &dq, vars, grads)?;
    let d_h1 = lora_adding(t(3), &dk, vars, grads, d_h1)?;
    let d_h1 = lora_adding(t(5), &dv, vars, grads, d_h1)?;
    LAYERS.fetch_add(1, Ordering::SeqCst);
    Ok(add(&d_x2, &one(t(0), &d_h1)?)?)
}
