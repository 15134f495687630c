//! NF4 in bitsandbytes' layout (bitsandbytes' functional.py quantize_4bit): blocks of 64 values, one f32 absmax per block,
//! each value the index of the nearest of 16 code values, element 2i in the high nibble of byte i.
//! Quantization follows bitsandbytes' reference (`backends/default/ops.py`) operation by
//! operation, so the packed bytes and absmax are identical; CPU (rayon) and CUDA kernels agree.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

pub const BLOCK: usize = 64;

/// bitsandbytes' `get_4bit_type("nf4")`, as f32.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

fn midpoints() -> [f32; 15] {
    std::array::from_fn(|k| (NF4_CODE[k] + NF4_CODE[k + 1]) / 2.0)
}

/// torch.bucketize(x, midpoints), right=False: the number of midpoints strictly below x.
#[inline]
fn index(x: f32, mid: &[f32; 15]) -> u8 {
    mid.iter().filter(|&&m| m < x).count() as u8
}

/// Quantizes row-major values: (packed bytes [ceil(n/2)], absmax [ceil(n/BLOCK)]). A trailing
/// partial block gets its own absmax and, as in bitsandbytes, is scaled by division.
pub fn quantize_cpu(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mid = midpoints();
    let n = values.len();
    let full = n / BLOCK * BLOCK;
    let mut absmax: Vec<f32> = values.par_chunks(BLOCK).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
    let mut scaled = vec![0f32; n.div_ceil(2) * 2];
    scaled[..full].par_chunks_mut(BLOCK).zip(values[..full].par_chunks(BLOCK)).zip(&absmax).for_each(
        |((s, v), &am)| {
            let inv = 1.0f32 / am.max(1e-38);
            for (s, v) in s.iter_mut().zip(v) {
                *s = (v * inv).clamp(-1.0, 1.0);
            }
        },
    );
    if full < n {
        let am = absmax[full / BLOCK].max(1e-38);
        absmax[full / BLOCK] = am;
        for i in full..n {
            scaled[i] = (values[i] / am).clamp(-1.0, 1.0);
        }
    }
    let packed = scaled.par_chunks(2).map(|p| (index(p[0], &mid) << 4) | index(p[1], &mid)).collect();
    (packed, absmax)
}

/// Dequantizes to f32 as bitsandbytes does: code[idx] * absmax, in f32.
pub fn dequantize_cpu(packed: &[u8], absmax: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, chunk)| {
        let s = absmax[b];
        for (j, o) in chunk.iter_mut().enumerate() {
            let i = b * BLOCK + j;
            let byte = packed[i / 2];
            let code = if i.is_multiple_of(2) { byte >> 4 } else { byte & 0xF };
            *o = NF4_CODE[code as usize] * s;
        }
    });
    out
}

/// The most activation rows the NF4 GEMV takes. Its kernel runs up to 8, but on an H200 a decode
/// step of 8 rows took 12.8 ms through it against 9.1 ms for 32 rows through the dequantized base and
/// cuBLAS (generate keeps the base dequantized above this).
pub const GEMV_MAX_ROWS: usize = 4;

/// A frozen matrix in NF4: packed u8 [n/2] and absmax f32 [n/64] on the compute device.
#[derive(Clone, Debug)]
pub struct Nf4Weight {
    pub packed: Tensor,
    pub absmax: Tensor,
    /// [out, in]
    pub shape: (usize, usize),
    /// While answering a batch too wide for the GEMV: the weight dequantized once for the whole
    /// generation instead of once per use (`Gemma3Text::keep_dequantized`).
    resident: Arc<Mutex<Option<Tensor>>>,
}

impl Nf4Weight {
    /// Quantizes a weight [out, in] (bf16 or f32) on its own device; the input can be dropped after.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let (o, i) = w.dims2()?;
        let n = o * i;
        if n % BLOCK != 0 {
            bail!("NF4 needs a multiple of {BLOCK} elements, got a [{o}, {i}] matrix");
        }
        let dev = w.device().clone();
        if dev.is_cpu() {
            let v = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let (packed, absmax) = quantize_cpu(&v);
            return Ok(Self {
                packed: Tensor::from_vec(packed, n / 2, &dev)?,
                absmax: Tensor::from_vec(absmax, n / BLOCK, &dev)?,
                shape: (o, i),
                resident: Arc::default(),
            });
        }
        let w = match w.dtype() {
            DType::BF16 | DType::F32 => w.flatten_all()?.contiguous()?,
            _ => w.flatten_all()?.to_dtype(DType::F32)?,
        };
        // max |x| per block is exact in any order, so candle's reduction gives bitsandbytes' absmax.
        let absmax = w.reshape((n / BLOCK, BLOCK))?.abs()?.max(1)?.to_dtype(DType::F32)?.contiguous()?;
        let packed = w.apply_op2_no_bwd(&absmax, &Nf4Quantize)?;
        Ok(Self { packed, absmax, shape: (o, i), resident: Arc::default() })
    }

    /// The weight [out, in] in `dtype` (bf16 or f32), freshly materialised (or the resident copy).
    pub fn dequantize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        if let Some(t) = self.resident.lock().expect("resident weight lock").as_ref().filter(|t| t.dtype() == dtype) {
            return Ok(t.clone());
        }
        self.packed.apply_op2_no_bwd(&self.absmax, &Nf4Dequantize { shape: self.shape, dtype })
    }

    pub fn bytes(&self) -> usize {
        self.packed.elem_count() + 4 * self.absmax.elem_count()
    }

    /// Keeps the weight dequantized in `dtype` until `release_dequantized` (dequantized exactly as
    /// on every use, so nothing changes but the time).
    pub fn keep_dequantized(&self, dtype: DType) -> candle_core::Result<()> {
        let t = self.dequantize(dtype)?;
        *self.resident.lock().expect("resident weight lock") = Some(t);
        Ok(())
    }

    pub fn release_dequantized(&self) {
        *self.resident.lock().expect("resident weight lock") = None;
    }

    /// Whether `gemv` takes x [M, in]: bf16 on the GPU, M <= GEMV_MAX_ROWS, and GEMMACLIP_NO_NF4_GEMV unset.
    pub fn gemv_applies(&self, x: &Tensor) -> bool {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let off = *OFF.get_or_init(|| std::env::var_os("GEMMACLIP_NO_NF4_GEMV").is_some());
        let Ok((m, k)) = x.dims2() else { return false };
        cfg!(feature = "cuda")
            && !off
            && x.device().is_cuda()
            && x.dtype() == DType::BF16
            && m <= GEMV_MAX_ROWS
            && k == self.shape.1
            && k % 64 == 0
    }

    /// x [M, in] -> x W^T [M, out] read straight from NF4 (the decode fast path), plus an unmerged
    /// LoRA term `scale * h B^T` when `lora` = (h [M, r], B [out, r], scale) is given (bf16, h =
    /// x A^T), in the same pass. None where `gemv_applies` says no.
    pub fn gemv(&self, x: &Tensor, lora: Option<(&Tensor, &Tensor, f64)>) -> candle_core::Result<Option<Tensor>> {
        if !self.gemv_applies(x) {
            return Ok(None);
        }
        #[cfg(feature = "cuda")]
        {
            let lora = match lora {
                Some((h, b, s)) => Some((h.contiguous()?, b.contiguous()?, half::bf16::from_f64(s).to_f32())),
                None => None,
            };
            let op = cuda::Gemv { n: self.shape.0, lora };
            Ok(Some(x.contiguous()?.apply_op3_no_bwd(&self.packed, &self.absmax, &op)?))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = lora;
            Ok(None)
        }
    }
}

/// Whether the LoRA down-projection kernel takes x [M, K] and A [R, K] (bf16 on the GPU, M <= 8).
#[cfg(feature = "cuda")]
fn lora_down_applies(x: &Tensor, a: &Tensor) -> candle_core::Result<bool> {
    let (m, k) = x.dims2()?;
    Ok(x.device().is_cuda()
        && x.dtype() == DType::BF16
        && a.dtype() == DType::BF16
        && m <= 8
        && k % 8 == 0
        && a.dim(1)? == k
        && crate::fused_ops::allowed(crate::fused_ops::FusedOp::Lora))
}

/// The LoRA down projection `x·Aᵀ` of a few rows (x [M, in], A [r, in], bf16): one kernel on the
/// GPU for M <= 8 (cuBLAS took about as long per call as the NF4 GEMV of a whole projection),
/// else candle's matmul. Off with `GEMMACLIP_COMPOSED=lora`.
pub fn lora_down(x: &Tensor, a: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if lora_down_applies(x, a)? {
        return x.contiguous()?.apply_op2_no_bwd(&a.contiguous()?, &cuda::LoraDown { part: None });
    }
    x.matmul(&a.t()?)
}

/// Several adapters' down projections of the same rows in one launch: `a` stacks their A
/// matrices ([parts·r, K]), the result is [parts, M, r] (part p = x·A_pᵀ, as `lora_down` computes
/// it). None where `lora_down`'s kernel does not apply.
pub fn lora_down_parts(x: &Tensor, a: &Tensor, r: usize) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if r > 0 && a.dim(0)? % r == 0 && lora_down_applies(x, a)? {
        return Ok(Some(x.contiguous()?.apply_op2_no_bwd(&a.contiguous()?, &cuda::LoraDown { part: Some(r) })?));
    }
    let _ = (x, a, r);
    Ok(None)
}

/// (weight bf16/f32 [n], absmax f32 [n/64]) -> packed u8 [n/2]. CUDA only; the CPU path calls
/// `quantize_cpu` directly.
struct Nf4Quantize;

impl CustomOp2 for Nf4Quantize {
    fn name(&self) -> &'static str {
        "nf4-quantize"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("nf4-quantize: the CPU path is quantize_cpu")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::quantize(w, wl, a, al)
    }
}

/// (packed u8 [n/2], absmax f32 [n/64]) -> weight [out, in] in bf16 or f32.
struct Nf4Dequantize {
    shape: (usize, usize),
    dtype: DType,
}

impl CustomOp2 for Nf4Dequantize {
    fn name(&self) -> &'static str {
        "nf4-dequantize"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        a: &CpuStorage,
        al: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some((q0, q1)), Some((a0, a1))) = (ql.contiguous_offsets(), al.contiguous_offsets()) else {
            candle_core::bail!("nf4-dequantize: inputs must be contiguous")
        };
        let n = self.shape.0 * self.shape.1;
        let v = dequantize_cpu(&q.as_slice::<u8>()?[q0..q1], &a.as_slice::<f32>()?[a0..a1], n);
        let out = match self.dtype {
            DType::F32 => CpuStorage::F32(v),
            DType::BF16 => CpuStorage::BF16(v.par_iter().map(|&x| half::bf16::from_f32(x)).collect()),
            d => candle_core::bail!("nf4-dequantize: unsupported output dtype {d:?}"),
        };
        Ok((out, Shape::from(self.shape)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::dequantize(q, ql, a, al, self.shape.0 * self.shape.1, self.dtype)?;
        Ok((out, Shape::from(self.shape)))
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use super::BLOCK;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Shape};

    pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx"));
    pub const MODULE: &str = "gemmaclip_nf4";

    /// n threads in blocks of 256.
    pub(crate) fn grid(n: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: ((n as u32).div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    fn offsets(l: &Layout) -> candle_core::Result<(usize, usize)> {
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("nf4: inputs must be contiguous".into()))
    }

    pub fn quantize(
        w: &CudaStorage,
        wl: &Layout,
        a: &CudaStorage,
        al: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = w.device().clone();
        let ((w0, w1), (a0, a1)) = (offsets(wl)?, offsets(al)?);
        let n = w1 - w0;
        let n_bytes = n / 2;
        let out = unsafe { dev.alloc::<u8>(n_bytes)? };
        let abs = a.as_cuda_slice::<f32>()?.slice(a0..a1);
        let name = match w.dtype() {
            DType::BF16 => "nf4_quantize_bf16",
            DType::F32 => "nf4_quantize_f32",
            d => candle_core::bail!("nf4-quantize: unsupported dtype {d:?}"),
        };
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let mut b = func.builder();
        let ws_bf;
        let ws_f;
        match w.dtype() {
            DType::BF16 => {
                ws_bf = w.as_cuda_slice::<half::bf16>()?.slice(w0..w1);
                b.arg(&ws_bf);
            }
            _ => {
                ws_f = w.as_cuda_slice::<f32>()?.slice(w0..w1);
                b.arg(&ws_f);
            }
        }
        b.arg(&abs);
        b.arg(&out);
        let (nb, blk) = (n_bytes as u32, BLOCK as u32);
        b.arg(&nb);
        b.arg(&blk);
        unsafe { b.launch(grid(n_bytes)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n_bytes)))
    }

    /// The device's streaming multiprocessors (132 on an H100/H200 SXM).
    fn sm_count(dev: &candle_core::CudaDevice) -> candle_core::Result<u32> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
        let n =
            dev.cuda_stream().context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).w()?;
        Ok(n.max(1) as u32)
    }

    /// The batch-1 GEMV kernels of nf4.cu.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Gemv1 {
        /// nf4_gemv1_fast{1,2}_bf16: FMAs, one or two rows per warp
        Fast(u32),
        /// nf4_gemv1_piped_bf16: a fixed grid whose warps load their next row while computing
        Piped,
    }

    /// The batch-1 kernel for [n, k] (`wpr` warps per row) with a LoRA term of rank `r` (0: none):
    /// the pipelined one with an adapter where its limits allow, the one/two-row one otherwise.
    /// Measured on an H200 (4B decode, 2026-11-28): with an r=64 adapter 182 tokens/s pipelined
    /// against 176; without one 226.7 one/two-row against 215.5 pipelined.
    /// `GEMMACLIP_GEMV=1|2|piped` overrides, for measuring (a kernel that cannot take the
    /// shape falls back to the one/two-row one).
    fn gemv1_kernel(n: usize, k: usize, wpr: usize, r: usize) -> Gemv1 {
        static CHOICE: std::sync::OnceLock<Option<Gemv1>> = std::sync::OnceLock::new();
        let forced = *CHOICE.get_or_init(|| match std::env::var("GEMMACLIP_GEMV").ok()?.as_str() {
            "1" => Some(Gemv1::Fast(1)),
            "2" => Some(Gemv1::Fast(2)),
            "piped" => Some(Gemv1::Piped),
            _ => None,
        });
        let piped_fits = k <= 4096 * wpr && (r == 0 || (r <= 64 && r % 2 == 0));
        let by_size = Gemv1::Fast(if n * wpr / 16 >= 264 { 2 } else { 1 });
        match forced {
            Some(Gemv1::Piped) if piped_fits => Gemv1::Piped,
            None if piped_fits && r > 0 => Gemv1::Piped,
            Some(Gemv1::Piped) | None => by_size,
            Some(g) => g,
        }
    }

    /// (x bf16 [M, K], packed, absmax) -> [M, N] bf16, with the LoRA term of (h [M, r], B [N, r],
    /// scale rounded to bf16) when given.
    pub struct Gemv {
        pub n: usize,
        pub lora: Option<(candle_core::Tensor, candle_core::Tensor, f32)>,
    }

    impl candle_core::CustomOp3 for Gemv {
        fn name(&self) -> &'static str {
            "nf4-gemv"
        }
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("nf4-gemv is GPU only")
        }
        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            q: &CudaStorage,
            ql: &Layout,
            a: &CudaStorage,
            al: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let ((x0, x1), (q0, q1), (a0, a1)) = (offsets(xl)?, offsets(ql)?, offsets(al)?);
            let (m, k) = xl.shape().dims2()?;
            if x0 % 8 != 0 || q0 % 16 != 0 {
                candle_core::bail!("nf4-gemv: misaligned input");
            }
            let xs = x.as_cuda_slice::<half::bf16>()?.slice(x0..x1);
            let qs = q.as_cuda_slice::<u8>()?.slice(q0..q1);
            let abs = a.as_cuda_slice::<f32>()?.slice(a0..a1);
            let out = unsafe { dev.alloc::<half::bf16>(m * self.n)? };
            // more warps per row where K is long, so that short-N long-K rows (down_proj) still fill the GPU
            let wpr: i32 = match k {
                k if k >= 8192 => 4,
                k if k >= 4096 => 2,
                _ => 1,
            };
            let (mi, ni, ki) = (m as i32, self.n as i32, k as i32);
            let lora = match &self.lora {
                Some((h, b, s)) => {
                    let ((hs, hl), (bs, bl)) = (h.storage_and_layout(), b.storage_and_layout());
                    let (candle_core::Storage::Cuda(hs), candle_core::Storage::Cuda(bs)) = (&*hs, &*bs) else {
                        candle_core::bail!("nf4-gemv: LoRA inputs not on the GPU")
                    };
                    let (r, (h0, _), (b0, _)) = (b.dim(1)?, offsets(hl)?, offsets(bl)?);
                    if h.dims() != [m, r] || b.dims() != [self.n, r] {
                        candle_core::bail!(
                            "nf4-gemv: LoRA h {:?} and B {:?} for [{m}, {}]",
                            h.dims(),
                            b.dims(),
                            self.n
                        );
                    }
                    let stream = dev.cuda_stream();
                    let (hp, _) = hs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream);
                    let (bp, _) = bs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream);
                    Some((hp + 2 * h0 as u64, bp + 2 * b0 as u64, r as i32, *s))
                }
                None => None,
            };
            let (hp, bp, r, s) = lora.unwrap_or((0, 0, 0, 0.0));
            let kernel = (m == 1).then(|| match gemv1_kernel(self.n, k, wpr as usize, r as usize) {
                // the pipelined kernel reads B two values at a time
                Gemv1::Piped if bp % 4 != 0 => Gemv1::Fast(1),
                g => g,
            });
            let func = dev.get_or_load_custom_func(
                match kernel {
                    None => "nf4_gemv_bf16",
                    Some(Gemv1::Fast(1)) => "nf4_gemv1_fast1_bf16",
                    Some(Gemv1::Fast(_)) => "nf4_gemv1_fast2_bf16",
                    Some(Gemv1::Piped) => "nf4_gemv1_piped_bf16",
                },
                MODULE,
                PTX,
            )?;
            let mut b = func.builder();
            b.arg(&qs);
            b.arg(&abs);
            b.arg(&xs);
            b.arg(&out);
            if kernel.is_none() {
                b.arg(&mi);
            }
            b.arg(&ni);
            b.arg(&ki);
            b.arg(&wpr);
            b.arg(&hp);
            b.arg(&bp);
            b.arg(&r);
            b.arg(&s);
            let groups_per_block = 8 / wpr as u32;
            let blocks = match kernel {
                Some(Gemv1::Fast(rows)) => (self.n as u32).div_ceil(groups_per_block * rows),
                // two blocks per SM (the kernel's launch bounds); each walks its share of the rows
                Some(Gemv1::Piped) => (self.n as u32).div_ceil(groups_per_block).min(2 * sm_count(&dev)?),
                _ => (self.n as u32).div_ceil(groups_per_block),
            };
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((m, self.n))))
        }
    }

    /// (x bf16 [M, K], A bf16 [R, K]) -> x·Aᵀ [M, R] bf16; with `part: Some(rp)`, A stacks
    /// R / rp adapters and the result is [R / rp, M, rp].
    pub struct LoraDown {
        pub part: Option<usize>,
    }

    impl candle_core::CustomOp2 for LoraDown {
        fn name(&self) -> &'static str {
            "lora-down"
        }
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("lora-down is GPU only")
        }
        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            a: &CudaStorage,
            al: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let ((x0, x1), (a0, a1)) = (offsets(xl)?, offsets(al)?);
            let (m, k) = xl.shape().dims2()?;
            let (r, _) = al.shape().dims2()?;
            if x0 % 8 != 0 || a0 % 8 != 0 {
                candle_core::bail!("lora-down: misaligned input");
            }
            let xs = x.as_cuda_slice::<half::bf16>()?.slice(x0..x1);
            let as_ = a.as_cuda_slice::<half::bf16>()?.slice(a0..a1);
            let out = unsafe { dev.alloc::<half::bf16>(m * r)? };
            let func = dev.get_or_load_custom_func("lora_down_bf16", MODULE, PTX)?;
            let rp = self.part.unwrap_or(r);
            let (mi, ri, ki, rpi) = (m as i32, r as i32, k as i32, rp as i32);
            let mut b = func.builder();
            b.arg(&xs).arg(&as_).arg(&out).arg(&mi).arg(&ri).arg(&ki).arg(&rpi);
            let cfg = LaunchConfig { grid_dim: (r as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            unsafe { b.launch(cfg) }.w()?;
            let shape = match self.part {
                Some(rp) => Shape::from((r / rp, m, rp)),
                None => Shape::from((m, r)),
            };
            Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
        }
    }

    pub fn dequantize(
        q: &CudaStorage,
        ql: &Layout,
        a: &CudaStorage,
        al: &Layout,
        n: usize,
        dtype: DType,
    ) -> candle_core::Result<CudaStorage> {
        let dev = q.device().clone();
        let ((q0, q1), (a0, a1)) = (offsets(ql)?, offsets(al)?);
        let qs = q.as_cuda_slice::<u8>()?.slice(q0..q1);
        let abs = a.as_cuda_slice::<f32>()?.slice(a0..a1);
        let blk = BLOCK as u32;
        match dtype {
            DType::BF16 => {
                if n % 8 != 0 || q0 % 4 != 0 {
                    candle_core::bail!("nf4-dequantize: needs n % 8 == 0 and 4-byte aligned input");
                }
                let out = unsafe { dev.alloc::<half::bf16>(n)? };
                let func = dev.get_or_load_custom_func("nf4_dequantize_bf16", MODULE, PTX)?;
                let n_words = (n / 8) as u32;
                let mut b = func.builder();
                b.arg(&qs);
                b.arg(&abs);
                b.arg(&out);
                b.arg(&n_words);
                b.arg(&blk);
                // four words per thread (the kernel's DQ_WORDS)
                unsafe { b.launch(grid((n / 8).div_ceil(4))) }.w()?;
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
            DType::F32 => {
                let out = unsafe { dev.alloc::<f32>(n)? };
                let func = dev.get_or_load_custom_func("nf4_dequantize_f32", MODULE, PTX)?;
                let n32 = n as u32;
                let mut b = func.builder();
                b.arg(&qs);
                b.arg(&abs);
                b.arg(&out);
                b.arg(&n32);
                b.arg(&blk);
                unsafe { b.launch(grid(n)) }.w()?;
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
            d => candle_core::bail!("nf4-dequantize: unsupported output dtype {d:?}"),
        }
    }
}
