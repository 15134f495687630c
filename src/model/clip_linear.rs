//! The frozen CLIP tower's linears on the GPU in bf16, one op each: the output rows start as the
//! bias and one GEMM adds x·Wᵀ (beta = 1). At the tower's shapes cuBLAS's bf16 epilogue rounds the
//! product before it adds C, so y = bf16(bf16(x·Wᵀ) + b): the bits of the composed matmul-then-add
//! (tests/gpu.rs), not yet PyTorch's addmm, whose bias epilogue rounds once. fc1 also applies quick_gelu in place, at
//! PyTorch's rounding points. candle instead adds the bias with its
//! broadcasting add (about 36 µs for a [2308, 1024] batch of four images on an H200, against the
//! 3 µs the bytes need) and takes four ops for quick_gelu: together about 13 ms of a batch-4
//! training step (tools/gpu/kprof). No backward: nothing differentiates through the tower.

use crate::model::cublas::{bf16_address, gemm_bf16, tensor_address};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
const MODULE: &str = "gemmaclip_elementwise";

/// `x·Wᵀ + b` (then quick_gelu with `quick_gelu`) for x [.., in], or None where the composed
/// form must run (not bf16 on a GPU, x tracking a graph, shapes the kernels do not take).
pub fn forward(x: &Tensor, w: &Tensor, b: &Tensor, quick_gelu: bool) -> candle_core::Result<Option<Tensor>> {
    let (out_f, in_f) = w.dims2()?;
    let fits = x.device().is_cuda()
        && [x, w, b].iter().all(|t| t.dtype() == DType::BF16 && !t.track_op())
        && x.dims().last() == Some(&in_f)
        && b.dims() == [out_f]
        && b.layout().start_offset() % 8 == 0
        && x.elem_count() > 0
        && out_f % 8 == 0;
    if !fits {
        return Ok(None);
    }
    let op = BiasLinear { w: w.contiguous()?, b: b.contiguous()?, quick_gelu };
    Ok(Some(x.contiguous()?.apply_op1_no_bwd(&op)?))
}

struct BiasLinear {
    w: Tensor,
    b: Tensor,
    quick_gelu: bool,
}

fn launch(dev: &candle_core::CudaDevice, name: &str, threads: usize, args: &[u64]) -> candle_core::Result<()> {
    let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let mut b = f.builder();
    for a in args {
        b.arg(a);
    }
    let cfg =
        LaunchConfig { grid_dim: ((threads as u32).div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

impl CustomOp1 for BiasLinear {
    fn name(&self) -> &'static str {
        "clip-bias-linear"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("CLIP linear: the CPU path is composed")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, k) = self.w.dims2()?;
        let m = xl.shape().elem_count() / k.max(1);
        let dev = xs.device().clone();
        let (x, w, b) = (
            bf16_address(xs, xl, "CLIP linear: the input")?,
            tensor_address(&self.w, "CLIP linear: the weight")?,
            tensor_address(&self.b, "CLIP linear: the bias")?,
        );
        // SAFETY: every element is written by the bias kernel before the GEMM reads it (beta = 1).
        let y = unsafe { dev.alloc::<half::bf16>(m * n)? };
        let yp = y.device_ptr(&dev.cuda_stream()).0;
        let n8 = (m * n / 8) as u64;
        // 16-byte accesses: the bias must start 16-byte aligned (fresh buffers are)
        if b % 16 != 0 {
            candle_core::bail!("CLIP linear: the bias is not 16-byte aligned");
        }
        launch(&dev, "bias_rows_bf16_x8", n8 as usize, &[b, yp, n8, (n / 8) as u64])?;
        gemm_bf16(&dev, yp, x, false, w, true, (m, n, k), 1.0, 1.0)?;
        if self.quick_gelu {
            launch(&dev, "quick_gelu_bf16_x8", n8 as usize, &[yp, n8])?;
        }
        let mut shape = xl.dims().to_vec();
        *shape.last_mut().expect("x has a last dim") = n;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from(shape)))
    }
}
