//! A record of the fused GPU ops one decoder layer runs, for a backward written by hand
//! (src/train/layer_backward.rs) instead of candle's autograd, which adds every gradient edge into
//! a zero-filled tensor. While a thread records, the fused ops run without a graph and push
//! themselves, their inputs and their output here; otherwise `run1`/`run2`/`run3` are the plain
//! `apply_op*` they replace, so nothing changes where nobody records. A thread may also run
//! without a graph at all (`without_graph`: the first, checkpointed pass of a training step, whose
//! layer outputs are detached anyway): the fused ops then neither record nor build graph nodes.

use candle_core::{CustomOp1, CustomOp2, CustomOp3, Result, Tensor};
use std::cell::RefCell;

/// One recorded op: the op itself (it may keep state from its forward, e.g. cuDNN's statistics),
/// its inputs and its output.
pub enum Entry {
    One { op: Box<dyn CustomOp1 + Send + Sync>, x: Tensor, y: Tensor },
    Two { op: Box<dyn CustomOp2 + Send + Sync>, a: Tensor, b: Tensor, y: Tensor },
    Three { op: Box<dyn CustomOp3 + Send + Sync>, a: Tensor, b: Tensor, c: Tensor, y: Tensor },
}

impl Entry {
    pub fn name(&self) -> &'static str {
        match self {
            Entry::One { op, .. } => op.name(),
            Entry::Two { op, .. } => op.name(),
            Entry::Three { op, .. } => op.name(),
        }
    }
}

thread_local! {
    static TAPE: RefCell<Option<Vec<Entry>>> = const { RefCell::new(None) };
    static NO_GRAPH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static LATER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread's fused ops building no graph.
pub fn without_graph<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    /// Puts the flag back however `f` ends, a panic included.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            NO_GRAPH.with(|n| n.set(self.0));
        }
    }
    let _restore = Restore(NO_GRAPH.with(|n| n.replace(true)));
    f()
}

/// Whether this thread runs its fused ops without a graph (`without_graph`).
pub fn graphless() -> bool {
    NO_GRAPH.with(|n| n.get())
}

/// Whether this thread records.
pub fn recording() -> bool {
    TAPE.with(|t| t.borrow().is_some())
}

/// Whether this thread records ops whose backward runs right after them (`record`): an op may
/// then keep what its backward would otherwise compute again (the fused LoRA linear's dequantized
/// weight), since only one layer's worth is alive at a time.
pub fn backward_follows() -> bool {
    recording() && !LATER.with(|l| l.get())
}

/// Runs `f` with this thread recording -> f's result and the ops it ran, in order.
pub fn record<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Vec<Entry>)> {
    record_with(false, f)
}

/// `record`, for a backward that runs only after the whole model's forward (training without
/// checkpointing keeps every layer's record): the ops keep nothing beyond their inputs, output
/// and small state, as under candle's autograd.
pub fn record_for_later<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Vec<Entry>)> {
    record_with(true, f)
}

fn record_with<T>(later: bool, f: impl FnOnce() -> Result<T>) -> Result<(T, Vec<Entry>)> {
    /// Stops recording however `f` ends, a panic included.
    struct Stop;
    impl Drop for Stop {
        fn drop(&mut self) {
            TAPE.with(|t| t.borrow_mut().take());
            LATER.with(|l| l.set(false));
        }
    }
    let _stop = Stop;
    LATER.with(|l| l.set(later));
    TAPE.with(|t| *t.borrow_mut() = Some(vec![]));
    let out = f();
    let tape = TAPE.with(|t| t.borrow_mut().take()).unwrap_or_default();
    Ok((out?, tape))
}

fn push(e: Entry) {
    TAPE.with(|t| {
        if let Some(v) = t.borrow_mut().as_mut() {
            v.push(e)
        }
    })
}

pub fn run1(x: &Tensor, op: impl CustomOp1 + Send + Sync + 'static) -> Result<Tensor> {
    if graphless() {
        return x.apply_op1_no_bwd(&op);
    }
    if !recording() {
        return x.apply_op1(op);
    }
    let y = x.apply_op1_no_bwd(&op)?;
    push(Entry::One { op: Box::new(op), x: x.clone(), y: y.clone() });
    Ok(y)
}

pub fn run2(a: &Tensor, b: &Tensor, op: impl CustomOp2 + Send + Sync + 'static) -> Result<Tensor> {
    if graphless() {
        return a.apply_op2_no_bwd(b, &op);
    }
    if !recording() {
        return a.apply_op2(b, op);
    }
    let y = a.apply_op2_no_bwd(b, &op)?;
    push(Entry::Two { op: Box::new(op), a: a.clone(), b: b.clone(), y: y.clone() });
    Ok(y)
}

pub fn run3(a: &Tensor, b: &Tensor, c: &Tensor, op: impl CustomOp3 + Send + Sync + 'static) -> Result<Tensor> {
    if graphless() {
        return a.apply_op3_no_bwd(b, c, &op);
    }
    if !recording() {
        return a.apply_op3(b, c, op);
    }
    let y = a.apply_op3_no_bwd(b, c, &op)?;
    push(Entry::Three { op: Box::new(op), a: a.clone(), b: b.clone(), c: c.clone(), y: y.clone() });
    Ok(y)
}
