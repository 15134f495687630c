//! AdamW over f32 Vars with f32 moments (decoupled weight decay, as torch.optim.AdamW), and
//! global-norm gradient clipping. The state is plain tensors so a checkpoint can save it.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    pub vars: Vec<Var>,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Updates applied so far.
    pub step: u64,
    /// Clip and update all tensors in a few fused launches (`fused.rs`; on by default on a GPU,
    /// `GEMMACLIP_COMPOSED_OPTIMIZER=1` turns it off) instead of ~18 candle ops per tensor.
    pub fused: bool,
    /// `work[i]`: the working copy of `vars[i]` in the compute dtype that the forward reads (LoRA
    /// A and B in a bf16 run), rewritten from the master after every update; None: the master
    /// itself is what the forward sees.
    pub work: Vec<Option<Var>>,
}

/// A step's gradient norm before clipping, and the factor the gradients are scaled by.
pub struct Clip {
    pub norm: f64,
    scale: ClipScale,
}

enum ClipScale {
    Host(f64),
    #[cfg(feature = "cuda")]
    Device(Tensor, crate::train::fused::Table),
}

impl AdamW {
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        for v in &vars {
            if v.dtype() != DType::F32 {
                bail!("AdamW keeps f32 state: trainable tensors must be f32, got {:?}", v.dtype());
            }
        }
        let m = vars.iter().map(|v| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars.iter().map(|v| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let on_gpu = vars.first().is_some_and(|v| v.device().is_cuda());
        let fused = cfg!(feature = "cuda") && on_gpu && std::env::var_os("GEMMACLIP_COMPOSED_OPTIMIZER").is_none();
        let work = vec![None; vars.len()];
        Ok(Self { cfg, vars, m, v, step: 0, fused, work })
    }

    /// The tensors the forward reads, whose gradients the step computes: each working copy, or
    /// the master where there is none.
    pub fn graph_vars(&self) -> Vec<Var> {
        self.vars.iter().zip(&self.work).map(|(v, w)| w.as_ref().unwrap_or(v).clone()).collect()
    }

    /// Rewrites every working copy from its master (after loading a checkpoint).
    pub fn refresh_work(&self) -> Result<()> {
        for (v, w) in self.vars.iter().zip(&self.work) {
            if let Some(w) = w {
                w.set(&v.as_tensor().to_dtype(w.dtype())?)?;
            }
        }
        Ok(())
    }

    /// The global L2 norm of `grads` and the factor that clips it to `max_norm` (torch's
    /// clip_grad_norm_); one host sync. `grads[i]` belongs to `vars[i]`.
    pub fn grad_norm(&self, grads: &mut [Option<Tensor>], max_norm: f64) -> Result<Clip> {
        #[cfg(feature = "cuda")]
        if self.fused {
            return self.fused_norm(grads, max_norm);
        }
        let norm = grad_norm(grads)?;
        Ok(Clip { norm, scale: ClipScale::Host(max_norm / (norm + 1e-6)) })
    }

    /// Clips the gradients as `clip` says and applies one update with learning rate `lr`.
    pub fn step_clipped(&mut self, grads: &mut [Option<Tensor>], clip: Clip, lr: f64) -> Result<()> {
        match clip.scale {
            ClipScale::Host(coef) => {
                if coef < 1.0 {
                    for g in grads.iter_mut().flatten() {
                        *g = (g.to_dtype(DType::F32)? * coef)?;
                    }
                }
                self.step(grads, lr)?;
                self.refresh_work()
            }
            #[cfg(feature = "cuda")]
            ClipScale::Device(norm_and_clip, table) => {
                self.step += 1;
                let c = self.cfg;
                let s = crate::train::fused::AdamWScalars {
                    lr,
                    beta1: c.beta1,
                    beta2: c.beta2,
                    eps: c.eps,
                    weight_decay: c.weight_decay,
                    step: self.step,
                };
                let dev = self.vars[0].device().as_cuda_device()?.clone();
                crate::train::fused::adamw(&table, &norm_and_clip, &s, &dev)
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn fused_norm(&self, grads: &mut [Option<Tensor>], max_norm: f64) -> Result<Clip> {
        let Some(first) = self.vars.first() else { return Ok(Clip { norm: 0.0, scale: ClipScale::Host(1.0) }) };
        let dev = first.device().as_cuda_device()?.clone();
        for g in grads.iter_mut().flatten() {
            if !matches!(g.dtype(), DType::F32 | DType::BF16) {
                *g = g.to_dtype(DType::F32)?;
            }
            *g = g.contiguous()?;
        }
        for (m, v) in self.m.iter().zip(&self.v) {
            if !m.is_contiguous() || !v.is_contiguous() {
                bail!("internal: the optimizer state must be contiguous");
            }
        }
        let rows: Vec<_> = grads
            .iter()
            .enumerate()
            .filter_map(|(i, g)| {
                g.as_ref().map(|grad| crate::train::fused::Row {
                    param: self.vars[i].as_tensor(),
                    grad,
                    m: &self.m[i],
                    v: &self.v[i],
                    work: self.work[i].as_ref().map(|w| w.as_tensor()),
                })
            })
            .collect();
        if rows.is_empty() {
            return Ok(Clip { norm: 0.0, scale: ClipScale::Host(1.0) });
        }
        let table = crate::train::fused::Table::new(&rows, &dev)?;
        let nc = crate::train::fused::norm_and_clip(&table, max_norm, &dev)?;
        let norm = nc.narrow(0, 0, 1)?.to_vec1::<f32>()?[0] as f64;
        Ok(Clip { norm, scale: ClipScale::Device(nc, table) })
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `vars[i]` (None: no gradient this step).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let g = g.to_dtype(DType::F32)?;
            let var = &self.vars[i];
            self.m[i] = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&self.v[i] / bc2)?.sqrt()? + c.eps)?;
            let update = ((&self.m[i] / bc1)? / denom)?;
            let mut theta = var.as_tensor().clone();
            if c.weight_decay != 0.0 {
                theta = (theta * (1.0 - lr * c.weight_decay))?;
            }
            var.set(&(theta - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// The gradients of one optimizer step's micro-batches, summed in f32 (a bf16 working copy's
/// gradient widened exactly first). On a GPU with the fused optimizer the sums happen in place,
/// one launch per micro-batch (`fused::Accumulator`); otherwise as candle's `acc + g`.
pub struct GradSum {
    sums: Vec<Option<Tensor>>,
    micro_batches: usize,
    /// Tensors whose sums this step already went to the ranks' sum (a bucket, grad_buckets.rs),
    /// with whether this rank had written a gradient for them by then.
    pub(crate) summed_early: Vec<Option<bool>>,
    #[cfg(feature = "cuda")]
    fused: Option<crate::train::fused::Accumulator>,
}

impl GradSum {
    /// For `opt`'s tensors and `micro_batches` micro-batches a step; `flat`: keep the sums in one
    /// flat buffer even for one micro-batch (a data-parallel run reduces it in one collective).
    pub fn new(opt: &AdamW, micro_batches: usize, flat: bool) -> Result<Self> {
        #[cfg(not(feature = "cuda"))]
        let _ = flat;
        #[cfg(feature = "cuda")]
        let fused = if opt.fused && (micro_batches > 1 || flat) {
            let params: Vec<&Tensor> = opt.vars.iter().map(|v| v.as_tensor()).collect();
            Some(crate::train::fused::Accumulator::new(&params)?)
        } else {
            None
        };
        Ok(Self {
            sums: vec![None; opt.vars.len()],
            micro_batches,
            summed_early: vec![None; opt.vars.len()],
            #[cfg(feature = "cuda")]
            fused,
        })
    }

    /// Adds one micro-batch's gradients (None where the batch does not reach).
    pub fn add(&mut self, grads: Vec<Option<Tensor>>) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(acc) = self.fused.as_mut() {
            let dev = grads.iter().flatten().next().map(|g| g.device().clone());
            return match dev {
                Some(dev) => acc.add(&grads, dev.as_cuda_device()?),
                None => Ok(()),
            };
        }
        for (sum, g) in self.sums.iter_mut().zip(grads) {
            if let Some(g) = g {
                let g = if self.micro_batches > 1 { g.to_dtype(DType::F32)? } else { g };
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// Adds the gradients `which` of one micro-batch, taken out of `grads`.
    pub fn add_some(&mut self, grads: &mut [Option<Tensor>], which: &[usize]) -> Result<()> {
        let mut part = vec![None; grads.len()];
        for &i in which {
            part[i] = grads[i].take();
        }
        self.add(part)
    }

    /// The sums `which` so far (host-side sums; taken out), for a bucket's collective.
    pub(crate) fn take_some(&mut self, which: &[usize]) -> Vec<Option<Tensor>> {
        which.iter().map(|&i| self.sums[i].take()).collect()
    }

    /// Puts back the sums `which` after their collective.
    pub(crate) fn put_some(&mut self, which: &[usize], sums: Vec<Option<Tensor>>) {
        for (&i, s) in which.iter().zip(sums) {
            self.sums[i] = s;
        }
    }

    /// The GPU accumulator, when the sums are kept in one flat buffer.
    #[cfg(feature = "cuda")]
    pub fn flat(&mut self) -> Option<&mut crate::train::fused::Accumulator> {
        self.fused.as_mut()
    }

    /// The step's summed gradients, and a fresh start for the next step.
    pub fn take(&mut self) -> Vec<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if let Some(acc) = self.fused.as_mut() {
            return acc.take();
        }
        let n = self.sums.len();
        std::mem::replace(&mut self.sums, vec![None; n])
    }
}

/// The global L2 norm of the gradients (each squared and summed in f32, on their device).
fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sq: Option<Tensor> = None;
    for g in grads.iter().flatten() {
        let s = g.to_dtype(DType::F32)?.sqr()?.sum_all()?;
        sq = Some(match sq {
            Some(a) => (a + s)?,
            None => s,
        });
    }
    let Some(sq) = sq else { return Ok(0.0) };
    Ok(sq.to_scalar::<f32>()?.sqrt() as f64)
}
