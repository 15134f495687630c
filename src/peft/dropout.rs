//! Inverted dropout with a counter-based mask: element i of the mask depends only on (seed, i),
//! so the recompute of gradient checkpointing reproduces it exactly, and the CPU and CUDA paths
//! draw the same mask.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

#[inline]
fn uniform(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// The mask (0 or 1/(1-p)) for `n` elements, in `dtype`, on `dev`.
pub fn mask(seed: u64, n: usize, p: f32, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    let scale = 1.0 / (1.0 - p);
    match dev {
        Device::Cpu => {
            let v: Vec<f32> =
                (0..n as u64).into_par_iter().map(|i| if uniform(seed, i) >= p { scale } else { 0.0 }).collect();
            Tensor::from_vec(v, n, dev)?.to_dtype(dtype)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda_mask(d, seed, n, p, scale, dtype),
        #[allow(unreachable_patterns)]
        _ => candle_core::bail!("dropout: unsupported device"),
    }
}

/// x * mask, with the mask keyed by `seed` (one seed per module and step).
pub fn apply(x: &Tensor, p: f32, seed: u64) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let m = mask(seed, x.elem_count(), p, x.dtype(), x.device())?.reshape(x.dims())?;
    x.mul(&m)
}

#[cfg(feature = "cuda")]
fn cuda_mask(
    d: &candle_core::CudaDevice,
    seed: u64,
    n: usize,
    p: f32,
    scale: f32,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    use crate::peft::nf4::cuda::{MODULE, PTX};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::{cudarc::driver::DeviceRepr, CudaDType};
    use candle_core::{CudaStorage, Storage};
    fn launch<T: CudaDType + DeviceRepr>(
        d: &candle_core::CudaDevice,
        name: &str,
        (seed, n, p, scale): (u64, usize, f32, f32),
    ) -> candle_core::Result<CudaStorage> {
        let cfg =
            LaunchConfig { grid_dim: ((n as u32).div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let out = unsafe { d.alloc::<T>(n)? };
        let f = d.get_or_load_custom_func(name, MODULE, PTX)?;
        let n64 = n as u64;
        let mut b = f.builder();
        b.arg(&out);
        b.arg(&seed);
        b.arg(&n64);
        b.arg(&p);
        b.arg(&scale);
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, d.clone()))
    }
    let args = (seed, n, p, scale);
    let storage = match dtype {
        DType::BF16 => launch::<half::bf16>(d, "dropout_mask_bf16", args)?,
        _ => launch::<f32>(d, "dropout_mask_f32", args)?,
    };
    let t = Tensor::from_storage(Storage::Cuda(storage), n, candle_core::op::BackpropOp::none(), false);
    if dtype == DType::BF16 || dtype == DType::F32 {
        Ok(t)
    } else {
        t.to_dtype(dtype)
    }
}
