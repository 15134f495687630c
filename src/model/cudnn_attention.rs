//! cuDNN's fused attention as one candle op with a real backward: the forward keeps cuDNN's
//! log-sum-exp statistics for the backward, which is cuDNN's deterministic one (bit-identical
//! resume). The C++ shim (kernels/cudnn_sdpa.cpp) builds and caches one cuDNN graph per shape and
//! mask; libcudnn.so.9 is opened at run time, and where it cannot be, `available` says so once and
//! callers keep the composed path. Layouts: q [B, Hq, S, D], k/v [B, Hkv, S, D] (any strides with
//! the last dim contiguous; v may also be the projection's [B, S, Hkv*D]), bf16; the output is
//! [B, S, Hq*D], ready for the output projection.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Mutex, OnceLock};

#[repr(C)]
struct Desc {
    b: i64,
    hq: i64,
    hkv: i64,
    sq: i64,
    skv: i64,
    d: i64,
    /// q, k, v, o, do, dq, dk, dv: {B, H, S, D} strides in elements
    stride: [[i64; 4]; 8],
    window: i64,
    causal: i32,
    padded: i32,
    stats: i32,
    scale: f32,
}

extern "C" {
    fn gc_cudnn_init(err: *mut c_char, errlen: c_int) -> i64;
    fn gc_sdpa_fwd(
        desc: *const Desc,
        stream: *mut c_void,
        q: u64,
        k: u64,
        v: u64,
        o: u64,
        stats: u64,
        seq_lens: u64,
        ws: u64,
        ws_size: i64,
        ws_needed: *mut i64,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn gc_sdpa_bwd(
        desc: *const Desc,
        stream: *mut c_void,
        q: u64,
        k: u64,
        v: u64,
        o: u64,
        d_o: u64,
        stats: u64,
        seq_lens: u64,
        dq: u64,
        dk: u64,
        dv: u64,
        ws: u64,
        ws_size: i64,
        ws_needed: *mut i64,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
}

/// The libcudnn version when it loaded (e.g. 91900); the first call prints, once, why not.
pub fn available() -> Option<i64> {
    static VERSION: OnceLock<Option<i64>> = OnceLock::new();
    *VERSION.get_or_init(|| {
        let mut err = [0u8; 512];
        // SAFETY: err is writable for its length; the shim NUL-terminates what it writes.
        let v = unsafe { gc_cudnn_init(err.as_mut_ptr().cast(), err.len() as c_int) };
        if v > 0 {
            return Some(v);
        }
        eprintln!("cuDNN fused attention is off ({}): attention runs as composed candle ops", message(&err));
        None
    })
}

fn message(err: &[u8]) -> String {
    let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
    String::from_utf8_lossy(&err[..end]).into_owned()
}

/// What a call masks: causal (with an optional window) or nothing, and right padding.
#[derive(Clone)]
pub struct Mask {
    pub causal: bool,
    /// With `causal`: query i sees key j only when i - j < window.
    pub window: Option<usize>,
    /// Right padding: each row's valid length, i32 [B] on the device.
    pub seq_lens: Option<Tensor>,
}

/// softmax(q kᵀ·scale + mask)·v with grouped key/value heads, fused; q [B, Hq, S, D],
/// k/v [B, Hkv, S, D] bf16 -> [B, S, Hq*D]. Recorded for the backward when an input is tracked.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask, scale: f64) -> candle_core::Result<Tensor> {
    let train = q.track_op() || k.track_op() || v.track_op() || crate::model::tape::recording();
    let op = Sdpa { mask: mask.clone(), scale: scale as f32, stats: Mutex::new(None), keep_stats: train };
    if train {
        crate::model::tape::run3(q, k, v, op)
    } else {
        q.apply_op3_no_bwd(k, v, &op)
    }
}

struct Sdpa {
    mask: Mask,
    scale: f32,
    keep_stats: bool,
    /// The forward's log-sum-exp statistics (f32 [B, Hq, S]) for the backward.
    stats: Mutex<Option<CudaSlice<f32>>>,
}

/// A persistent workspace, grown to the largest size a graph asked for.
static WORKSPACE: Mutex<Option<CudaSlice<u8>>> = Mutex::new(None);

fn dims4(l: &Layout, what: &str) -> candle_core::Result<([usize; 4], [i64; 4], usize)> {
    let d = l.dims();
    let s = l.stride();
    if d.len() != 4 || s[3] != 1 {
        candle_core::bail!("cuDNN attention: {what} must be 4-d with a contiguous last dim, got {:?} / {:?}", d, s);
    }
    // cuDNN computes silently wrong results on Hopper with strides that are not 16-byte aligned.
    if s.iter().take(3).any(|&x| x % 8 != 0) || l.start_offset() % 8 != 0 || d[3] % 8 != 0 {
        candle_core::bail!("cuDNN attention: {what} is not 16-byte aligned (dims {:?}, strides {:?})", d, s);
    }
    Ok(([d[0], d[1], d[2], d[3]], [s[0] as i64, s[1] as i64, s[2] as i64, 1], l.start_offset()))
}

/// v as dims4 gives it, or [B, S, Hkv*D] (the projection's layout, read through strides) seen as
/// {B, Hkv, S, D} with the head count and size of k.
fn v_dims(l: &Layout, kd: [usize; 4]) -> candle_core::Result<([usize; 4], [i64; 4], usize)> {
    if let [b, s, hd] = l.dims() {
        let (h, d) = (kd[1], kd[3]);
        if !l.is_contiguous() || h * d != *hd {
            candle_core::bail!("cuDNN attention: v {:?} is not a contiguous [B, S, {h}*{d}]", l.dims());
        }
        let packed = Layout::new(Shape::from((*b, *s, h, d)), vec![s * hd, *hd, d, 1], l.start_offset());
        return dims4(&packed.transpose(1, 2)?, "v");
    }
    dims4(l, "v")
}

fn bf16_ptr(s: &CudaStorage, offset: usize) -> candle_core::Result<u64> {
    let stream = s.device().cuda_stream();
    let base = s.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0;
    Ok(base + 2 * offset as u64)
}

fn seq_ptr(mask: &Mask) -> candle_core::Result<u64> {
    let Some(t) = &mask.seq_lens else { return Ok(0) };
    let (st, l) = t.storage_and_layout();
    let Storage::Cuda(s) = &*st else { candle_core::bail!("cuDNN attention: sequence lengths not on the GPU") };
    let stream = s.device().cuda_stream();
    let base = s.as_cuda_slice::<i32>()?.device_ptr(&stream).0;
    Ok(base + 4 * l.start_offset() as u64)
}

/// [B, S, H*D] contiguous, seen as {B, H, S, D}
fn bshd_strides(s: usize, h: usize, d: usize) -> [i64; 4] {
    [(s * h * d) as i64, d as i64, (h * d) as i64, 1]
}

/// Calls the shim, growing the workspace when it asks for more.
fn with_workspace(
    dev: &CudaDevice,
    mut call: impl FnMut(u64, i64, &mut i64, &mut [u8]) -> c_int,
) -> candle_core::Result<()> {
    let mut ws = WORKSPACE.lock().unwrap_or_else(|p| p.into_inner());
    let stream = dev.cuda_stream();
    for _ in 0..2 {
        let (ptr, size) = match ws.as_ref() {
            Some(w) => (w.device_ptr(&stream).0, w.len() as i64),
            None => (0, 0),
        };
        let mut need = 0i64;
        let mut err = [0u8; 1024];
        match call(ptr, size, &mut need, &mut err) {
            0 => return Ok(()),
            2 => {
                *ws = None;
                // SAFETY: scratch memory, written by cuDNN before it is read.
                *ws = Some(unsafe { dev.alloc::<u8>(need as usize)? });
            }
            _ => candle_core::bail!("{}", message(&err)),
        }
    }
    candle_core::bail!("cuDNN attention: the workspace did not settle")
}

impl Sdpa {
    fn desc(&self, q: [usize; 4], kv: [usize; 4], stats: bool) -> Desc {
        Desc {
            b: q[0] as i64,
            hq: q[1] as i64,
            hkv: kv[1] as i64,
            sq: q[2] as i64,
            skv: kv[2] as i64,
            d: q[3] as i64,
            stride: [[0; 4]; 8],
            window: self.mask.window.map_or(0, |w| w as i64),
            causal: self.mask.causal as i32,
            padded: self.mask.seq_lens.is_some() as i32,
            stats: stats as i32,
            scale: self.scale,
        }
    }
}

impl CustomOp3 for Sdpa {
    fn name(&self) -> &'static str {
        "cudnn-sdpa"
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
        candle_core::bail!("cuDNN attention runs on the GPU only")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if qs.dtype() != DType::BF16 || ks.dtype() != DType::BF16 || vs.dtype() != DType::BF16 {
            candle_core::bail!("cuDNN attention takes bf16 q, k, v");
        }
        let (qd, q_st, q_off) = dims4(ql, "q")?;
        let (kd, k_st, k_off) = dims4(kl, "k")?;
        let (vd, v_st, v_off) = v_dims(vl, kd)?;
        if kd != vd || kd[0] != qd[0] || kd[3] != qd[3] || qd[1] % kd[1] != 0 {
            candle_core::bail!("cuDNN attention: q {:?}, k {:?}, v {:?} do not fit together", qd, kd, vd);
        }
        let dev = qs.device().clone();
        let [b, h, s, d] = qd;
        let mut desc = self.desc(qd, kd, self.keep_stats);
        desc.stride[0] = q_st;
        desc.stride[1] = k_st;
        desc.stride[2] = v_st;
        desc.stride[3] = bshd_strides(s, h, d);
        // With padding, cuDNN need not write the padded query rows (it zeroed them in our tests, but
        // that is not promised): pool memory read there as NaN would reach the LoRA gradients
        // through 0 * NaN, so those outputs start as zeros. Without padding every element is written.
        let o = if self.mask.seq_lens.is_some() {
            dev.alloc_zeros::<half::bf16>(b * s * h * d)?
        } else {
            // SAFETY: see above
            unsafe { dev.alloc::<half::bf16>(b * s * h * d)? }
        };
        let stats = if self.keep_stats { Some(unsafe { dev.alloc::<f32>(b * h * s)? }) } else { None };
        let stream = dev.cuda_stream();
        let (qp, kp, vp) = (bf16_ptr(qs, q_off)?, bf16_ptr(ks, k_off)?, bf16_ptr(vs, v_off)?);
        let op = o.device_ptr(&stream).0;
        let sp = stats.as_ref().map_or(0, |t| t.device_ptr(&stream).0);
        let seq = seq_ptr(&self.mask)?;
        let cu = stream.cu_stream() as *mut c_void;
        with_workspace(&dev, |ws, size, need, err| unsafe {
            gc_sdpa_fwd(&desc, cu, qp, kp, vp, op, sp, seq, ws, size, need, err.as_mut_ptr().cast(), err.len() as c_int)
        })?;
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = stats;
        Ok((CudaStorage::wrap_cuda_slice(o, dev), Shape::from((b, s, h * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let Some(stats) = stats.as_ref() else { candle_core::bail!("cuDNN attention: backward without statistics") };
        let (qg, ql) = q.storage_and_layout();
        let (kg, kl) = k.storage_and_layout();
        let (vg, vl) = v.storage_and_layout();
        let (og, ol) = o.storage_and_layout();
        let (gg, gl) = grad.storage_and_layout();
        let (Storage::Cuda(qs), Storage::Cuda(ks), Storage::Cuda(vs), Storage::Cuda(os), Storage::Cuda(gs)) =
            (&*qg, &*kg, &*vg, &*og, &*gg)
        else {
            candle_core::bail!("cuDNN attention: backward inputs not on the GPU")
        };
        let (qd, q_st, q_off) = dims4(ql, "q")?;
        let (kd, k_st, k_off) = dims4(kl, "k")?;
        let (_, v_st, v_off) = v_dims(vl, kd)?;
        let [b, h, s, d] = qd;
        let [_, hkv, skv, _] = kd;
        let dev = qs.device().clone();
        let mut desc = self.desc(qd, kd, true);
        let (bshd, q_packed, kv_packed) = (
            bshd_strides(s, h, d),
            [(h * s * d) as i64, (s * d) as i64, d as i64, 1],
            [(hkv * skv * d) as i64, (skv * d) as i64, d as i64, 1],
        );
        // dV comes back in v's own layout: [B, Hkv, S, D] packed, or [B, S, Hkv*D]
        let dv_strides = if v.rank() == 3 { bshd_strides(skv, hkv, d) } else { kv_packed };
        desc.stride = [q_st, k_st, v_st, bshd, bshd, q_packed, kv_packed, dv_strides];
        let alloc = |n: usize| -> candle_core::Result<CudaSlice<half::bf16>> {
            if self.mask.seq_lens.is_some() {
                Ok(dev.alloc_zeros::<half::bf16>(n)?)
            } else {
                // SAFETY: without padding cuDNN writes every element.
                Ok(unsafe { dev.alloc::<half::bf16>(n)? })
            }
        };
        let (dq, dk, dv) = (alloc(b * h * s * d)?, alloc(b * hkv * skv * d)?, alloc(b * hkv * skv * d)?);
        let stream = dev.cuda_stream();
        let ptrs = [
            bf16_ptr(qs, q_off)?,
            bf16_ptr(ks, k_off)?,
            bf16_ptr(vs, v_off)?,
            bf16_ptr(os, ol.start_offset())?,
            bf16_ptr(gs, gl.start_offset())?,
            stats.device_ptr(&stream).0,
            seq_ptr(&self.mask)?,
            dq.device_ptr(&stream).0,
            dk.device_ptr(&stream).0,
            dv.device_ptr(&stream).0,
        ];
        let cu = stream.cu_stream() as *mut c_void;
        with_workspace(&dev, |ws, size, need, err| unsafe {
            let [q, k, v, o, g, st, seq, dq, dk, dv] = ptrs;
            gc_sdpa_bwd(
                &desc,
                cu,
                q,
                k,
                v,
                o,
                g,
                st,
                seq,
                dq,
                dk,
                dv,
                ws,
                size,
                need,
                err.as_mut_ptr().cast(),
                err.len() as c_int,
            )
        })?;
        let wrap = |x: CudaSlice<half::bf16>, shape: [usize; 4]| {
            let st = Storage::Cuda(CudaStorage::wrap_cuda_slice(x, dev.clone()));
            Tensor::from_storage(st, shape.to_vec(), BackpropOp::none(), false)
        };
        let dv = {
            let st = Storage::Cuda(CudaStorage::wrap_cuda_slice(dv, dev.clone()));
            Tensor::from_storage(st, v.dims().to_vec(), BackpropOp::none(), false)
        };
        Ok((Some(wrap(dq, qd)), Some(wrap(dk, kd)), Some(dv)))
    }
}
