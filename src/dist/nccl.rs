//! Collectives between GPU processes through NCCL (cudarc's binding; a build with the `nccl`
//! feature links libnccl.so.2, as candle links the CUDA libraries). On the device's stream they
//! queue behind the kernels that produced their input without a host sync. With gradient buckets
//! (`--ddp-bucket-cap-mb`) they get a stream of their own that waits for the device's stream
//! through an event before each collective: the buckets' sums (`start_sum_in_place`) then run
//! beside the backward of the layers below them, and every other collective makes the device's
//! stream wait for its result before it returns.

use crate::dist::comm::Communicator;
use crate::dist::control::Control;
use anyhow::{anyhow, bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, InplaceOp1, Layout, Shape, Tensor};
use std::sync::Arc;

pub struct NcclComm {
    /// Never destroyed: ncclCommAbort and ncclCommDestroy must run on every rank together or they
    /// hang or break the peers still using the group; the process ends right after its run (the
    /// ranks leave together, `Ranks::barrier`) and the driver reclaims what NCCL holds.
    comm: std::mem::ManuallyDrop<Comm>,
    /// The device's stream (candle's kernels) and the collectives' own.
    compute: Arc<CudaStream>,
    side: Arc<CudaStream>,
    rank: usize,
    world: usize,
    dev: Device,
    control: Arc<Control>,
}

// SAFETY: NCCL's communicator is a handle NCCL lets one thread use at a time; gemmaclip calls it
// from the training thread only (the trait asks for Send + Sync so a run can hold it boxed).
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

/// Rank 0's new unique id as the bytes the rendezvous hands out.
pub fn new_id() -> Result<Vec<u8>> {
    let id = Id::new().map_err(|e| anyhow!("NCCL could not make a unique id: {e:?}"))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

impl NcclComm {
    /// Joins the NCCL group `id` (from `new_id` on rank 0) as `rank` of `world`, on `dev`'s
    /// stream, or on a stream of its own `beside` it.
    pub fn new(
        dev: &Device,
        (rank, world): (usize, usize),
        id: &[u8],
        beside: bool,
        control: Arc<Control>,
    ) -> Result<Self> {
        let Ok(bytes) = <[u8; 128]>::try_from(id) else { bail!("rank 0 handed out a {}-byte NCCL id", id.len()) };
        let id = Id::uninit(bytes.map(|b| b as std::ffi::c_char));
        let compute = dev.as_cuda_device()?.cuda_stream();
        let side = if beside {
            compute.fork().map_err(|e| anyhow!("rank {rank}: no CUDA stream for NCCL: {e:?}"))?
        } else {
            compute.clone()
        };
        let comm = Comm::from_rank(side.clone(), rank, world, id)
            .map_err(|e| anyhow!("rank {rank}: NCCL could not join the group of {world}: {e:?}"))?;
        Ok(Self { comm: std::mem::ManuallyDrop::new(comm), compute, side, rank, world, dev: dev.clone(), control })
    }

    /// The collectives' stream waits for what the device's stream queued so far (nothing to do
    /// when they are one stream).
    fn side_waits(&self) -> Result<()> {
        if self.overlaps() {
            self.side.join(&self.compute).map_err(|e| anyhow!("NCCL's stream: {e:?}"))?;
        }
        Ok(())
    }

    /// The device's stream waits for what the collectives' stream queued so far (so that a
    /// result is read, and its input freed, only after the collective).
    fn compute_waits(&self) -> Result<()> {
        if self.overlaps() {
            self.compute.join(&self.side).map_err(|e| anyhow!("NCCL's stream: {e:?}"))?;
        }
        Ok(())
    }

    /// The collective `what` of `t`, finished (in the device's stream order) when it returns.
    fn whole(&self, t: &Tensor, what: Collective) -> Result<Tensor> {
        let out = t.apply_op1_no_bwd(&NcclOp { nccl: self, what });
        self.compute_waits()?;
        Ok(out?)
    }

    fn run_on(&self, values: &mut [f32], what: Collective) -> Result<()> {
        let t = Tensor::from_slice(values, values.len(), &self.dev)?;
        let out = self.whole(&t, what)?;
        values.copy_from_slice(&out.to_vec1::<f32>()?);
        Ok(())
    }
}

/// A sum over the ranks in place, on the collectives' stream.
struct SumInPlace<'a> {
    comm: &'a Comm,
}

impl InplaceOp1 for SumInPlace<'_> {
    fn name(&self) -> &'static str {
        "nccl-sum-in-place"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL collectives run on CUDA tensors")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        if s.dtype() != DType::F32 {
            candle_core::bail!("NCCL sums here take f32, got {:?}", s.dtype());
        }
        let Some((o1, o2)) = l.contiguous_offsets() else {
            candle_core::bail!("NCCL sums in place take a contiguous stretch")
        };
        let mut stretch = s.as_cuda_slice_mut::<f32>()?.slice_mut(o1..o2);
        self.comm
            .all_reduce_in_place(&mut stretch, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
        Ok(())
    }
}

enum Collective {
    Sum,
    Broadcast(usize),
}

/// A collective as a candle op, so its input is read where candle keeps it and its output is a
/// fresh tensor; it runs on the collectives' stream once that has waited for the device's
/// stream, where the output was allocated.
struct NcclOp<'a> {
    nccl: &'a NcclComm,
    what: Collective,
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives run on CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        if s.dtype() != DType::F32 {
            candle_core::bail!("NCCL collectives here take f32, got {:?}", s.dtype());
        }
        let Some((o1, o2)) = l.contiguous_offsets() else {
            candle_core::bail!("NCCL collectives take contiguous tensors")
        };
        let src = s.as_cuda_slice::<f32>()?.slice(o1..o2);
        // SAFETY: the collective writes every element.
        let mut dst = unsafe { s.device.alloc::<f32>(o2 - o1)? };
        self.nccl.side_waits().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let comm = &self.nccl.comm;
        let done = match self.what {
            Collective::Sum => comm.all_reduce(&src, &mut dst, &ReduceOp::Sum),
            Collective::Broadcast(root) => comm.broadcast(Some(&src), &mut dst, root as i32),
        };
        done.map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, s.device.clone()), l.shape().clone()))
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        self.run_on(values, Collective::Sum)
    }

    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world {
            bail!("broadcast from rank {root} in a world of {}", self.world);
        }
        self.run_on(values, Collective::Broadcast(root))
    }

    fn abort(&self, why: &str) {
        self.control.abort(why)
    }

    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        self.whole(&t.to_dtype(DType::F32)?.contiguous()?, Collective::Sum)
    }

    fn broadcast_tensor(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.whole(&t.to_dtype(DType::F32)?.contiguous()?, Collective::Broadcast(root))
    }

    fn overlaps(&self) -> bool {
        !Arc::ptr_eq(&self.side, &self.compute)
    }

    fn start_sum_in_place(&self, t: &Tensor) -> Result<()> {
        self.side_waits()?;
        Ok(t.inplace_op1(&SumInPlace { comm: &self.comm })?)
    }

    fn wait_sums(&self) -> Result<()> {
        self.compute_waits()
    }
}
