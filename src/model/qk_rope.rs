//! Gemma's q/k RMSNorm + transpose + RoPE as one GPU op each way (kernels/rmsnorm.cu): x
//! [B, L, H*D] bf16 straight from the projection -> [B, H, L, D], where the composed path takes
//! a norm, a transpose copy, two casts of the tables and eight elementwise ops, and about twice as
//! many in the backward. The forward rounds where the composed one does; the backward keeps the
//! inverse rotation in f32. Tested against the composed path in tests/gpu.rs.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rmsnorm.ptx"));
const MODULE: &str = "gemmaclip_rmsnorm";

/// The frozen (1 + w) scale [D] f32, the RoPE tables [L, D/2] f32, eps, the number of heads.
#[derive(Clone)]
pub struct NormRope {
    pub heads: usize,
    pub scale: Tensor,
    pub cos: Tensor,
    pub sin: Tensor,
    pub eps: f32,
}

struct NormRopeBwd(NormRope);

fn f32_view<'a>(
    st: &'a Storage,
    l: &Layout,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    let Storage::Cuda(s) = st else { candle_core::bail!("norm-rope: tables not on the GPU") };
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("norm-rope: tables not contiguous") };
    Ok(s.as_cuda_slice::<f32>()?.slice(a..b))
}

impl NormRope {
    /// (batch, len, heads, cols) of x [B, L, H*D]
    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let [b, len, hd] = l.dims() else { candle_core::bail!("norm-rope: x must be [B, L, H*D]") };
        let cols = hd / self.heads;
        if self.cos.dims() != [*len, cols / 2] || cols % 2 != 0 || cols > 2048 || cols * self.heads != *hd {
            candle_core::bail!(
                "norm-rope: tables {:?} for x {:?} with {} heads",
                self.cos.dims(),
                l.dims(),
                self.heads
            );
        }
        Ok((*b, *len, self.heads, cols))
    }

    /// `names`: the kernel with one block per row, and the one with one warp per row of up to 256.
    fn launch(
        &self,
        names: (&str, &str),
        inputs: &[(&CudaStorage, &Layout)],
        out_shape: Shape,
    ) -> candle_core::Result<CudaStorage> {
        let (x, xl) = inputs[0];
        let (batch, len, heads, cols) = self.dims(xl)?;
        let rows = batch * len * heads;
        let dev = x.device().clone();
        // rows of up to 256 values: one warp each (the same bits, see rmsnorm.cu)
        let warp = cols <= 256;
        let f = dev.get_or_load_custom_func(if warp { names.1 } else { names.0 }, MODULE, PTX)?;
        let out = unsafe { dev.alloc::<half::bf16>(rows * cols)? };
        let mut views = vec![];
        for (s, l) in inputs {
            if s.dtype() != DType::BF16 {
                candle_core::bail!("norm-rope: bf16 only");
            }
            let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("norm-rope: input not contiguous") };
            views.push(s.as_cuda_slice::<half::bf16>()?.slice(a..b));
        }
        let ((ss, sl), (cs, cl), (ns, nl)) =
            (self.scale.storage_and_layout(), self.cos.storage_and_layout(), self.sin.storage_and_layout());
        let (scale, cos, sin) = (f32_view(&ss, sl)?, f32_view(&cs, cl)?, f32_view(&ns, nl)?);
        let mut b = f.builder();
        for v in &views {
            b.arg(v);
        }
        b.arg(&scale);
        b.arg(&cos);
        b.arg(&sin);
        b.arg(&out);
        let (h, l, c, e) = (heads as i32, len as i32, cols as i32, self.eps);
        b.arg(&h);
        b.arg(&l);
        b.arg(&c);
        b.arg(&e);
        let rows_i = rows as i32;
        if warp {
            b.arg(&rows_i);
        }
        // 256 threads as the plain RMSNorm kernel, so the sum of squares adds in the same order
        let blocks = if warp { rows.div_ceil(8) } else { rows };
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        unsafe { b.launch(cfg) }.w()?;
        debug_assert_eq!(out_shape.elem_count(), rows * cols);
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

impl CustomOp1 for NormRope {
    fn name(&self) -> &'static str {
        "gemma-qk-norm-rope"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("norm-rope: the CPU path is composed")
    }
    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, len, heads, cols) = self.dims(l)?;
        let shape = Shape::from((b, heads, len, cols));
        Ok((self.launch(("qknorm_rope_fwd_bf16", "qknorm_rope_fwd_bf16_warp"), &[(x, l)], shape.clone())?, shape))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &NormRopeBwd(self.clone()))?))
    }
}

impl CustomOp2 for NormRopeBwd {
    fn name(&self) -> &'static str {
        "gemma-qk-norm-rope-bwd"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("norm-rope: the CPU path is composed")
    }
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let shape = xl.shape().clone();
        Ok((
            self.0.launch(("qknorm_rope_bwd_bf16", "qknorm_rope_bwd_bf16_warp"), &[(x, xl), (g, gl)], shape.clone())?,
            shape,
        ))
    }
}
