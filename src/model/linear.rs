//! A plain linear layer, `y = x W^T + b`, for any leading dimensions.

use candle_core::{Module, Result, Tensor};

#[derive(Clone, Debug)]
pub struct Linear {
    /// [out, in]
    pub weight: Tensor,
    /// [out]
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out_f, in_f) = self.weight.dims2()?;
        let lead = &x.dims()[..x.rank() - 1];
        let rows: usize = lead.iter().product();
        // [rows, in] x [in, out]: one GEMM regardless of the leading dims.
        let y = x.reshape((rows, in_f))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut shape = lead.to_vec();
        shape.push(out_f);
        y.reshape(shape)
    }
}
