//! Loss and gradients of one batch. Only the supervised rows of the last hidden state reach the
//! final norm and the (no-dW) lm_head, in chunks, so the 262k-vocabulary logits never exist for
//! more than `loss_chunk` rows at once. With checkpointing, the first pass keeps only each layer's
//! input; backward recomputes one layer at a time and back-propagates it (src/train/layer_pass.rs:
//! by hand over the fused ops' record on the GPU, else through candle's graph with the surrogate
//! sum(out * grad_out); candle has no built-in checkpointing; docs/ARCHITECTURE.md). Without, the
//! layers' records (or one graph of the whole model) are kept from the one forward.

use crate::model::vlm::{Supervised, Vlm};
use crate::train::layer_pass;
use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// One padded batch, ready for the model.
pub struct Batch {
    /// [B][L], right-padded to one length.
    pub ids: Vec<Vec<u32>>,
    /// [B][L]: false on padding.
    pub valid: Vec<Vec<bool>>,
    /// [N_img, C, S, S], in the order the image-token blocks appear.
    pub pixels: Option<Tensor>,
    pub supervised: Supervised,
}

#[derive(Debug, Clone)]
pub struct StepOptions {
    pub checkpointing: bool,
    /// Some(seed) turns LoRA dropout on with masks derived from it.
    pub dropout_seed: Option<u64>,
    /// Supervised rows per lm_head/log-softmax chunk.
    pub loss_chunk: usize,
    /// What the summed cross-entropy is divided by: the supervised tokens of the whole optimizer
    /// step (every micro-batch), so accumulation equals one big batch and a short row weighs
    /// less than a long one (transformers' `num_items_in_batch`). None: this batch's own count.
    pub loss_denominator: Option<usize>,
    /// Time each phase (the device synchronized between them) and keep its peak memory, into
    /// `Gradients::phases`; `GEMMACLIP_PHASES` set does the same and prints them.
    pub phases: bool,
}

impl Default for StepOptions {
    fn default() -> Self {
        Self { checkpointing: false, dropout_seed: None, loss_chunk: 256, loss_denominator: None, phases: false }
    }
}

/// One phase of a step: its name, milliseconds and the peak of live device memory during it
/// (bytes; None on the CPU).
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: &'static str,
    pub ms: f64,
    /// Milliseconds until the host had queued the phase's work (before waiting for the device):
    /// near `ms`, the device waited for the host.
    pub host_ms: f64,
    pub peak: Option<u64>,
}

/// Cross-entropy summed over the batch's supervised tokens and divided by
/// `StepOptions::loss_denominator` (by default their count: the mean), and d(loss)/d(var) for each trainable
/// var (None where the batch does not reach it, e.g. the projector on a text-only batch).
pub struct Gradients {
    pub loss: f32,
    pub grads: Vec<Option<Tensor>>,
    /// Filled when `StepOptions::phases` or `GEMMACLIP_PHASES` asks for it.
    pub phases: Vec<Phase>,
}

/// Sum over rows of -log softmax(logits)[target], divided by `denom`, in f32.
fn ce_sum(logits: &Tensor, targets: &Tensor, denom: f64) -> candle_core::Result<Tensor> {
    crate::model::ops::cross_entropy_sum(logits, targets)? / denom
}

/// The summed loss of `rows` through the fused cross-entropy (GPU, bf16, no softcapping), or
/// None where the composed `ce_sum` must run.
fn fused_loss(vlm: &Vlm, rows: &Tensor, targets: &Tensor, denom: f64) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if rows.device().is_cuda()
        && rows.dtype() == DType::BF16
        && vlm.llm.cfg.final_logit_softcapping.is_none()
        && crate::fused_ops::allowed(crate::fused_ops::FusedOp::CrossEntropy)
    {
        let logits = vlm.llm.head_logits(rows)?;
        let per_row = crate::train::fused_ce::cross_entropy_rows(&logits, targets, 1.0 / denom)?;
        return Ok(Some(per_row.sum_all()?));
    }
    let _ = (vlm, rows, targets, denom);
    Ok(None)
}

/// `loss_and_grad_on_rows` with the fused loss and every backward by hand (fused_ce.rs), or None
/// where the fused loss does not apply.
fn fused_loss_and_grad(
    vlm: &Vlm,
    h: &Tensor,
    targets: &[u32],
    chunk: usize,
    denom: f64,
) -> Result<Option<(f32, Tensor)>> {
    #[cfg(feature = "cuda")]
    if h.device().is_cuda()
        && h.dtype() == DType::BF16
        && vlm.llm.cfg.final_logit_softcapping.is_none()
        && crate::fused_ops::allowed(crate::fused_ops::FusedOp::CrossEntropy)
        && crate::train::layer_backward::asked()
    {
        let s = h.dim(0)?;
        let targets = Tensor::from_vec(targets.to_vec(), s, h.device())?;
        let (mut loss, mut grads) = (0f32, vec![]);
        for start in (0..s).step_by(chunk.max(1)) {
            let n = chunk.min(s - start);
            let (l, g) = crate::train::fused_ce::head_loss_and_grad(
                &vlm.llm,
                &h.narrow(0, start, n)?.contiguous()?,
                &targets.narrow(0, start, n)?,
                1.0 / denom,
            )?;
            loss += l.to_scalar::<f32>()?;
            grads.push(g);
        }
        return Ok(Some((loss, Tensor::cat(&grads, 0)?)));
    }
    let _ = (vlm, h, targets, chunk, denom);
    Ok(None)
}

/// Loss over the supervised rows `h` [S, H] (no graph) and d(loss)/dh, chunk by chunk.
fn loss_and_grad_on_rows(
    vlm: &Vlm,
    h: &Tensor,
    targets: &[u32],
    chunk: usize,
    denom: Option<usize>,
) -> Result<(f32, Tensor)> {
    let s = h.dim(0)?;
    let denom = denom.unwrap_or(s) as f64;
    if let Some(out) = fused_loss_and_grad(vlm, h, targets, chunk, denom)? {
        return Ok(out);
    }
    let hv = Var::from_tensor(h)?;
    let targets = Tensor::from_vec(targets.to_vec(), s, h.device())?;
    let mut loss = 0f32;
    let mut grad: Option<Tensor> = None;
    for start in (0..s).step_by(chunk.max(1)) {
        let n = chunk.min(s - start);
        let rows = hv.as_tensor().narrow(0, start, n)?;
        let l = match fused_loss(vlm, &rows, &targets.narrow(0, start, n)?, denom)? {
            Some(l) => l,
            None => ce_sum(&vlm.llm.logits(&rows)?, &targets.narrow(0, start, n)?, denom)?,
        };
        loss += l.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let g = l.backward()?.remove(hv.as_tensor()).expect("the rows reach the loss");
        grad = Some(match grad {
            Some(acc) => (acc + g)?,
            None => g,
        });
    }
    Ok((loss, grad.expect("at least one supervised row")))
}

pub(super) fn collect(into: &mut [Option<Tensor>], store: &GradStore, vars: &[Var]) -> Result<()> {
    for (slot, v) in into.iter_mut().zip(vars) {
        if let Some(g) = store.get(v.as_tensor()) {
            *slot = Some(match slot.take() {
                Some(acc) => (acc + g)?,
                None => g.clone(),
            });
        }
    }
    Ok(())
}

/// Back-propagates `grad` (d loss / d y) from `y` through y's graph: the gradients of the
/// surrogate sum(y · grad) with y's own gradient `grad` exactly, without computing the product or
/// its sum (two full passes over y, and a single-block reduction of millions of values on the GPU).
pub(super) fn backward_from(y: &Tensor, grad: &Tensor) -> candle_core::Result<GradStore> {
    y.apply_op2(&grad.detach(), Surrogate)?.backward()
}

/// A scalar 0 whose gradient with respect to its first input is its second input.
struct Surrogate;

impl candle_core::CustomOp2 for Surrogate {
    fn name(&self) -> &'static str {
        "backward-surrogate"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        Ok((candle_core::CpuStorage::F32(vec![0.0]), candle_core::Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let dev = candle_core::backend::BackendStorage::device(y).clone();
        let zero = dev.alloc_zeros::<f32>(1)?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(zero, dev), candle_core::Shape::from(())))
    }

    fn bwd(
        &self,
        y: &Tensor,
        grad: &Tensor,
        _res: &Tensor,
        _seed: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if grad.dims() != y.dims() || grad.dtype() != y.dtype() {
            candle_core::bail!(
                "backward surrogate: gradient {:?} {:?} for y {:?} {:?}",
                grad.dims(),
                grad.dtype(),
                y.dims(),
                y.dtype()
            );
        }
        Ok((Some(grad.clone()), None))
    }
}

/// Rows of the flattened hidden state [B*L, H] that are supervised.
fn supervised_rows(x: &Tensor, sup: &Supervised) -> candle_core::Result<Tensor> {
    let (b, l, h) = x.dims3()?;
    let rows = Tensor::from_vec(sup.rows.clone(), sup.rows.len(), x.device())?;
    x.reshape((b * l, h))?.index_select(&rows, 0)
}

/// Times the phases of a step when asked (see `StepOptions::phases`).
struct Phases {
    on: bool,
    print: bool,
    dev: candle_core::Device,
    t: std::time::Instant,
    parts: Vec<Phase>,
}

impl Phases {
    fn new(dev: &candle_core::Device, asked: bool) -> Result<Self> {
        let print = std::env::var_os("GEMMACLIP_PHASES").is_some();
        let on = asked || print;
        if on {
            dev.synchronize()?;
            crate::device::reset_peak_memory(dev)?;
        }
        Ok(Self { on, print, dev: dev.clone(), t: std::time::Instant::now(), parts: vec![] })
    }
    fn mark(&mut self, name: &'static str) -> Result<()> {
        if self.on {
            let host_ms = self.t.elapsed().as_secs_f64() * 1e3;
            self.dev.synchronize()?;
            let ms = self.t.elapsed().as_secs_f64() * 1e3;
            let peak = crate::device::memory(&self.dev)?.peak;
            crate::device::reset_peak_memory(&self.dev)?;
            self.parts.push(Phase { name, ms, host_ms, peak });
            self.t = std::time::Instant::now();
        }
        Ok(())
    }
    fn finish(self) -> Vec<Phase> {
        if self.print {
            let gib = |b: Option<u64>| {
                b.map_or(String::new(), |b| format!(", peak {:.2} GiB", b as f64 / (1u64 << 30) as f64))
            };
            let s: Vec<String> = self
                .parts
                .iter()
                .map(|p| format!("{} {:.1} ms (queued in {:.1}){}", p.name, p.ms, p.host_ms, gib(p.peak)))
                .collect();
            eprintln!("phases: {}", s.join("; "));
        }
        self.parts
    }
}

/// What a step's caller does with the gradients of decoder layer `i` once they are final (its
/// backward ran): a data-parallel run starts summing them over the ranks (grad_buckets.rs).
/// It may take them out of the slots; they are not touched again.
pub type LayerDone<'a> = &'a mut dyn FnMut(usize, &mut [Option<Tensor>]) -> Result<()>;

/// Whether the layers' backward may run by hand (src/train/layer_backward.rs): a CUDA build, the
/// switch on, a bf16 model on the GPU. The step without checkpointing otherwise back-propagates
/// through one graph of the whole model.
fn by_hand(embeds: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    return crate::train::layer_backward::asked() && embeds.device().is_cuda() && embeds.dtype() == DType::BF16;
    #[cfg(not(feature = "cuda"))]
    {
        let _ = embeds;
        false
    }
}

/// Loss and gradients for `vars` (the LoRA A/B and projector Vars, f32).
pub fn loss_and_grads(vlm: &Vlm, batch: &Batch, vars: &[Var], opts: &StepOptions) -> Result<Gradients> {
    loss_and_grads_by_layer(vlm, batch, vars, opts, &mut |_, _| Ok(()))
}

/// `loss_and_grads`, handing each decoder layer's gradients to `done` as they become final, the
/// last layer first (right after the layer's backward; through candle's graph without
/// checkpointing, all after the one backward).
pub fn loss_and_grads_by_layer(
    vlm: &Vlm,
    batch: &Batch,
    vars: &[Var],
    opts: &StepOptions,
    done: LayerDone,
) -> Result<Gradients> {
    let mut phases = Phases::new(vlm.llm.device(), opts.phases)?;
    if batch.supervised.rows.is_empty() {
        bail!("the batch has no supervised tokens");
    }
    let l = batch.ids[0].len();
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    let embeds = vlm.input_embeds(&batch.ids, batch.pixels.as_ref())?;
    phases.mark("embed+vision")?;
    let mut ctx = vlm.llm.layer_context(&batch.valid, l, 0)?;
    ctx.dropout_seed = opts.dropout_seed;
    let targets = &batch.supervised.targets;

    // the first layer's record says whether the layers run fused (all seven adapters, the fused
    // ops allowed); where not, one graph of the whole model below, as before
    let first = match vlm.llm.layers.first() {
        Some(layer) if !opts.checkpointing && by_hand(&embeds) => {
            layer_pass::record(layer, &embeds.detach(), &ctx, true)?
        }
        _ => None,
    };
    if let Some((mut x, first)) = first {
        // every layer's record kept, each layer's backward by hand as soon as its gradient is known
        let mut kept = Vec::with_capacity(vlm.llm.layers.len());
        kept.push(first);
        let mut pass = layer_pass::Pass::new(true);
        for layer in &vlm.llm.layers[1..] {
            let (y, k) = pass.forward(layer, &x, &ctx)?;
            kept.push(k);
            x = y;
        }
        phases.mark("forward")?;
        let (loss, mut g) = loss_and_grad_of_last(vlm, x, batch, opts)?;
        phases.mark("loss")?;
        for i in (0..kept.len()).rev() {
            g = layer_pass::backward(kept.pop().expect("one record per layer"), &g, vars, &mut grads)?;
            done(i, &mut grads)?;
        }
        phases.mark("backward")?;
        projector_backward(&embeds, &g, vars, &mut grads)?;
        phases.mark("projector backward")?;
        return Ok(Gradients { loss, grads, phases: phases.finish() });
    }
    if !opts.checkpointing {
        let mut x = embeds;
        for layer in &vlm.llm.layers {
            x = layer.forward(&x, &ctx, None)?;
        }
        phases.mark("forward")?;
        let h = supervised_rows(&x, &batch.supervised)?;
        let (loss, g) = loss_and_grad_on_rows(vlm, &h.detach(), targets, opts.loss_chunk, opts.loss_denominator)?;
        phases.mark("loss")?;
        let store = backward_from(&h, &g)?;
        phases.mark("backward")?;
        collect(&mut grads, &store, vars)?;
        for i in (0..vlm.llm.layers.len()).rev() {
            done(i, &mut grads)?;
        }
        return Ok(Gradients { loss, grads, phases: phases.finish() });
    }

    // Pass 1: layer inputs only (each layer's graph is dropped with its detached output).
    let mut acts = vec![embeds.detach()];
    #[cfg(feature = "cuda")]
    if crate::train::layer_backward::asked() {
        // no graph at all, each residual step fused with the norm after it. Not the next layer's
        // input norm: that comes in the same buffer as the layer's output, which `acts` keeps
        // until the backward, and would double what the saved inputs hold.
        let layers = &vlm.llm.layers;
        crate::model::tape::without_graph(|| {
            for layer in layers {
                let (y, _) = layer.forward_normed(acts.last().expect("non-empty"), None, &ctx, None, None)?;
                acts.push(y.detach());
            }
            Ok(())
        })?;
    }
    while acts.len() <= vlm.llm.layers.len() {
        let next = vlm.llm.layers[acts.len() - 1].forward(acts.last().expect("non-empty"), &ctx, None)?.detach();
        acts.push(next);
    }
    phases.mark("forward (no graph)")?;
    let (loss, mut g) = loss_and_grad_of_last(vlm, acts.pop().expect("non-empty"), batch, opts)?;
    phases.mark("loss")?;

    // Backward: recompute each layer with its record or graph, then its backward.
    let mut pass = layer_pass::Pass::new(false);
    for (i, layer) in vlm.llm.layers.iter().enumerate().rev() {
        let (_, kept) = pass.forward(layer, &acts.pop().expect("one input per layer"), &ctx)?;
        g = layer_pass::backward(kept, &g, vars, &mut grads)?;
        done(i, &mut grads)?;
    }
    phases.mark("recompute+backward")?;
    projector_backward(&embeds, &g, vars, &mut grads)?;
    phases.mark("projector backward")?;
    Ok(Gradients { loss, grads, phases: phases.finish() })
}

/// The loss over the supervised rows of `last`, the last layer's output (no graph behind it), and
/// d(loss)/d(last).
fn loss_and_grad_of_last(vlm: &Vlm, last: Tensor, batch: &Batch, opts: &StepOptions) -> Result<(f32, Tensor)> {
    // the copy that tracks; the detached output itself goes now
    let last = Var::from_tensor(&{ last })?;
    let h = supervised_rows(last.as_tensor(), &batch.supervised)?;
    let targets = &batch.supervised.targets;
    let (loss, g) = loss_and_grad_on_rows(vlm, &h.detach(), targets, opts.loss_chunk, opts.loss_denominator)?;
    let g = backward_from(&h, &g)?.remove(last.as_tensor()).expect("grad of the last layer");
    Ok((loss, g))
}

/// The projector's gradients (image batches) through the embeddings, from d(loss)/d(embeddings).
fn projector_backward(embeds: &Tensor, g: &Tensor, vars: &[Var], grads: &mut [Option<Tensor>]) -> Result<()> {
    if embeds.track_op() {
        let store = backward_from(embeds, g)?;
        collect(grads, &store, vars)?;
    }
    Ok(())
}
