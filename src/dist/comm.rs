//! The collectives data-parallel training needs, behind a small trait: every rank sums its
//! gradients and its loss with the others, and takes the starting weights from rank 0. Three
//! implementations: NCCL between GPU processes (`nccl.rs`), TCP through rank 0 between CPU
//! processes (`tcp.rs`), and threads of one process here (what in-process tests run). A rank that
//! fails tells the others (`abort`, or an `AbortOnDrop` guard that does it on an error return or a
//! panic), which then stop with an error naming it instead of waiting.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::sync::{Arc, Condvar, Mutex};

pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replaces `values` by their elementwise sum over the ranks, added in rank order, so every
    /// rank gets the same bits.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()>;
    /// Replaces `values` by rank `root`'s.
    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()>;
    /// Tells the other ranks that this one failed with `why`; their collectives then fail too.
    fn abort(&self, why: &str);
    /// The elementwise sum over the ranks of an f32 tensor, on its device. By default through
    /// the host; NCCL reduces device memory directly.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let mut v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.all_reduce_sum(&mut v)?;
        Ok(Tensor::from_vec(v, t.shape(), t.device())?)
    }
    /// Whether `start_sum_in_place` leaves the caller free to go on while it runs (NCCL, on a
    /// stream of its own); the others sum at `reduce_step`'s end of the step instead.
    fn overlaps(&self) -> bool {
        false
    }
    /// Starts summing the f32 device stretch `t` over the ranks in place, after the work queued
    /// so far, without waiting for it (every rank starts the same sums in the same order);
    /// nothing reads or writes `t` until `wait_sums`.
    fn start_sum_in_place(&self, _t: &Tensor) -> Result<()> {
        bail!("this communicator sums through the host, not in place on the device")
    }
    /// Makes the device's work from here on wait for every started sum.
    fn wait_sums(&self) -> Result<()> {
        Ok(())
    }
    /// Rank `root`'s copy of an f32 tensor, on every rank.
    fn broadcast_tensor(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let mut v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.broadcast(&mut v, root)?;
        Ok(Tensor::from_vec(v, t.shape(), t.device())?)
    }
}

/// Calls `abort` on the communicator when dropped unless `disarm`ed: a rank that returns an error
/// or panics between collectives then still stops the others instead of leaving them waiting.
pub struct AbortOnDrop<'a> {
    comm: &'a dyn Communicator,
    armed: bool,
}

impl<'a> AbortOnDrop<'a> {
    pub fn new(comm: &'a dyn Communicator) -> Self {
        Self { comm, armed: true }
    }
    /// The rank finished normally.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for AbortOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let why = if std::thread::panicking() { "it panicked" } else { "it stopped with an error" };
            self.comm.abort(why);
        }
    }
}

/// Sums gradients over the ranks in place (None where no rank has one: a tensor this step did not
/// reach anywhere; a rank without a gradient where others have one adds zeros). The sums are f32
/// (a bf16 gradient is widened exactly first), views of one flat buffer reduced in one collective.
pub fn all_reduce_grads(comm: &dyn Communicator, grads: &mut [Option<Tensor>], like: &[Tensor]) -> Result<()> {
    // which tensors have a gradient anywhere: one flag per tensor, summed
    let mut has: Vec<f32> = grads.iter().map(|g| if g.is_some() { 1.0 } else { 0.0 }).collect();
    comm.all_reduce_sum(&mut has)?;
    let mut parts = vec![];
    for ((g, t), &h) in grads.iter().zip(like).zip(&has) {
        if h > 0.0 {
            parts.push(match g {
                Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
                None => Tensor::zeros(t.elem_count(), DType::F32, t.device())?,
            });
        }
    }
    if parts.is_empty() {
        return Ok(());
    }
    let flat = comm.all_reduce_sum_tensor(&Tensor::cat(&parts, 0)?)?;
    let reached: Vec<&Tensor> = like.iter().zip(&has).filter(|(_, &h)| h > 0.0).map(|(t, _)| t).collect();
    let mut summed = views(&flat, &reached)?.into_iter();
    for (g, &h) in grads.iter_mut().zip(&has) {
        if h > 0.0 {
            *g = summed.next();
        }
    }
    Ok(())
}

/// `like`-shaped views of consecutive stretches of the 1-D `flat` (a buffer that crossed the ranks
/// whole), in order.
pub fn views(flat: &Tensor, like: &[&Tensor]) -> candle_core::Result<Vec<Tensor>> {
    let mut at = 0;
    let mut out = vec![];
    for t in like {
        let n = t.elem_count();
        out.push(flat.narrow(0, at, n)?.reshape(t.dims())?);
        at += n;
    }
    Ok(out)
}

/// Every rank's `tensors` replaced by rank `root`'s (one collective over their concatenation).
pub fn broadcast_tensors(comm: &dyn Communicator, tensors: &[Tensor], root: usize) -> Result<Vec<Tensor>> {
    if tensors.is_empty() {
        return Ok(vec![]);
    }
    let parts =
        tensors.iter().map(|t| t.to_dtype(DType::F32)?.flatten_all()).collect::<candle_core::Result<Vec<_>>>()?;
    let flat = comm.broadcast_tensor(&Tensor::cat(&parts, 0)?, root)?;
    let like: Vec<&Tensor> = tensors.iter().collect();
    let got = views(&flat, &like)?.into_iter().zip(tensors).map(|(v, t)| v.to_dtype(t.dtype()));
    Ok(got.collect::<candle_core::Result<_>>()?)
}

/// Ranks as threads of one process.
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
}

struct State {
    /// each rank's contribution to the collective in progress
    slots: Vec<Option<Vec<f32>>>,
    /// ranks that have read the result of the collective in progress
    taken: usize,
    /// bumped when a collective's result is complete
    generation: u64,
    result: Vec<f32>,
    failed: Option<(usize, String)>,
}

impl ThreadComm {
    /// One communicator per rank, for `world` threads.
    pub fn group(world: usize) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                slots: vec![None; world],
                taken: 0,
                generation: 0,
                result: vec![],
                failed: None,
            }),
            cv: Condvar::new(),
        });
        (0..world).map(|rank| ThreadComm { rank, shared: shared.clone() }).collect()
    }

    /// Every rank hands in `values`; `combine` makes the result from all of them (in rank order)
    /// once the last one arrives; every rank gets it back.
    fn collective(&self, values: &mut [f32], combine: impl Fn(&[Option<Vec<f32>>]) -> Vec<f32>) -> Result<()> {
        let sh = &self.shared;
        let mut st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
        // wait until the previous collective's result has been read by everyone
        while st.taken != 0 && st.failed.is_none() {
            st = sh.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if let Some((r, why)) = &st.failed {
            bail!("rank {r} failed: {why}");
        }
        st.slots[self.rank] = Some(values.to_vec());
        let generation = st.generation;
        if st.slots.iter().all(Option::is_some) {
            let lens: Vec<usize> = st.slots.iter().flatten().map(Vec::len).collect();
            if lens.iter().any(|&l| l != lens[0]) {
                let why = format!("ranks handed in different lengths {lens:?}");
                st.failed = Some((self.rank, why.clone()));
                sh.cv.notify_all();
                bail!("{why}");
            }
            st.result = combine(&st.slots);
            st.slots.iter_mut().for_each(|s| *s = None);
            st.generation += 1;
            sh.cv.notify_all();
        } else {
            while st.generation == generation && st.failed.is_none() {
                st = sh.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.generation == generation {
                let (r, why) = st.failed.clone().expect("woken by a failure");
                bail!("rank {r} failed: {why}");
            }
        }
        values.copy_from_slice(&st.result);
        st.taken += 1;
        if st.taken == sh.world {
            st.taken = 0;
            sh.cv.notify_all();
        }
        Ok(())
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        self.collective(values, |slots| {
            let mut sum = slots[0].clone().expect("every rank handed in");
            for s in slots[1..].iter().flatten() {
                sum.iter_mut().zip(s).for_each(|(a, b)| *a += b);
            }
            sum
        })
    }

    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world() {
            bail!("broadcast from rank {root} in a world of {}", self.world());
        }
        self.collective(values, |slots| slots[root].clone().expect("every rank handed in"))
    }

    fn abort(&self, why: &str) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.failed.is_none() {
            st.failed = Some((self.rank, why.to_string()));
        }
        self.shared.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::{Communicator, ThreadComm};

    #[test]
    fn all_reduce_and_broadcast_agree_on_every_rank() {
        let comms = ThreadComm::group(3);
        let out: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank() as f32;
                        let mut sum = vec![r, 10.0 * r, 0.5];
                        c.all_reduce_sum(&mut sum).unwrap();
                        // twice in a row: the second collective must not mix with the first
                        c.all_reduce_sum(&mut sum).unwrap();
                        let mut b = vec![r; 2];
                        c.broadcast(&mut b, 2).unwrap();
                        (sum, b)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, b) in out {
            assert_eq!(sum, vec![9.0, 90.0, 4.5]);
            assert_eq!(b, vec![2.0, 2.0]);
        }
    }

    #[test]
    fn a_rank_that_panics_under_its_guard_stops_the_others() {
        use super::AbortOnDrop;
        let comms = ThreadComm::group(2);
        let errs: Vec<Option<String>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let guard = AbortOnDrop::new(c);
                        if c.rank() == 0 {
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                let _inner = AbortOnDrop::new(c);
                                panic!("row 3 is unreadable");
                            }));
                            assert!(r.is_err());
                            guard.disarm();
                            return None;
                        }
                        let mut v = vec![1.0];
                        let e = c.all_reduce_sum(&mut v).err().map(|e| e.to_string());
                        guard.disarm();
                        e
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(errs[1].as_deref(), Some("rank 0 failed: it panicked"));
    }

    #[test]
    fn a_failing_rank_stops_the_others_with_its_name() {
        let comms = ThreadComm::group(3);
        let errs: Vec<Option<String>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        if c.rank() == 1 {
                            c.abort("cannot read row 17");
                            return None;
                        }
                        let mut v = vec![1.0];
                        c.all_reduce_sum(&mut v).err().map(|e| e.to_string())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(errs[0].as_deref(), Some("rank 1 failed: cannot read row 17"));
        assert_eq!(errs[2].as_deref(), Some("rank 1 failed: cannot read row 17"));
    }
}
