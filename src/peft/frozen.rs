//! Frozen matrices on the gradient path: `y = x W^T` whose backward returns dX = g W only.
//! candle's matmul backward always computes dW as well (candle-core's backprop.rs), which for frozen
//! weights is wasted work and, for the tied 262208 x 2560 lm_head, a 1.3 GB tensor left in the
//! GradStore. Here W is not an input of the op at all, so nothing can compute a gradient for it.

use crate::peft::nf4::Nf4Weight;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};

#[derive(Clone, Debug)]
pub enum FrozenWeight {
    /// A plain weight [out, in] in the compute dtype (the unquantized base, the tied lm_head).
    Dense(Tensor),
    /// NF4, dequantized to the compute dtype for each use and then dropped.
    Nf4(Nf4Weight),
}

impl FrozenWeight {
    /// [out, in]
    pub fn shape(&self) -> (usize, usize) {
        match self {
            FrozenWeight::Dense(w) => w.dims2().expect("frozen weight is 2-D"),
            FrozenWeight::Nf4(q) => q.shape,
        }
    }

    pub fn device(&self) -> &candle_core::Device {
        match self {
            FrozenWeight::Dense(w) => w.device(),
            FrozenWeight::Nf4(q) => q.packed.device(),
        }
    }

    /// The weight as a tensor of `dtype`: the stored one for Dense, a fresh dequantization for NF4.
    pub fn materialize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) if w.dtype() == dtype => Ok(w.clone()),
            FrozenWeight::Dense(w) => w.to_dtype(dtype),
            FrozenWeight::Nf4(q) => q.dequantize(dtype),
        }
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            FrozenWeight::Nf4(q) => q.bytes(),
        }
    }

    /// x [.., in] -> [.., out]. Gradients flow to x only.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        if !x.track_op() {
            // No graph to build: an ordinary matmul, with the weight gone right after.
            let (o, i) = self.shape();
            let lead = &x.dims()[..x.rank() - 1];
            let rows: usize = lead.iter().product();
            let x2 = x.reshape((rows, i))?;
            let fused = match self {
                FrozenWeight::Nf4(q) => q.gemv(&x2, None)?,
                FrozenWeight::Dense(_) => None,
            };
            let y = match fused {
                Some(y) => y,
                None => x2.matmul(&self.materialize(x.dtype())?.t()?)?,
            };
            let mut shape = lead.to_vec();
            shape.push(o);
            return y.reshape(shape);
        }
        x.apply_op1(FrozenMatmul { w: self.clone() })
    }
}

struct FrozenMatmul {
    w: FrozenWeight,
}

impl FrozenMatmul {
    /// (m, n, k, output shape, layout of x as [m, k], layout of W^T as [k, n])
    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize, Shape, Layout, Layout)> {
        let (n, k) = self.w.shape();
        let dims = l.shape().dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("frozen linear: input {:?} does not end in {k}", dims);
        }
        if !l.is_contiguous() {
            candle_core::bail!("frozen linear: input must be contiguous");
        }
        let m = l.shape().elem_count() / k;
        let mut out = dims.to_vec();
        *out.last_mut().unwrap() = n;
        let xl = Layout::contiguous_with_offset((m, k), l.start_offset());
        let wt = Layout::contiguous((n, k)).transpose(0, 1)?;
        Ok((m, n, k, Shape::from(out), xl, wt))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n, k, out, xl, wt) = self.dims(l)?;
        let w = self.w.materialize(x.dtype())?.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else { candle_core::bail!("frozen linear: weight is not on the CPU") };
        let wt = Layout::new(wt.shape().clone(), wt.stride().to_vec(), wl.start_offset());
        Ok((x.matmul(ws, (1, m, n, k), &xl, &wt)?, out))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k, out, xl, wt) = self.dims(l)?;
        let w = self.w.materialize(x.dtype())?.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else { candle_core::bail!("frozen linear: weight is not on the GPU") };
        let wt = Layout::new(wt.shape().clone(), wt.stride().to_vec(), wl.start_offset());
        Ok((x.matmul(ws, (1, m, n, k), &xl, &wt)?, out))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, k) = self.w.shape();
        let m = g.elem_count() / n;
        let w = self.w.materialize(g.dtype())?; // dequantized again rather than kept alive
        let dx = g.contiguous()?.reshape((m, n))?.matmul(&w)?; // [m, k]
        debug_assert_eq!(x.dims().last(), Some(&k));
        Ok(Some(dx.reshape(x.dims())?))
    }
}
