//! What the training loop does differently as one rank of several: the run is the single-GPU run
//! with the same global batch. Rank 0 decides where training starts (a fresh init or a checkpoint)
//! and hands its weights and optimizer state to the others; every micro-batch is split across the
//! ranks; the loss is divided by the supervised tokens of the whole step on every rank, so summing
//! the ranks' losses and gradients gives the global mean; every rank then takes the same optimizer
//! step on the same summed gradients.

use crate::dist::comm::{all_reduce_grads, broadcast_tensors, Communicator};
use crate::dist::worker::Worker;
use crate::model::vlm::Vlm;
use crate::train::grad_buckets::Buckets;
use crate::train::optimizer::{AdamW, GradSum};
use crate::train::state::TrainerState;
use crate::train::step::{loss_and_grads_by_layer, Batch, Gradients, StepOptions};
use anyhow::{bail, Result};
use candle_core::{Tensor, Var};

/// One rank of a run, or the whole run (`worker` None).
#[derive(Clone, Copy)]
pub struct Ranks<'a> {
    pub worker: Option<&'a Worker>,
}

impl Ranks<'_> {
    pub fn world(&self) -> usize {
        self.worker.map_or(1, |w| w.env.world)
    }

    pub fn rank(&self) -> usize {
        self.worker.map_or(0, |w| w.env.rank)
    }

    /// Rank 0 (or a run of one) writes the files and prints progress.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Elementwise sums over the ranks.
    pub fn sum(&self, values: &mut [f32]) -> Result<()> {
        match self.worker {
            Some(w) => w.comm.all_reduce_sum(values),
            None => Ok(()),
        }
    }

    /// From now on a rank that finishes no step for `timeout` stops the run as hung.
    pub fn start_watch(&self, timeout: std::time::Duration) -> Result<()> {
        self.worker.map_or(Ok(()), |w| w.start_watch(timeout))
    }

    /// This rank finished a step (or an eval batch).
    pub fn progress(&self) {
        if let Some(w) = self.worker {
            w.progress()
        }
    }

    /// Returns once every rank got here: no rank leaves the run while rank 0 still writes.
    pub fn barrier(&self) -> Result<()> {
        self.sum(&mut [0.0])
    }

    /// True on every rank when it is true on any.
    pub fn any(&self, flag: bool) -> Result<bool> {
        let mut v = [if flag { 1.0 } else { 0.0 }];
        self.sum(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// The step's gradients (`grad_sum`'s sums) and loss (this rank's part, `loss`) summed over
    /// the ranks. On GPUs the sums sit in one flat f32 buffer, reduced by one NCCL all-reduce; the
    /// loss and which tensors got a gradient anywhere travel together in one small collective.
    /// Tensors a bucket (`sum_bucket`) summed already are not summed again.
    pub fn reduce_step(&self, grad_sum: &mut GradSum, opt: &AdamW, loss: f64) -> Result<(Vec<Option<Tensor>>, f64)> {
        let early = std::mem::replace(&mut grad_sum.summed_early, vec![None; opt.vars.len()]);
        if self.world() == 1 {
            return Ok((grad_sum.take(), loss));
        }
        #[cfg(feature = "cuda")]
        if let (Some(w), Some(acc)) = (self.worker, grad_sum.flat()) {
            let mut small = vec![loss as f32];
            // a bucket's tensors: whether this rank had a gradient before the bucket's zeros
            let wrote = acc.written().iter().zip(&early).map(|(&x, e)| e.unwrap_or(x));
            small.extend(wrote.map(|x| if x { 1f32 } else { 0.0 }));
            w.comm.all_reduce_sum(&mut small)?;
            let has: Vec<bool> = small[1..].iter().map(|&c| c > 0.0).collect();
            let dev = opt.vars[0].device().as_cuda_device()?.clone();
            acc.fill_missing(&has, &dev)?;
            if early.iter().any(Option::is_some) {
                // `has` is the same on every rank: so are these stretches
                let rest: Vec<usize> = (0..has.len()).filter(|&i| early[i].is_none() && has[i]).collect();
                for run in crate::train::grad_buckets::runs(&rest) {
                    w.comm.start_sum_in_place(&acc.stretch(&run)?)?;
                }
                w.comm.wait_sums()?;
                return Ok((acc.take_summed(&has), small[0] as f64));
            }
            let summed = w.comm.all_reduce_sum_tensor(&acc.take_flat())?;
            let params: Vec<&Tensor> = opt.vars.iter().map(|v| v.as_tensor()).collect();
            let views = crate::dist::comm::views(&summed, &params)?;
            let grads = views.into_iter().zip(&has).map(|(v, &h)| h.then_some(v)).collect();
            return Ok((grads, small[0] as f64));
        }
        let rest: Vec<usize> = (0..early.len()).filter(|&i| early[i].is_none()).collect();
        self.sum_on_host(grad_sum, opt, &rest)?;
        let grads = grad_sum.take();
        let mut l = [loss as f32];
        self.sum(&mut l)?;
        Ok((grads, l[0] as f64))
    }

    /// The step's sums of tensors `which` so far replaced by their sums over the ranks (CPU
    /// tensors, or no flat accumulator); whether each has one now.
    fn sum_on_host(&self, grad_sum: &mut GradSum, opt: &AdamW, which: &[usize]) -> Result<Vec<bool>> {
        let mut part = grad_sum.take_some(which);
        if let Some(w) = self.worker {
            let like: Vec<Tensor> = which.iter().map(|&i| opt.vars[i].as_tensor().clone()).collect();
            all_reduce_grads(w.comm.as_ref(), &mut part, &like)?;
        }
        let got = part.iter().map(Option::is_some).collect();
        grad_sum.put_some(which, part);
        Ok(got)
    }

    /// Whether this run sums its gradients bucket by bucket during the backward (grad_buckets.rs):
    /// several ranks, and sums that overlap the backward (NCCL beside the flat device
    /// accumulator) or that go through the host anyway (TCP, the CPU's per-tensor sums).
    pub fn sums_buckets(&self, grad_sum: &mut GradSum) -> bool {
        let Some(w) = self.worker else { return false };
        #[cfg(feature = "cuda")]
        if grad_sum.flat().is_some() {
            return w.comm.overlaps();
        }
        let _ = grad_sum;
        w.env.world > 1 && !w.comm.overlaps()
    }

    /// The buckets of `--ddp-bucket-cap-mb` over the trainable tensors `vars` (of decoder layer
    /// `layers[i]`), where this run sums its gradients bucket by bucket.
    pub fn buckets(
        &self,
        grad_sum: &mut GradSum,
        layers: &[Option<usize>],
        vars: &[Var],
        cap_mb: f64,
    ) -> Result<Option<Buckets>> {
        let cap = (cap_mb * 1e6) as usize;
        if cap == 0 || !self.sums_buckets(grad_sum) {
            return Ok(None);
        }
        let bytes: Vec<usize> = vars.iter().map(|v| 4 * v.elem_count()).collect();
        Ok(Some(Buckets::new(layers, &bytes, cap)?))
    }

    /// `loss_and_grads` of a step's last micro-batch (on every rank alike), each bucket's sum
    /// over the ranks started as soon as the backward finished its layers.
    #[allow(clippy::too_many_arguments)]
    pub fn last_micro_batch(
        &self,
        buckets: &Buckets,
        grad_sum: &mut GradSum,
        opt: &AdamW,
        vlm: &Vlm,
        batch: &Batch,
        vars: &[Var],
        opts: &StepOptions,
    ) -> Result<Gradients> {
        let mut done = |layer: usize, grads: &mut [Option<Tensor>]| -> Result<()> {
            if let Some(which) = buckets.after_layer(layer) {
                grad_sum.add_some(grads, which)?;
                self.sum_bucket(grad_sum, opt, which)?;
            }
            Ok(())
        };
        let got = loss_and_grads_by_layer(vlm, batch, vars, opts, &mut done);
        if got.is_err() {
            // the buffer may be freed on the way out: not while a started sum still writes it
            if let Some(w) = self.worker {
                let _ = w.comm.wait_sums();
            }
        }
        got
    }

    /// Starts summing the step's gradients of the tensors `which` (one bucket, consecutive) over
    /// the ranks, after the micro-batches that wrote them: with NCCL on its own stream while the
    /// backward goes on, otherwise at once. `reduce_step` sums the rest and waits for all.
    pub fn sum_bucket(&self, grad_sum: &mut GradSum, opt: &AdamW, which: &[usize]) -> Result<()> {
        #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
        let Some(w) = self.worker
        else {
            return Ok(());
        };
        #[cfg(feature = "cuda")]
        if let Some(acc) = grad_sum.flat() {
            let wrote: Vec<bool> = which.iter().map(|&i| acc.written()[i]).collect();
            // zeros where this rank has no gradient: the sum must not take a stale one
            let mut want = vec![false; acc.written().len()];
            which.iter().for_each(|&i| want[i] = true);
            let dev = opt.vars[0].device().as_cuda_device()?.clone();
            acc.fill_missing(&want, &dev)?;
            w.comm.start_sum_in_place(&acc.stretch(which)?)?;
            for (&i, x) in which.iter().zip(wrote) {
                grad_sum.summed_early[i] = Some(x);
            }
            return Ok(());
        }
        let got = self.sum_on_host(grad_sum, opt, which)?;
        for (&i, x) in which.iter().zip(got) {
            grad_sum.summed_early[i] = Some(x);
        }
        Ok(())
    }

    /// Every rank takes rank 0's weights, optimizer moments and position: whatever rank 0 started
    /// from (its seed or a checkpoint only it read) is where the run starts.
    pub fn share_start(&self, opt: &mut AdamW, state: &mut TrainerState) -> Result<()> {
        self.worker.map_or(Ok(()), |w| share_start(w.comm.as_ref(), opt, state))
    }

    /// Stops with an error on a rank whose `plan` (what decides how many collectives it will make:
    /// steps, rows, the optimizer's path) differs from rank 0's, instead of a hang later.
    pub fn same_plan(&self, plan: &[(&str, usize)]) -> Result<()> {
        self.worker.map_or(Ok(()), |w| same_plan(w.comm.as_ref(), plan))
    }

    /// A per-rank dropout seed: rank 0 keeps the single-GPU seed of the micro-batch, the others
    /// draw other masks, as other samples of one batch would.
    pub fn dropout_seed(&self, seed: u64, micro_batch: usize) -> u64 {
        let s = seed ^ (micro_batch as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
        s ^ (self.rank() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

/// Every rank takes rank 0's weights, optimizer moments and position (see `Ranks::share_start`).
pub fn share_start(comm: &dyn Communicator, opt: &mut AdamW, state: &mut TrainerState) -> Result<()> {
    let n = opt.vars.len();
    let mut all: Vec<Tensor> = opt.vars.iter().map(|v| v.as_tensor().clone()).collect();
    all.extend(opt.m.iter().cloned());
    all.extend(opt.v.iter().cloned());
    let got = broadcast_tensors(comm, &all, 0)?;
    for (var, t) in opt.vars.iter().zip(&got[..n]) {
        var.set(t)?;
    }
    // each moment gets storage of its own size: candle's `copy` and host transfers of a view
    // take its whole storage (the broadcast buffer), once per tensor
    let own = |t: &Tensor| t.broadcast_mul(&Tensor::new(1f32, t.device())?);
    opt.m = got[n..2 * n].iter().map(own).collect::<candle_core::Result<_>>()?;
    opt.v = got[2 * n..].iter().map(own).collect::<candle_core::Result<_>>()?;
    let mut pos = [opt.step as f32, state.global_step as f32];
    comm.broadcast(&mut pos, 0)?;
    if pos.iter().any(|&p| p >= (1u32 << 24) as f32) {
        bail!("rank 0's step counter {} is past what the ranks exchange exactly", pos[0]);
    }
    (opt.step, state.global_step) = (pos[0] as u64, pos[1] as usize);
    opt.refresh_work()
}

/// Rank 0's `plan` against this rank's (see `Ranks::same_plan`).
pub fn same_plan(comm: &dyn Communicator, plan: &[(&str, usize)]) -> Result<()> {
    let mut theirs: Vec<f32> = plan.iter().map(|(_, v)| *v as f32).collect();
    comm.broadcast(&mut theirs, 0)?;
    for ((name, mine), &t) in plan.iter().zip(&theirs) {
        if *mine as f32 != t {
            bail!(
                "rank {}: {name} is {mine} here and {t} on rank 0; every rank must see the same data and settings (the same --data snapshot, flags and GEMMACLIP_* variables)",
                comm.rank()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{same_plan, share_start};
    use crate::dist::comm::{Communicator, ThreadComm};
    use crate::train::optimizer::{AdamW, AdamWConfig};
    use crate::train::state::TrainerState;
    use candle_core::{Device, Storage, Tensor, Var};

    fn state(step: usize) -> TrainerState {
        TrainerState {
            global_step: step,
            total_steps: 10,
            seed: 0,
            per_device_train_batch_size: 1,
            gradient_accumulation_steps: 1,
            train_rows: 4,
            world_size: 2,
        }
    }

    /// Elements in the storage behind `t` (a view may hold much more than itself).
    fn storage_len(t: &Tensor) -> usize {
        let (s, _) = t.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => c.as_slice::<f32>().unwrap().len(),
            _ => unreachable!("CPU tensors"),
        }
    }

    #[test]
    fn every_rank_starts_from_rank_zeros_weights_moments_and_step_in_storage_of_its_own() {
        let comms = ThreadComm::group(2);
        let got: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank() as f32;
                        let vars = vec![
                            Var::from_tensor(&Tensor::full(r, (2, 3), &Device::Cpu).unwrap()).unwrap(),
                            Var::from_tensor(&Tensor::full(r, 5, &Device::Cpu).unwrap()).unwrap(),
                        ];
                        let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
                        opt.m = opt.m.iter().map(|m| (m + (r as f64 + 1.0)).unwrap()).collect();
                        opt.step = 7 - c.rank() as u64;
                        let mut st = state(3 + c.rank());
                        share_start(c, &mut opt, &mut st).unwrap();
                        (opt, st)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (opt, st) in &got {
            assert_eq!((opt.step, st.global_step), (7, 3));
            for v in &opt.vars {
                assert!(v.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|&x| x == 0.0));
            }
            for (m, v) in opt.m.iter().zip(&opt.v) {
                assert!(m.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|&x| x == 1.0));
                // not views of the one broadcast buffer: a checkpoint would copy all of it per tensor
                assert_eq!(storage_len(m), m.elem_count());
                assert_eq!(storage_len(v), v.elem_count());
            }
        }
    }

    #[test]
    fn a_rank_planning_other_steps_than_rank_zero_is_stopped() {
        let comms = ThreadComm::group(2);
        let got: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || same_plan(c, &[("the number of steps", 10 + c.rank())]).map_err(|e| e.to_string()))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got[0].is_ok());
        let e = got[1].as_ref().unwrap_err();
        assert!(e.contains("rank 1: the number of steps is 11 here and 10 on rank 0"), "{e}");
    }
}
