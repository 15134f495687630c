//! Choosing the device and compute dtype.

use anyhow::Result;
use candle_core::{DType, Device};

/// The first CUDA device when this build has CUDA and one is present, else the CPU.
pub fn best_device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    if candle_core::utils::cuda_is_available() {
        return Ok(Device::new_cuda(0)?);
    }
    Ok(Device::Cpu)
}

/// bf16 on a GPU, f32 on the CPU (candle's CPU bf16 matmul is slow and CI runs there).
pub fn default_dtype(dev: &Device) -> DType {
    if dev.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}
