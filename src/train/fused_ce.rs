//! The loss on the GPU as one op each way (kernels/cross_entropy.cu): per supervised row,
//! `scale·(logsumexp(logits) - logits[target])` straight from the lm_head's bf16 logits [N, V],
//! and in the backward `scale·(softmax - onehot)` written once in bf16. The composed form in
//! step.rs (f32 logits, max, shift, exp, sum, log, gather, each with its backward) holds about ten
//! [N, 262208] f32 tensors at its peak; this one holds the bf16 gradient. Tested against the
//! composed form in tests/gpu.rs.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use std::sync::Mutex;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx"));
const MODULE: &str = "gemmaclip_cross_entropy";
const THREADS: u32 = 1024;

/// Per-row losses [N] f32 of logits [N, V] (bf16, contiguous) against `targets` [N] u32, times
/// `scale`; recorded for the backward.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let op = CrossEntropy { targets: targets.contiguous()?, scale: scale as f32, lse: Mutex::new(None) };
    logits.contiguous()?.apply_op1(op)
}

/// The summed loss (f32 scalar) of hidden rows [N, H] (bf16, no graph) through the final norm, the
/// tied lm_head and the cross-entropy against `targets`, times `scale`, and d(loss)/d(rows), each
/// op's backward called by hand: candle's autograd would add the [N, 262208] logits gradient into a
/// zero-filled tensor of its size (about 0.34 ms and 134 MB per 256 rows on an H200) and pad each
/// chunk's row gradient to all rows with zeros. The same ops and kernels, so the same bits.
pub fn head_loss_and_grad(
    llm: &crate::model::gemma3::Gemma3Text,
    rows: &Tensor,
    targets: &Tensor,
    scale: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    use crate::model::tape::{record, Entry};
    let (logits, tape) = record(|| llm.head_logits(rows))?;
    let [Entry::One { op: norm, x, y }] = &tape[..] else {
        candle_core::bail!("the final norm did not run as one fused op")
    };
    let op = CrossEntropy { targets: targets.contiguous()?, scale: scale as f32, lse: Mutex::new(None) };
    let logits = logits.contiguous()?;
    let per_row = logits.apply_op1_no_bwd(&op)?;
    let ones = Tensor::ones(per_row.dims(), DType::F32, per_row.device())?;
    let Some(d_logits) = op.bwd(&logits, &per_row, &ones)? else { candle_core::bail!("cross-entropy: no gradient") };
    let w = llm.lm_head().materialize(d_logits.dtype())?;
    let d_normed = d_logits.matmul(&w)?;
    let Some(d_rows) = norm.bwd(x, y, &d_normed)? else { candle_core::bail!("final norm: no gradient") };
    Ok((per_row.sum_all()?, d_rows))
}

struct CrossEntropy {
    targets: Tensor,
    scale: f32,
    /// each row's log-sum-exp, from the forward
    lse: Mutex<Option<CudaSlice<f32>>>,
}

fn targets_view<'a>(
    t: &'a Storage,
    l: &Layout,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>> {
    let Storage::Cuda(s) = t else { candle_core::bail!("cross-entropy: targets not on the GPU") };
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("cross-entropy: targets not contiguous") };
    Ok(s.as_cuda_slice::<u32>()?.slice(a..b))
}

fn rows_grid(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("cross-entropy: the CPU path is composed")
    }
    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, vocab) = l.shape().dims2()?;
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("cross-entropy: logits not contiguous") };
        if x.dtype() != DType::BF16 || self.targets.dims() != [n] {
            candle_core::bail!("cross-entropy: bf16 logits [N, V] and N targets");
        }
        let dev = x.device().clone();
        let logits = x.as_cuda_slice::<half::bf16>()?.slice(a..b);
        let (ts, tl) = self.targets.storage_and_layout();
        let targets = targets_view(&ts, tl)?;
        // SAFETY: one block per row writes both.
        let (loss, lse) = unsafe { (dev.alloc::<f32>(n)?, dev.alloc::<f32>(n)?) };
        let f = dev.get_or_load_custom_func("ce_fwd_bf16", MODULE, PTX)?;
        let (v64, scale) = (vocab as u64, self.scale);
        let mut bld = f.builder();
        bld.arg(&logits);
        bld.arg(&targets);
        bld.arg(&loss);
        bld.arg(&lse);
        bld.arg(&v64);
        bld.arg(&scale);
        unsafe { bld.launch(rows_grid(n)) }.w()?;
        *self.lse.lock().unwrap_or_else(|p| p.into_inner()) = Some(lse);
        Ok((CudaStorage::wrap_cuda_slice(loss, dev), Shape::from(n)))
    }
    fn bwd(&self, x: &Tensor, _loss: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let lse = self.lse.lock().unwrap_or_else(|p| p.into_inner());
        let Some(lse) = lse.as_ref() else { candle_core::bail!("cross-entropy: backward without its forward") };
        let (n, vocab) = x.dims2()?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (ts, tl) = self.targets.storage_and_layout();
        let (Storage::Cuda(xs), Storage::Cuda(gs)) = (&*xs, &*gs) else {
            candle_core::bail!("cross-entropy: backward inputs not on the GPU")
        };
        let (Some((x0, x1)), Some((g0, g1))) = (xl.contiguous_offsets(), gl.contiguous_offsets()) else {
            candle_core::bail!("cross-entropy: backward inputs not contiguous")
        };
        let dev = xs.device().clone();
        let logits = xs.as_cuda_slice::<half::bf16>()?.slice(x0..x1);
        let gv = gs.as_cuda_slice::<f32>()?.slice(g0..g1);
        let targets = targets_view(&ts, tl)?;
        // SAFETY: every element is written by the kernel.
        let dx = unsafe { dev.alloc::<half::bf16>(n * vocab)? };
        let f = dev.get_or_load_custom_func("ce_bwd_bf16", MODULE, PTX)?;
        let (v64, scale) = (vocab as u64, self.scale);
        let mut bld = f.builder();
        bld.arg(&logits);
        bld.arg(&targets);
        bld.arg(lse);
        bld.arg(&gv);
        bld.arg(&dx);
        bld.arg(&v64);
        bld.arg(&scale);
        unsafe { bld.launch(rows_grid(n)) }.w()?;
        let st = Storage::Cuda(CudaStorage::wrap_cuda_slice(dx, dev));
        Ok(Some(Tensor::from_storage(st, (n, vocab), BackpropOp::none(), false)))
    }
}
