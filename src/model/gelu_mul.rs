//! Gemma's MLP activation `gelu_tanh(gate) * up` as one GPU op each way (kernels/gelu_mul.cu),
//! where the composed path takes a gelu and a product forward and about fifteen ops backward
//! (candle differentiates the tanh approximation op by op). Tested against the composed form in
//! tests/gpu.rs.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gelu_mul.ptx"));
const MODULE: &str = "gemmaclip_gelu_mul";

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
        let n = gl.shape().elem_count();
        let dev = gs.device().clone();
        let (g, u) = (view(gs, gl)?, view(us, ul)?);
        // SAFETY: the kernel writes all n elements.
        let out = unsafe { dev.alloc::<half::bf16>(n)? };
        let f = dev.get_or_load_custom_func("gelu_mul_fwd_bf16", MODULE, PTX)?;
        let n64 = n as u64;
        let mut b = f.builder();
        b.arg(&g);
        b.arg(&u);
        b.arg(&out);
        b.arg(&n64);
        unsafe { b.launch(grid(n)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), gl.shape().clone()))
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
        let f = dev.get_or_load_custom_func("gelu_mul_bwd_bf16", MODULE, PTX)?;
        let n64 = n as u64;
        let mut b = f.builder();
        b.arg(&g);
        b.arg(&u);
        b.arg(&d);
        b.arg(&d_gate);
        b.arg(&d_up);
        b.arg(&n64);
        unsafe { b.launch(grid(n)) }.w()?;
        let wrap = |x| {
            let st = Storage::Cuda(CudaStorage::wrap_cuda_slice(x, dev.clone()));
            Tensor::from_storage(st, gate.dims().to_vec(), BackpropOp::none(), false)
        };
        Ok((Some(wrap(d_gate)), Some(wrap(d_up))))
    }
}
