//! The optimizer step on the GPU in four launches (kernels/optimizer.cu): the squared gradient
//! norm over every tensor, its square root and the clipping factor, and AdamW over every tensor,
//! in place. The composed path in `optimizer.rs` (what the CPU runs) is the reference it is
//! tested against (tests/gpu.rs).

use anyhow::{bail, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, DType, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optimizer.ptx"));
const MODULE: &str = "gemmaclip_optimizer";
const THREADS: u32 = 256;
/// Blocks of the grid-stride kernels: enough to fill an H100/H200 several times over; fixed, so the
/// order of the norm's partial sums never changes.
const BLOCKS: u32 = 1024;

/// The pointer table of the optimizer's tensors on one device, uploaded once per step:
/// [params][grads][exp_avg][exp_avg_sq][work or 0][grad is bf16][offsets (n + 1)]. Each tensor
/// must be contiguous and stay alive (and unmoved) while the table is used.
pub struct Table {
    table: CudaSlice<u64>,
    n: u32,
}

/// The device address of a contiguous f32 or bf16 tensor's first element.
fn ptr(t: &Tensor, dev: &CudaDevice) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, _)) = layout.contiguous_offsets() else { bail!("the fused optimizer takes contiguous tensors") };
    let Storage::Cuda(s) = &*storage else { bail!("the fused optimizer runs on CUDA tensors") };
    let stream = dev.cuda_stream();
    let base = match t.dtype() {
        DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::BF16 => s.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        other => bail!("the fused optimizer takes f32 or bf16 tensors, got {other:?}"),
    };
    Ok(base + (start * t.dtype().size_in_bytes()) as u64)
}

/// One trainable tensor: the f32 parameter, its gradient (f32 or bf16), the moments, and the
/// bf16 working copy the forward reads, if any.
pub struct Row<'a> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub work: Option<&'a Tensor>,
}

impl Table {
    pub fn new(rows: &[Row], dev: &CudaDevice) -> Result<Self> {
        let n = rows.len();
        let mut t = vec![0u64; 7 * n + 1];
        let mut offset = 0u64;
        for (i, r) in rows.iter().enumerate() {
            let p = r.param;
            let same = |x: &Tensor| x.dims() == p.dims();
            if !(same(r.grad) && same(r.m) && same(r.v) && r.work.is_none_or(same)) {
                bail!("the fused optimizer's tensors disagree in shape: {:?}", p.dims());
            }
            if p.dtype() != DType::F32 || r.m.dtype() != DType::F32 || r.v.dtype() != DType::F32 {
                bail!("the fused optimizer keeps f32 parameters and moments");
            }
            if r.work.is_some_and(|w| w.dtype() != DType::BF16) {
                bail!("the fused optimizer's working copies are bf16");
            }
            for (col, x) in [p, r.grad, r.m, r.v].into_iter().enumerate() {
                t[col * n + i] = ptr(x, dev)?;
            }
            t[4 * n + i] = r.work.map(|w| ptr(w, dev)).transpose()?.unwrap_or(0);
            t[5 * n + i] = (r.grad.dtype() == DType::BF16) as u64;
            t[6 * n + i] = offset;
            offset += p.elem_count() as u64;
        }
        t[7 * n] = offset;
        let table = dev.clone_htod(&t)?;
        Ok(Self { table, n: n as u32 })
    }
}

fn grid() -> LaunchConfig {
    LaunchConfig { grid_dim: (BLOCKS, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// The global L2 norm of the table's gradients and the clipping factor for `max_norm`, as a
/// 2-element f32 tensor on the device: [norm, min(1, max_norm / (norm + 1e-6))].
pub fn norm_and_clip(table: &Table, max_norm: f64, dev: &CudaDevice) -> Result<Tensor> {
    let slice = &table.table;
    let partials = dev.alloc_zeros::<f32>(BLOCKS as usize)?;
    let out = dev.alloc_zeros::<f32>(2)?;
    let f = dev.get_or_load_custom_func("multi_sumsq_f32", MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(slice);
    b.arg(&table.n);
    b.arg(&partials);
    unsafe { b.launch(grid()) }.w()?;
    let f = dev.get_or_load_custom_func("multi_norm_finish_f32", MODULE, PTX)?;
    let mut b = f.builder();
    let (blocks, max_norm) = (BLOCKS, max_norm.min(f32::MAX as f64) as f32);
    b.arg(&partials);
    b.arg(&blocks);
    b.arg(&max_norm);
    b.arg(&out);
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    unsafe { b.launch(one) }.w()?;
    let storage = candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone());
    Ok(Tensor::from_storage(Storage::Cuda(storage), 2, candle_core::op::BackpropOp::none(), false))
}

/// The scalars of one AdamW update.
pub struct AdamWScalars {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates done, this one included.
    pub step: u64,
}

/// AdamW over every tensor of the table, in place, with the clipping factor of `norm_and_clip`.
pub fn adamw(table: &Table, norm_and_clip: &Tensor, s: &AdamWScalars, dev: &CudaDevice) -> Result<()> {
    let slice = &table.table;
    let (storage, _) = norm_and_clip.storage_and_layout();
    let Storage::Cuda(nc) = &*storage else { bail!("the clipping factor lives on the GPU") };
    let nc = nc.as_cuda_slice::<f32>()?;
    let bc1 = 1.0 - s.beta1.powi(s.step as i32);
    let bc2 = 1.0 - s.beta2.powi(s.step as i32);
    // each scalar rounded to f32 from its f64 value, as candle's scalar ops round theirs
    let args: [f32; 9] = [
        s.lr as f32,
        s.beta1 as f32,
        (1.0 - s.beta1) as f32,
        s.beta2 as f32,
        (1.0 - s.beta2) as f32,
        s.eps as f32,
        (1.0 - s.lr * s.weight_decay) as f32,
        (1.0 / bc1) as f32,
        (1.0 / bc2) as f32,
    ];
    let f = dev.get_or_load_custom_func("multi_adamw_f32", MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(slice);
    b.arg(&table.n);
    b.arg(nc);
    for a in &args {
        b.arg(a);
    }
    unsafe { b.launch(grid()) }.w()?;
    Ok(())
}

/// Gradient accumulation on the GPU: one f32 buffer per trainable tensor, kept for the whole run,
/// and one launch per micro-batch that widens and adds every gradient into it (instead of a cast
/// and an add per tensor). The sums are the same f32 additions in the same order as the composed
/// `acc + g`, so the result is bit-identical. The buffers are views of one flat buffer, which a
/// data-parallel run reduces across ranks in one collective.
pub struct Accumulator {
    flat: Tensor,
    acc: Vec<Tensor>,
    /// Whether the tensor got a gradient in this step yet (a text-only micro-batch gives the
    /// projector none).
    written: Vec<bool>,
}

impl Accumulator {
    /// Buffers shaped like `params` (f32).
    pub fn new(params: &[&Tensor]) -> Result<Self> {
        let Some(first) = params.first() else { bail!("no trainable tensors") };
        let total: usize = params.iter().map(|p| p.elem_count()).sum();
        let flat = Tensor::zeros(total, DType::F32, first.device())?;
        let acc = crate::dist::comm::views(&flat, params)?;
        let written = vec![false; acc.len()];
        Ok(Self { flat, acc, written })
    }

    /// Which tensors got a gradient in this step so far.
    pub fn written(&self) -> &[bool] {
        &self.written
    }

    /// Zeros for the tensors `want` names that got no gradient in this step (so a reduction
    /// across ranks adds nothing stale for them).
    pub fn fill_missing(&mut self, want: &[bool], dev: &CudaDevice) -> Result<()> {
        let zeros: Vec<Option<Tensor>> = self
            .acc
            .iter()
            .zip(want.iter().zip(&self.written))
            .map(|(a, (&w, &done))| if w && !done { a.zeros_like().map(Some) } else { Ok(None) })
            .collect::<candle_core::Result<_>>()?;
        self.add(&zeros, dev)
    }

    /// The whole flat buffer (every tensor's sum, in order), and a fresh start for the next step.
    pub fn take_flat(&mut self) -> Tensor {
        self.written.iter_mut().for_each(|w| *w = false);
        self.flat.clone()
    }

    /// The stretch of the flat buffer that the consecutive tensors `which` hold.
    pub fn stretch(&self, which: &[usize]) -> Result<Tensor> {
        let (Some(&first), Some(&last)) = (which.first(), which.last()) else { bail!("no tensors") };
        if which.windows(2).any(|w| w[1] != w[0] + 1) || last >= self.acc.len() {
            bail!("tensors {which:?} are not one stretch of the {} accumulators", self.acc.len());
        }
        let start: usize = self.acc[..first].iter().map(|a| a.elem_count()).sum();
        let len: usize = self.acc[first..=last].iter().map(|a| a.elem_count()).sum();
        Ok(self.flat.narrow(0, start, len)?)
    }

    /// The sums of the tensors `has` names (the buffers themselves, summed over the ranks in
    /// place), and a fresh start for the next step.
    pub fn take_summed(&mut self, has: &[bool]) -> Vec<Option<Tensor>> {
        self.written.iter_mut().for_each(|w| *w = false);
        self.acc.iter().zip(has).map(|(a, &h)| h.then(|| a.clone())).collect()
    }

    /// Adds one micro-batch's gradients (f32 or bf16; None where the batch does not reach).
    pub fn add(&mut self, grads: &[Option<Tensor>], dev: &CudaDevice) -> Result<()> {
        if grads.len() != self.acc.len() {
            bail!("{} gradients for {} accumulators", grads.len(), self.acc.len());
        }
        let present: Vec<(usize, Tensor)> = grads
            .iter()
            .enumerate()
            .filter_map(|(i, g)| g.as_ref().map(|g| (i, g)))
            .map(|(i, g)| {
                let g = if matches!(g.dtype(), DType::F32 | DType::BF16) {
                    g.contiguous()?
                } else {
                    g.to_dtype(DType::F32)?
                };
                Ok((i, g))
            })
            .collect::<Result<_>>()?;
        let n = present.len();
        if n == 0 {
            return Ok(());
        }
        let mut t = vec![0u64; 5 * n + 1];
        let mut offset = 0u64;
        for (k, (i, g)) in present.iter().enumerate() {
            let acc = &self.acc[*i];
            if g.dims() != acc.dims() {
                bail!("a gradient of shape {:?} for a tensor of shape {:?}", g.dims(), acc.dims());
            }
            t[k] = ptr(acc, dev)?;
            t[n + k] = ptr(g, dev)?;
            t[2 * n + k] = (g.dtype() == DType::BF16) as u64;
            t[3 * n + k] = !self.written[*i] as u64;
            t[4 * n + k] = offset;
            offset += acc.elem_count() as u64;
        }
        t[5 * n] = offset;
        let table = dev.clone_htod(&t)?;
        let f = dev.get_or_load_custom_func("multi_accumulate_f32", MODULE, PTX)?;
        let n32 = n as u32;
        let mut b = f.builder();
        b.arg(&table);
        b.arg(&n32);
        // `present` keeps the (possibly converted) gradients alive until the launch is queued;
        // their memory is freed in stream order after it
        unsafe { b.launch(grid()) }.w()?;
        for (i, _) in &present {
            self.written[*i] = true;
        }
        Ok(())
    }

    /// The step's summed gradients (the buffers themselves: use them before the next `add`),
    /// and a fresh start for the next step.
    pub fn take(&mut self) -> Vec<Option<Tensor>> {
        let out = self.acc.iter().zip(&self.written).map(|(a, &w)| w.then(|| a.clone())).collect();
        self.written.iter_mut().for_each(|w| *w = false);
        out
    }
}
