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
        Ok(Self { cfg, vars, m, v, step: 0 })
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

/// Scales gradients so their global L2 norm is at most `max_norm` (torch's clip_grad_norm_);
/// returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut sq: Option<Tensor> = None;
    for g in grads.iter().flatten() {
        let s = g.to_dtype(DType::F32)?.sqr()?.sum_all()?;
        sq = Some(match sq {
            Some(a) => (a + s)?,
            None => s,
        });
    }
    let Some(sq) = sq else { return Ok(0.0) };
    let norm = sq.to_scalar::<f32>()?.sqrt() as f64;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}
