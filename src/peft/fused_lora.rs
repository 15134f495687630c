//! One op per LoRA linear on the GPU, with a hand-written backward (the idea of unsloth's fast
//! LoRA kernels): `y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ` as three cuBLAS GEMMs, the base's last,
//! accumulating into y, and the backward as `dX = g·W + drop'((s·g·B)·A)`, `dA = (s·g·B)ᵀ·drop(x)`,
//! `dB = s·gᵀ·(drop(x)·Aᵀ)`: five GEMMs, no weight gradient for the frozen W (NF4 dequantized for
//! each use, as the composed path does), the dropout mask kept as bits (1/16 of drop(x)) where the
//! forward may have a backward, so that the backward does not draw it again. The checkpointed recompute also keeps
//! the dequantized W and drop(x), since its backward follows within the same layer (one layer's
//! worth at a time; not where every layer's record waits for the backward, training without
//! checkpointing).
//! A and B are the bf16 working copies the optimizer refreshes once per step; their gradients come
//! back in bf16, as the composed path's do. The composed form in lora.rs is what the CPU runs and
//! what this op is tested against (tests/gpu.rs). It may round differently (the LoRA term is
//! added inside the last GEMM); on the H200 its outputs and gradients came out identical.

use crate::model::cublas::{bf16_address, gemm_bf16 as gemm, tensor_address};
use crate::peft::frozen::FrozenWeight;
use crate::peft::lora::Lora;
use crate::peft::nf4::cuda::grid;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use std::sync::Mutex;

type Bf16 = half::bf16;

/// The fused forward of `l` on x [.., in] (bf16, CUDA), or None where the composed form must run
/// (CPU, f32, an adapter without bf16 working copies, the switch off).
pub fn forward(
    base: &FrozenWeight,
    l: &Lora,
    x: &Tensor,
    dropout_seed: Option<u64>,
) -> candle_core::Result<Option<Tensor>> {
    let Some((wa, wb)) = &l.work else { return Ok(None) };
    if !x.device().is_cuda()
        || x.dtype() != DType::BF16
        || wa.dtype() != DType::BF16
        || !crate::fused_ops::allowed(crate::fused_ops::FusedOp::Lora)
    {
        return Ok(None);
    }
    let dropout = match dropout_seed {
        Some(seed) if l.dropout > 0.0 => Some((l.dropout, seed ^ l.stream)),
        _ => None,
    };
    CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let op = FusedLora {
        base: base.clone(),
        scale: l.scale as f32,
        dropout,
        u: Mutex::new(None),
        kept: Mutex::new(Kept::default()),
        bits: Mutex::new(None),
        keep_bits: KEEP_BITS.load(std::sync::atomic::Ordering::Relaxed)
            && !crate::model::tape::graphless()
            && !l.frozen
            && (crate::model::tape::recording() || x.track_op() || wa.track_op() || wb.track_op()),
        recorded: crate::model::tape::recording(),
    };
    // x keeps its shape ([.., in] -> [.., out]): a reshape would be one more graph node, and each
    // node costs a zero fill and an add in candle's backward
    if l.frozen {
        // answering (a prompt, or a batch wider than the NF4 GEMV takes): no graph
        return Ok(Some(x.contiguous()?.apply_op3_no_bwd(&wa.as_tensor().detach(), &wb.as_tensor().detach(), &op)?));
    }
    Ok(Some(crate::model::tape::run3(&x.contiguous()?, wa.as_tensor(), wb.as_tensor(), op)?))
}

thread_local! {
    static DX_INTO: std::cell::RefCell<Option<Tensor>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f`, a recorded LoRA linear's backward, with its input gradient added in place into `acc`
/// (bf16, contiguous, x's shape, held by nobody else) instead of written to a fresh tensor; the op
/// then returns `acc` itself. The gradient of an input read by several linears (q/k/v, gate/up)
/// is so summed inside their GEMMs (beta = 1): no separate add, and one rounding fewer.
pub fn backward_adding_into<T>(acc: Tensor, f: impl FnOnce() -> T) -> T {
    /// Clears the slot however `f` ends, a panic included.
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            DX_INTO.with(|d| d.borrow_mut().take());
        }
    }
    DX_INTO.with(|d| *d.borrow_mut() = Some(acc));
    let _clear = Clear;
    f()
}

static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static KEEP_BITS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether forwards keep their dropout mask as bits for the backward (the default) or leave the
/// backward to draw it again (tests hold the two to the same bits).
pub fn keep_mask_bits(on: bool) {
    KEEP_BITS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// How many fused LoRA forwards this process has run (tests check which path ran).
pub fn calls() -> usize {
    CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

struct FusedLora {
    base: FrozenWeight,
    scale: f32,
    /// (p, seed) of the inverted dropout on the LoRA branch's input
    dropout: Option<(f32, u64)>,
    /// drop(x)·Aᵀ [m, r] from the forward, for dB
    u: Mutex<Option<CudaSlice<Bf16>>>,
    /// From a recorded forward whose backward follows at once (the checkpointed recompute): the
    /// dequantized weight and drop(x), so that the backward neither dequantizes nor draws the mask
    /// again. Taken, and so freed, by the backward.
    kept: Mutex<Kept>,
    /// The dropout mask as bits, from a forward that may have a backward (not the graphless
    /// checkpointed first pass): the backward then applies it instead of drawing it twice more.
    bits: Mutex<Option<CudaSlice<u8>>>,
    keep_bits: bool,
    /// Run while recording: the hand-written layer backward wants d(x) although x, recorded
    /// without a graph, does not track (a tracking copy of x would cost a copy per linear).
    recorded: bool,
}

#[derive(Default)]
struct Kept {
    w: Option<(Tensor, u64)>,
    xd: Option<(CudaSlice<Bf16>, u64)>,
}

fn slice_ptr(s: &CudaSlice<Bf16>, dev: &CudaDevice) -> u64 {
    let stream = dev.cuda_stream();
    let p = s.device_ptr(&stream).0;
    p
}

/// One of nf4.cu's dropout kernels over `n` elements: [one element per thread, eight per thread].
fn dropout_kernel(
    dev: &CudaDevice,
    [name, name_x8]: [&str; 2],
    out: u64,
    input: u64,
    n: usize,
    (p, seed): (f32, u64),
) -> candle_core::Result<()> {
    use crate::peft::nf4::cuda::{MODULE, PTX};
    // eight elements per thread where the buffers allow it: the same masks, a quarter of the time
    let wide = wide(n, [out, input]);
    let f = dev.get_or_load_custom_func(if wide { name_x8 } else { name }, MODULE, PTX)?;
    let threads = if wide { n / 8 } else { n };
    let (n64, scale) = (threads as u64, 1.0 / (1.0 - p));
    let mut b = f.builder();
    b.arg(&out);
    b.arg(&input);
    b.arg(&seed);
    b.arg(&n64);
    b.arg(&p);
    b.arg(&scale);
    unsafe { b.launch(grid(threads)) }.w()?;
    Ok(())
}

/// The frozen weight [n, k] in bf16 (dequantized now for NF4) and its address; the tensor must
/// outlive the GEMMs that read it.
fn weight(base: &FrozenWeight) -> candle_core::Result<(Tensor, u64)> {
    let w = base.materialize(DType::BF16)?.contiguous()?;
    let p = tensor_address(&w, "fused LoRA: the frozen weight")?;
    Ok((w, p))
}

/// drop(x) into a fresh buffer, or x itself without dropout; with `keep_bits`, also the mask as
/// bits (n / 8 bytes) where the eight-wide kernel applies, for the backward.
fn dropped(
    dev: &CudaDevice,
    x: u64,
    n: usize,
    dropout: Option<(f32, u64)>,
    keep_bits: bool,
) -> candle_core::Result<(Option<CudaSlice<Bf16>>, u64, Option<CudaSlice<u8>>)> {
    let Some(d) = dropout else { return Ok((None, x, None)) };
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<Bf16>(n)? };
    let p = slice_ptr(&out, dev);
    if keep_bits && wide(n, [p, x]) {
        use crate::peft::nf4::cuda::{MODULE, PTX};
        // SAFETY: every byte is written by the kernel (one per eight elements).
        let bits = unsafe { dev.alloc::<u8>(n / 8)? };
        let f = dev.get_or_load_custom_func("dropout_apply_keep_bits_bf16_x8", MODULE, PTX)?;
        let (n8, scale) = ((n / 8) as u64, 1.0 / (1.0 - d.0));
        let mut b = f.builder();
        b.arg(&p).arg(&x).arg(&bits).arg(&d.1).arg(&n8).arg(&d.0).arg(&scale);
        unsafe { b.launch(grid(n / 8)) }.w()?;
        return Ok((Some(out), p, Some(bits)));
    }
    dropout_kernel(dev, ["dropout_apply_bf16", "dropout_apply_bf16_x8"], p, x, n, d)?;
    Ok((Some(out), p, None))
}

/// Whether the eight-wide kernels take `n` elements at these addresses.
fn wide(n: usize, ptrs: [u64; 2]) -> bool {
    n % 8 == 0 && ptrs.iter().all(|p| p % 16 == 0)
}

/// One of nf4.cu's kernels over a kept mask (`dropout_bits_apply_bf16_x8`: out = input · mask,
/// `dropout_bits_accumulate_bf16_x8`: out += input · mask) over n elements, eight per thread.
fn bits_kernel(
    dev: &CudaDevice,
    name: &str,
    out: u64,
    input: u64,
    bits: &CudaSlice<u8>,
    n: usize,
    p: f32,
) -> candle_core::Result<()> {
    use crate::peft::nf4::cuda::{MODULE, PTX};
    let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let (n8, scale) = ((n / 8) as u64, 1.0 / (1.0 - p));
    let mut b = f.builder();
    b.arg(&out).arg(&input).arg(bits).arg(&n8).arg(&scale);
    unsafe { b.launch(grid(n / 8)) }.w()?;
    Ok(())
}

/// Where a backward's input gradient goes: a fresh buffer, or added into a given sum.
enum Dx {
    Fresh(CudaSlice<Bf16>),
    Into(Tensor),
}

fn wrap(x: CudaSlice<Bf16>, dev: &CudaDevice, shape: &[usize]) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(x, dev.clone())),
        shape.to_vec(),
        BackpropOp::none(),
        false,
    )
}

impl CustomOp3 for FusedLora {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused LoRA linear runs on the GPU only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        a_s: &CudaStorage,
        al: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let k = *xl.dims().last().unwrap_or(&0);
        let m = xl.shape().elem_count() / k.max(1);
        let (r, ka) = al.shape().dims2()?;
        let (n, rb) = bl.shape().dims2()?;
        if (n, k) != self.base.shape() || ka != k || rb != r {
            candle_core::bail!(
                "fused LoRA: x [{m}, {k}], A [{r}, {ka}], B [{n}, {rb}] against W {:?}",
                self.base.shape()
            );
        }
        let dev = xs.device().clone();
        let (x, a, b) = (
            bf16_address(xs, xl, "fused LoRA: x")?,
            bf16_address(a_s, al, "fused LoRA: A")?,
            bf16_address(bs, bl, "fused LoRA: B")?,
        );
        let (wt, w) = weight(&self.base)?;
        // SAFETY: y and u are fully written by their GEMMs (beta = 0) before anything reads them.
        let y = unsafe { dev.alloc::<Bf16>(m * n)? };
        let u = unsafe { dev.alloc::<Bf16>(m * r)? };
        let (yp, up) = (slice_ptr(&y, &dev), slice_ptr(&u, &dev));
        let (xd_buf, xd, bits) = dropped(&dev, x, m * k, self.dropout, self.keep_bits)?;
        *self.bits.lock().unwrap_or_else(|p| p.into_inner()) = bits;
        gemm(&dev, up, xd, false, a, true, (m, r, k), 1.0, 0.0)?;
        // the LoRA term first, then the base GEMM adds it as C (beta = 1): the large GEMM reads C
        // in its epilogue almost for free, where adding the rank-r product last read and wrote y
        // once more (about 40 µs a call at batch 4 on an H200). At the 4B's shapes cuBLAS rounds
        // the product to bf16 before it adds C, so both orders give bf16(bf16(x·Wᵀ) + bf16(s·u·Bᵀ)),
        // the composed form's bits (tests/gpu.rs); kernels that add in f32 and round once may not
        // (the tiny model's bf16 loss moved by 3.5e-5 relative).
        gemm(&dev, yp, up, false, b, true, (m, n, r), self.scale, 0.0)?;
        gemm(&dev, yp, x, false, w, true, (m, n, k), 1.0, 1.0)?;
        *self.u.lock().unwrap_or_else(|p| p.into_inner()) = Some(u);
        if crate::model::tape::backward_follows() {
            let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            kept.w = Some((wt, w));
            kept.xd = xd_buf.map(|b| (b, xd));
        }
        let mut shape = xl.dims().to_vec();
        *shape.last_mut().expect("x has a last dim") = n;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let k = *x.dims().last().unwrap_or(&0);
        let m = x.elem_count() / k.max(1);
        let (r, _) = a.dims2()?;
        let (n, _) = b.dims2()?;
        let u = self.u.lock().unwrap_or_else(|p| p.into_inner());
        let Some(u) = u.as_ref() else { candle_core::bail!("fused LoRA: backward without its forward") };
        let Kept { w: kept_w, xd: kept_xd } = std::mem::take(&mut *self.kept.lock().unwrap_or_else(|p| p.into_inner()));
        // the mask stays with the op (a second backward through the same graph needs it again)
        let bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        let (xg, xl) = x.storage_and_layout();
        let (ag, al) = a.storage_and_layout();
        let (bg, bl) = b.storage_and_layout();
        let (gg, gl) = g.storage_and_layout();
        let (Storage::Cuda(xs), Storage::Cuda(a_s), Storage::Cuda(bs), Storage::Cuda(gs)) = (&*xg, &*ag, &*bg, &*gg)
        else {
            candle_core::bail!("fused LoRA: backward inputs not on the GPU")
        };
        let dev = xs.device().clone();
        let (xp, ap, bp, gp) = (
            bf16_address(xs, xl, "fused LoRA: x")?,
            bf16_address(a_s, al, "fused LoRA: A")?,
            bf16_address(bs, bl, "fused LoRA: B")?,
            bf16_address(gs, gl, "fused LoRA: the gradient")?,
        );
        let s = self.scale;
        // SAFETY: every buffer below is fully written by a GEMM with beta = 0 or a kernel before it is read.
        let gb = unsafe { dev.alloc::<Bf16>(m * r)? };
        let gbp = slice_ptr(&gb, &dev);
        gemm(&dev, gbp, gp, false, bp, false, (m, r, n), s, 0.0)?; // s·g·B [m, r]
        let db = if b.track_op() {
            let db = unsafe { dev.alloc::<Bf16>(n * r)? };
            gemm(&dev, slice_ptr(&db, &dev), gp, true, slice_ptr(u, &dev), false, (n, r, m), s, 0.0)?; // s·gᵀ·u
            Some(wrap(db, &dev, &[n, r]))
        } else {
            None
        };
        let da = if a.track_op() {
            // the forward's drop(x) where it was kept (x is the same tensor), else x times the kept
            // mask, else drawn again
            let (_xd, xd) = match (kept_xd, bits.as_ref(), self.dropout) {
                (Some((buf, p)), _, _) => (Some(buf), p),
                (None, Some(bits), Some((p, _))) if wide(m * k, [xp, xp]) => {
                    // SAFETY: every element is written by the kernel.
                    let xd = unsafe { dev.alloc::<Bf16>(m * k)? };
                    let xdp = slice_ptr(&xd, &dev);
                    bits_kernel(&dev, "dropout_bits_apply_bf16_x8", xdp, xp, bits, m * k, p)?;
                    (Some(xd), xdp)
                }
                _ => {
                    let (buf, p, _) = dropped(&dev, xp, m * k, self.dropout, false)?;
                    (buf, p)
                }
            };
            let da = unsafe { dev.alloc::<Bf16>(r * k)? };
            gemm(&dev, slice_ptr(&da, &dev), gbp, true, xd, false, (r, k, m), 1.0, 0.0)?; // (s·g·B)ᵀ·drop(x)
            Some(wrap(da, &dev, &[r, k]))
        } else {
            None
        };
        let dx = if x.track_op() || self.recorded {
            let (_w, w) = match kept_w {
                Some(kept) => kept,
                None => weight(&self.base)?,
            };
            let into = if self.recorded { DX_INTO.with(|d| d.borrow_mut().take()) } else { None };
            let (dx, dxp, beta) = match into {
                Some(acc) => {
                    if acc.dtype() != DType::BF16 || acc.dims() != x.dims() {
                        candle_core::bail!("fused LoRA: the gradient to add into is not bf16 of x's shape");
                    }
                    let p = tensor_address(&acc, "fused LoRA: the gradient to add into")?;
                    (Dx::Into(acc), p, 1.0)
                }
                None => {
                    // SAFETY: fully written by the GEMM below (beta = 0).
                    let dx = unsafe { dev.alloc::<Bf16>(m * k)? };
                    let p = slice_ptr(&dx, &dev);
                    (Dx::Fresh(dx), p, 0.0)
                }
            };
            gemm(&dev, dxp, gp, false, w, false, (m, k, n), 1.0, beta)?; // g·W (+ the sum so far)
            match self.dropout {
                None => gemm(&dev, dxp, gbp, false, ap, false, (m, k, r), 1.0, 1.0)?, // += (s·g·B)·A
                Some(d) => {
                    let t = unsafe { dev.alloc::<Bf16>(m * k)? };
                    let tp = slice_ptr(&t, &dev);
                    gemm(&dev, tp, gbp, false, ap, false, (m, k, r), 1.0, 0.0)?;
                    match bits.as_ref() {
                        Some(bits) if wide(m * k, [dxp, tp]) => {
                            bits_kernel(&dev, "dropout_bits_accumulate_bf16_x8", dxp, tp, bits, m * k, d.0)?
                        }
                        _ => dropout_kernel(
                            &dev,
                            ["dropout_accumulate_bf16", "dropout_accumulate_bf16_x8"],
                            dxp,
                            tp,
                            m * k,
                            d,
                        )?,
                    }
                }
            }
            Some(match dx {
                Dx::Fresh(dx) => wrap(dx, &dev, x.dims()),
                Dx::Into(acc) => acc,
            })
        } else {
            None
        };
        Ok((dx, da, db))
    }
}
