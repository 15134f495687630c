//! Temperature / top-k / top-p sampling chosen on the device (kernels/sampling.cu): the choice
//! src/sampling.rs makes on the host from the same draws, without bringing a row of 262k logits to
//! the host; only the chosen ids come back. Tested against the host's choice in tests/gpu.rs.

use crate::sampling::Sampling;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));
const MODULE: &str = "gemmaclip_sampling";

/// The token each row's draw picks from its logits [B, V] under `s` (`None`: a finished row, which
/// gets `pad`), as u32 [B] on the device.
pub fn sample_rows(logits: &Tensor, draws: &[Option<f64>], s: Sampling, pad: u32) -> candle_core::Result<Tensor> {
    let (b, _) = logits.dims2()?;
    if draws.len() != b {
        candle_core::bail!("device sampling: {} draws for {b} rows", draws.len());
    }
    let u: Vec<f64> = draws.iter().map(|d| d.unwrap_or(-1.0)).collect();
    let u = Tensor::from_vec(u, b, logits.device())?;
    logits.to_dtype(DType::F32)?.contiguous()?.apply_op2_no_bwd(&u, &SampleRows { s, pad })
}

struct SampleRows {
    s: Sampling,
    pad: u32,
}

impl CustomOp2 for SampleRows {
    fn name(&self) -> &'static str {
        "sample-rows"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("sample-rows: the CPU samples in src/sampling.rs")
    }
    fn cuda_fwd(
        &self,
        ls: &CudaStorage,
        ll: &Layout,
        us: &CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, v) = ll.shape().dims2()?;
        let (Some((l0, l1)), Some((u0, u1))) = (ll.contiguous_offsets(), ul.contiguous_offsets()) else {
            candle_core::bail!("sample-rows: inputs not contiguous")
        };
        let dev = ls.device().clone();
        let logits = ls.as_cuda_slice::<f32>()?.slice(l0..l1);
        let u = us.as_cuda_slice::<f64>()?.slice(u0..u1);
        // SAFETY: the kernel writes every kept weight before reading it, and one id per row.
        let w = unsafe { dev.alloc::<f64>(b * v)? };
        let out = unsafe { dev.alloc::<u32>(b)? };
        let f = dev.get_or_load_custom_func("sample_rows", MODULE, PTX)?;
        let (vi, temp, top_k, top_p) =
            (v as i32, self.s.temperature, self.s.top_k.min(i32::MAX as usize) as i32, self.s.top_p);
        let mut l = f.builder();
        l.arg(&logits);
        l.arg(&u);
        l.arg(&w);
        l.arg(&out);
        l.arg(&vi);
        l.arg(&temp);
        l.arg(&top_k);
        l.arg(&top_p);
        l.arg(&self.pad);
        let cfg = LaunchConfig { grid_dim: (b as u32, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
        unsafe { l.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(b)))
    }
}
