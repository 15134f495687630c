//! LoRA on frozen linears: y = W x + (alpha / r) B A dropout(x), as PEFT computes it. A and B are
//! f32 `Var`s (the masters the optimizer updates). In a bf16 training run they also have working
//! copies in bf16 that the forward uses as they are, refreshed by the optimizer once per step, so
//! no cast runs per call; their gradients are the bf16 gradients the cast's backward would have
//! widened to f32, so nothing changes numerically.

use crate::peft::dropout;
use crate::peft::frozen::FrozenWeight;
use crate::rng::{name_hash, SplitMix64};
use candle_core::{DType, Device, Tensor, Var};

/// The seven projections PEFT targets on Gemma (the original project's choice).
pub const DEFAULT_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Module names (the last path component) that get an adapter.
    pub targets: Vec<String>,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

pub struct Lora {
    /// [r, in]
    pub a: Var,
    /// [out, r]
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
    /// Distinguishes this module's dropout stream from the others'.
    pub stream: u64,
    /// Answering only: A and B enter the computation untracked, so no graph is built and the
    /// frozen base can take its inference fast path.
    pub frozen: bool,
    /// Training in a narrower dtype than f32: (A, B) in that dtype, the tensors the graph sees.
    pub work: Option<(Var, Var)>,
}

impl Lora {
    /// PEFT's init: A ~ kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
    pub fn init(
        name: &str,
        in_f: usize,
        out_f: usize,
        spec: &LoraSpec,
        seed: u64,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        let bound = 1.0 / (in_f as f64).sqrt();
        let mut rng = SplitMix64::new(seed ^ name_hash(name));
        let a: Vec<f32> = (0..spec.r * in_f).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
        Ok(Self {
            a: Var::from_tensor(&Tensor::from_vec(a, (spec.r, in_f), dev)?)?,
            b: Var::zeros((out_f, spec.r), DType::F32, dev)?,
            scale: spec.scale(),
            dropout: spec.dropout,
            stream: name_hash(name),
            frozen: false,
            work: None,
        })
    }
}

pub struct LoraLinear {
    pub base: FrozenWeight,
    pub lora: Option<Lora>,
}

impl LoraLinear {
    pub fn frozen(base: FrozenWeight) -> Self {
        Self { base, lora: None }
    }

    /// x [.., in] -> [.., out]. `dropout_seed` is Some in training (one value per step); the same
    /// seed gives the same masks, which gradient checkpointing's recompute relies on.
    pub fn forward(&self, x: &Tensor, dropout_seed: Option<u64>) -> candle_core::Result<Tensor> {
        if let Some(y) = self.decode_fast_path_with(x, None)? {
            return Ok(y);
        }
        #[cfg(feature = "cuda")]
        if let Some(l) = &self.lora {
            if let Some(y) = crate::peft::fused_lora::forward(&self.base, l, x, dropout_seed)? {
                return Ok(y);
            }
        }
        let y = self.base.forward(x)?;
        let Some(l) = &self.lora else { return Ok(y) };
        let dtype = x.dtype();
        let xin = match dropout_seed {
            Some(seed) if l.dropout > 0.0 => dropout::apply(x, l.dropout, seed ^ l.stream)?,
            _ => x.clone(),
        };
        let (r, in_f) = l.a.dims2()?;
        let lead = &x.dims()[..x.rank() - 1];
        let rows: usize = lead.iter().product();
        let (a, b) = match &l.work {
            Some((wa, wb)) if l.frozen && wa.dtype() == dtype => (wa.as_tensor().detach(), wb.as_tensor().detach()),
            Some((wa, wb)) if wa.dtype() == dtype => (wa.as_tensor().clone(), wb.as_tensor().clone()),
            _ if l.frozen => (l.a.as_tensor().detach(), l.b.as_tensor().detach()),
            _ => (l.a.as_tensor().clone(), l.b.as_tensor().clone()),
        };
        let (a, b) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
        let h = xin.reshape((rows, in_f))?.matmul(&a.t()?)?; // [rows, r]
        let d = (h.matmul(&b.t()?)? * l.scale)?; // [rows, out]
        debug_assert_eq!(h.dim(1)?, r);
        let d = d.reshape(y.dims())?;
        y + d
    }

    /// `forward`, given this adapter's down projection `h = x·Aᵀ` [rows, r] where a `SharedDown`
    /// computed it together with its neighbours' (answering a few rows).
    pub fn forward_with_down(
        &self,
        x: &Tensor,
        h: Option<&Tensor>,
        dropout_seed: Option<u64>,
    ) -> candle_core::Result<Tensor> {
        if let Some(h) = h {
            if let Some(y) = self.decode_fast_path_with(x, Some(h))? {
                return Ok(y);
            }
        }
        self.forward(x, dropout_seed)
    }

    /// Answering a few rows with an NF4 base and a frozen adapter in bf16: `h = x·Aᵀ` (or the `h`
    /// given), then the NF4 GEMV adds `s·h·Bᵀ` in its own pass (two launches where the composed
    /// form takes five).
    fn decode_fast_path_with(&self, x: &Tensor, h: Option<&Tensor>) -> candle_core::Result<Option<Tensor>> {
        let (FrozenWeight::Nf4(q), Some(l)) = (&self.base, &self.lora) else { return Ok(None) };
        let Some((wa, wb)) = &l.work else { return Ok(None) };
        if !l.frozen || wa.dtype() != x.dtype() {
            return Ok(None);
        }
        let in_f = x.dim(candle_core::D::Minus1)?;
        let x2 = x.reshape(((), in_f))?;
        if !q.gemv_applies(&x2) {
            return Ok(None);
        }
        let h = match h {
            Some(h) => h.clone(),
            None => crate::peft::nf4::lora_down(&x2, wa.as_tensor())?, // [rows, r]
        };
        let Some(y) = q.gemv(&x2, Some((&h, wb.as_tensor(), l.scale)))? else { return Ok(None) };
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("rank >= 1") = q.shape.0;
        Ok(Some(y.reshape(shape)?))
    }
}

/// Answering: the LoRA down projections of linears that read the same input (q/k/v, gate/up) in
/// one launch instead of one each, from their bf16 A matrices stacked once when the adapters are
/// frozen (`Gemma3Text::freeze_adapters` builds it again whenever it runs).
pub struct SharedDown {
    /// [parts·r, in] bf16
    a: Tensor,
    r: usize,
}

impl SharedDown {
    /// None unless every linear has an NF4 base and a frozen bf16 adapter of one rank and input width.
    pub fn new(linears: &[&LoraLinear]) -> candle_core::Result<Option<Self>> {
        let mut parts = vec![];
        for lin in linears {
            let (FrozenWeight::Nf4(_), Some(l)) = (&lin.base, &lin.lora) else { return Ok(None) };
            match &l.work {
                Some((wa, _)) if l.frozen && wa.dtype() == DType::BF16 && wa.device().is_cuda() => {
                    parts.push(wa.as_tensor().detach())
                }
                _ => return Ok(None),
            }
        }
        let Some(first) = parts.first() else { return Ok(None) };
        let dims = first.dims().to_vec();
        if parts.len() < 2 || parts.iter().any(|p| p.dims() != dims.as_slice()) {
            return Ok(None);
        }
        Ok(Some(Self { a: Tensor::cat(&parts, 0)?.contiguous()?, r: dims[0] }))
    }

    /// Each linear's `h = x·Aᵀ` [rows, r] for x [.., in], or None where the decode fast path would
    /// not take x (too many rows, not on the GPU) and each linear computes its own.
    pub fn forward(&self, x: &Tensor, first: &LoraLinear) -> candle_core::Result<Option<Vec<Tensor>>> {
        let FrozenWeight::Nf4(q) = &first.base else { return Ok(None) };
        let in_f = x.dim(candle_core::D::Minus1)?;
        let x2 = x.reshape(((), in_f))?;
        if !q.gemv_applies(&x2) {
            return Ok(None);
        }
        let Some(h) = crate::peft::nf4::lora_down_parts(&x2, &self.a, self.r)? else { return Ok(None) };
        (0..h.dim(0)?).map(|p| h.get(p)).collect::<candle_core::Result<Vec<_>>>().map(Some)
    }
}
