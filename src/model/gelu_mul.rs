//! Gemma's MLP activation `gelu_tanh(gate) * up` as one GPU op each way (kernels/elementwise.cu),
//! where the composed path takes a gelu and a product forward and about fifteen ops backward
//! (candle differentiates the tanh approximation op by op). Tested against the composed form in
//! tests/gpu.rs.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
const MODULE: &str = "gemmaclip_elementwise";

pub struct GeluMul;

fn view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, half::bf16>> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("gelu-mul: input not contiguous") };
    if s.dtype() != DType::BF16 {
        candle_core::bail!("gelu-mul: bf16 only");
    }
    Ok(s.as_cuda_slice::<half::bf16>()?.slice(a..b))
}

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u32).div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// The eight-per-thread kernel of (one per thread, eight per thread) where every view starts 16
/// bytes aligned and n divides by 8: (kernel name, threads' element count, n as passed).
fn wide(names: (&'static str, &'static str), n: usize, layouts: &[&Layout]) -> (&'static str, usize, u64) {
    let aligned = layouts.iter().all(|l| l.start_offset() % 8 == 0);
    if n % 8 == 0 && aligned {
        (names.1, n / 8, (n / 8) as u64)
    } else {
        (names.0, n, n as u64)
    }
}

/// Two bf16 inputs of one shape in, one bf16 output of that shape: the launch of the forward
/// kernels `names` (see `wide`).
fn two_to_one(
    names: (&'static str, &'static str),
    (xs, xl): (&CudaStorage, &Layout),
    (ys, yl): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let n = xl.shape().elem_count();
    let dev = xs.device().clone();
    let (x, y) = (view(xs, xl)?, view(ys, yl)?);
    // SAFETY: the kernel writes all n elements.
    let out = unsafe { dev.alloc::<half::bf16>(n)? };
    let (name, threads, n_arg) = wide(names, n, &[xl, yl]);
    let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&x);
    b.arg(&y);
    b.arg(&out);
    b.arg(&n_arg);
    unsafe { b.launch(grid(threads)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
}

/// a + b for contiguous bf16 tensors of one shape on the GPU, the bits of candle's add (the
/// residual stream's sums, forward and backward, in 16-byte accesses); candle's add elsewhere.
/// Its backward hands the output gradient to both inputs.
pub fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let fits = a.device().is_cuda()
        && a.dtype() == DType::BF16
        && b.dtype() == DType::BF16
        && a.dims() == b.dims()
        && a.elem_count() % 8 == 0
        && [a, b].iter().all(|t| t.layout().contiguous_offsets().is_some_and(|(o, _)| o % 8 == 0));
    if fits {
        a.apply_op2(b, Add)
    } else {
        a + b
    }
}

struct Add;

const ADD: (&str, &str) = ("add_bf16", "add_bf16_x8");

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "bf16-add"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("bf16-add: the CPU adds with candle")
    }
    fn cuda_fwd(
        &self,
        as_: &CudaStorage,
        al: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        // only the eight-per-thread kernel exists: `add` sends nothing else here
        let n = al.shape().elem_count();
        if al.shape() != bl.shape() || wide(ADD, n, &[al, bl]).0 != ADD.1 {
            candle_core::bail!("bf16-add: {:?} and {:?}, or an offset not a multiple of 8", al.dims(), bl.dims())
        }
        two_to_one(ADD, (as_, al), (bs, bl))
    }
    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dy.clone()), Some(dy.clone())))
    }
}

impl CustomOp2 for GeluMul {
    fn name(&self) -> &'static str {
        "gelu-tanh-mul"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("gelu-mul: the CPU path is composed")
    }
    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if gl.shape() != ul.shape() {
            candle_core::bail!("gelu-mul: gate {:?} and up {:?} differ", gl.dims(), ul.dims());
        }
        two_to_one(("gelu_mul_fwd_bf16", "gelu_mul_fwd_bf16_x8"), (gs, gl), (us, ul))
    }
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (gg, gl) = gate.storage_and_layout();
        let (ug, ul) = up.storage_and_layout();
        let (dg, dl) = dy.storage_and_layout();
        let (Storage::Cuda(gs), Storage::Cuda(us), Storage::Cuda(ds)) = (&*gg, &*ug, &*dg) else {
            candle_core::bail!("gelu-mul: backward inputs not on the GPU")
        };
        let n = gl.shape().elem_count();
        let dev = gs.device().clone();
        let (g, u, d) = (view(gs, gl)?, view(us, ul)?, view(ds, dl)?);
        // SAFETY: the kernel writes all n elements of both.
        let (d_gate, d_up) = unsafe { (dev.alloc::<half::bf16>(n)?, dev.alloc::<half::bf16>(n)?) };
        let (name, threads, n64) = wide(("gelu_mul_bwd_bf16", "gelu_mul_bwd_bf16_x8"), n, &[gl, ul, dl]);
        let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&g);
        b.arg(&u);
        b.arg(&d);
        b.arg(&d_gate);
        b.arg(&d_up);
        b.arg(&n64);
        unsafe { b.launch(grid(threads)) }.w()?;
        let wrap = |x| {
            let st = Storage::Cuda(CudaStorage::wrap_cuda_slice(x, dev.clone()));
            Tensor::from_storage(st, gate.dims().to_vec(), BackpropOp::none(), false)
        };
        Ok((Some(wrap(d_gate)), Some(wrap(d_up))))
    }
}
