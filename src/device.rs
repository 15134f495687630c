//! Choosing the device and compute dtype.

use anyhow::Result;
use candle_core::{DType, Device};

/// The CUDA device this process should use when this build has CUDA and one is present (the
/// first, or a worker's own: `WorkerEnv::cuda_ordinal`), else the CPU.
pub fn best_device() -> Result<Device> {
    let env = crate::dist::env::WorkerEnv::from_env()?;
    best_device_at(env.map_or(0, |e| e.cuda_ordinal()))
}

/// CUDA device `ordinal` when this build has CUDA and a GPU is present, else the CPU.
fn best_device_at(ordinal: usize) -> Result<Device> {
    #[cfg(feature = "cuda")]
    if candle_core::utils::cuda_is_available() {
        let dev = Device::new_cuda(ordinal)?;
        // Everything runs on the device's one stream, so the two CUDA events candle records per
        // allocation for cross-stream safety are pure overhead (candle's CudaDevice::disable_event_tracking).
        // SAFETY: no tensor of this device is ever used from another stream.
        unsafe { dev.as_cuda_device()?.disable_event_tracking() };
        return Ok(dev);
    }
    let _ = ordinal;
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

/// Synchronizes the device (a no-op on the CPU), so wall-clock timings cover the queued work.
pub fn synchronize(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    Ok(())
}

/// GPU memory as the CUDA stream-ordered pool that candle allocates from sees it (cuMemPoolGetAttribute).
/// On the CPU every figure is None.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryReading {
    /// Bytes in live allocations now.
    pub used: Option<u64>,
    /// High-water mark of `used` since the last reset.
    pub peak: Option<u64>,
    /// Device-wide bytes in use (all processes, pool reservations included).
    pub device_used: Option<u64>,
}

#[cfg(feature = "cuda")]
mod pool {
    use candle_core::cuda_backend::cudarc::driver::{
        result::{device, mem_pool},
        sys::{CUmemPool_attribute as A, CUmemoryPool},
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::CudaDevice;

    fn pool(dev: &CudaDevice) -> candle_core::Result<CUmemoryPool> {
        let ctx = dev.cuda_stream().context().clone();
        unsafe { device::get_default_mem_pool(ctx.cu_device()) }.w()
    }

    pub fn set(dev: &CudaDevice, attr: A, mut value: u64) -> candle_core::Result<()> {
        unsafe { mem_pool::set_attribute(pool(dev)?, attr, &mut value as *mut u64 as *mut _) }.w()
    }

    pub fn get(dev: &CudaDevice, attr: A) -> candle_core::Result<u64> {
        let mut value = 0u64;
        unsafe { mem_pool::get_attribute(pool(dev)?, attr, &mut value as *mut u64 as *mut _) }.w()?;
        Ok(value)
    }

    pub fn device_used(dev: &CudaDevice) -> candle_core::Result<u64> {
        let (free, total) = dev.cuda_stream().context().mem_get_info().w()?;
        Ok((total - free) as u64)
    }
}

/// Keeps freed memory in the pool instead of returning it to the driver at every synchronize, as
/// PyTorch's caching allocator does (the pool's default release threshold is 0).
pub fn keep_pool_memory(dev: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        pool::set(d, A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)?;
    }
    let _ = dev;
    Ok(())
}

pub fn reset_peak_memory(dev: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        dev.synchronize()?;
        pool::set(d, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)?;
    }
    let _ = dev;
    Ok(())
}

/// Bytes this process could still allocate on `dev`: the driver's free memory plus what the pool
/// holds unused. None on the CPU.
pub fn free_bytes(dev: &Device) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        use candle_core::cuda_backend::WrapErr;
        let (free, _) = d.cuda_stream().context().mem_get_info().w()?;
        let idle = pool::get(d, A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?
            .saturating_sub(pool::get(d, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?);
        return Ok(Some(free as u64 + idle));
    }
    let _ = dev;
    Ok(None)
}

pub fn memory(dev: &Device) -> Result<MemoryReading> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        dev.synchronize()?;
        return Ok(MemoryReading {
            used: Some(pool::get(d, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?),
            peak: Some(pool::get(d, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?),
            device_used: Some(pool::device_used(d)?),
        });
    }
    let _ = dev;
    Ok(MemoryReading::default())
}

pub fn device_name(dev: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        if let Ok(name) = d.cuda_stream().context().name() {
            return name;
        }
    }
    if dev.is_cuda() {
        "cuda".into()
    } else {
        "cpu".into()
    }
}

/// A progress bar on stderr, hidden when stderr is not a terminal (callers then print summary lines).
pub fn progress_bar(total: usize, start: usize) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    let bar = indicatif::ProgressBar::new(total as u64);
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} {per_sec} eta {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_position(start as u64);
    bar
}
