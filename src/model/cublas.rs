//! cuBLAS GEMMs on raw bf16 device addresses, for the ops that chain several GEMMs into buffers of
//! their own (the fused LoRA linear, the frozen CLIP tower's linears): bf16 in and out, f32
//! accumulation, as candle's own bf16 matmul calls cuBLAS.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::sys;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, Layout, Storage, Tensor};
use std::ffi::c_void;

/// The device address of a contiguous bf16 view's first element (`what` names it in errors).
pub fn bf16_address(s: &CudaStorage, l: &Layout, what: &str) -> candle_core::Result<u64> {
    let Some((start, _)) = l.contiguous_offsets() else { candle_core::bail!("{what} is not contiguous") };
    let stream = s.device().cuda_stream();
    let base = s.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0;
    Ok(base + 2 * start as u64)
}

/// `bf16_address` of a tensor on the GPU; the tensor must outlive the work that reads the address.
pub fn tensor_address(t: &Tensor, what: &str) -> candle_core::Result<u64> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cuda(s) = &*st else { candle_core::bail!("{what} is not on the GPU") };
    bf16_address(s, l, what)
}

/// Row-major `C[m, n] = alpha·op(A)·op(B) + beta·C` in bf16 with f32 accumulation, as candle's
/// own bf16 matmul calls cuBLAS. `A` is stored [m, k] ([k, m] when `ta`), `B` [k, n] ([n, k] when `tb`).
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
    dev: &CudaDevice,
    c: u64,
    a: u64,
    ta: bool,
    b: u64,
    tb: bool,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
) -> candle_core::Result<()> {
    use sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    // column-major view: Cᵀ[n, m] = op(B)ᵀ · op(A)ᵀ
    let (op_b, ldb) = if tb { (CUBLAS_OP_T, k) } else { (CUBLAS_OP_N, n) };
    let (op_a, lda) = if ta { (CUBLAS_OP_T, m) } else { (CUBLAS_OP_N, k) };
    let blas = dev.cublas_handle();
    // SAFETY: the pointers address live bf16 buffers of the stated shapes on this device's stream.
    unsafe {
        candle_core::cuda_backend::cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op_b,
            op_a,
            n as i32,
            m as i32,
            k as i32,
            (&alpha) as *const f32 as *const c_void,
            b as *const c_void,
            sys::cudaDataType_t::CUDA_R_16BF,
            ldb as i32,
            a as *const c_void,
            sys::cudaDataType_t::CUDA_R_16BF,
            lda as i32,
            (&beta) as *const f32 as *const c_void,
            c as *mut c_void,
            sys::cudaDataType_t::CUDA_R_16BF,
            n as i32,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .w()
}
