//! Differentiable building blocks, composed from candle ops that have a backward (candle-core's backprop.rs; docs/ARCHITECTURE.md):
//! norms and softmax run in f32 and cast back, as transformers does.

use candle_core::{DType, Result, Tensor, D};

/// Gemma's RMSNorm scale `1 + w` in f32, as transformers computes it (`1.0 + weight.float()`).
pub fn gemma_norm_scale(weight: &Tensor) -> Result<Tensor> {
    weight.to_dtype(DType::F32)? + 1.0
}

/// Gemma's RMSNorm: `x * rsqrt(mean(x^2) + eps) * scale` with `scale = 1 + w` (f32), all in f32,
/// then cast to x's dtype. On a GPU one fused kernel each way (the scale is frozen: dx only);
/// elsewhere composed from differentiable ops.
pub fn gemma_rms_norm(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) {
        return crate::model::tape::run1(
            &x.contiguous()?,
            rmsnorm_cuda::RmsNorm { scale: scale.clone(), eps: eps as f32 },
        );
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?;
    normed.broadcast_mul(scale)?.to_dtype(dtype)
}

/// Gemma's residual step `x + rmsnorm(h, s1)`, and with `s2` also the next norm `rmsnorm(x', s2)`
/// of its result. Answering on a GPU in bf16 (nothing tracked): one fused launch, rounded as the
/// composed form rounds (tests/gpu.rs); elsewhere composed.
pub fn residual_norm(
    x: &Tensor,
    h: &Tensor,
    s1: &Tensor,
    s2: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.dtype() == DType::BF16 && h.dtype() == DType::BF16 && !x.track_op() && !h.track_op() {
        return rmsnorm_cuda::residual_norm(x, h, s1, s2, eps as f32);
    }
    let x = (x + gemma_rms_norm(h, s1, eps)?)?;
    let next = s2.map(|s| gemma_rms_norm(&x, s, eps)).transpose()?;
    Ok((x, next))
}

#[cfg(feature = "cuda")]
mod rmsnorm_cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rmsnorm.ptx"));
    const MODULE: &str = "gemmaclip_rmsnorm";

    /// The fused `residual_norm`: one [2 or 1, rows, cols] output, split into x' and the next norm.
    pub fn residual_norm(
        x: &Tensor,
        h: &Tensor,
        s1: &Tensor,
        s2: Option<&Tensor>,
        eps: f32,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let op = ResidualNorm { s1: s1.clone(), s2: s2.cloned(), eps };
        let out = x.contiguous()?.apply_op2_no_bwd(&h.contiguous()?, &op)?;
        match s2 {
            Some(_) => Ok((out.get(0)?, Some(out.get(1)?))),
            None => Ok((out.squeeze(0)?, None)),
        }
    }

    struct ResidualNorm {
        s1: Tensor,
        s2: Option<Tensor>,
        eps: f32,
    }

    impl CustomOp2 for ResidualNorm {
        fn name(&self) -> &'static str {
            "residual-norm"
        }
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("residual-norm: the CPU path is composed")
        }
        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            h: &CudaStorage,
            hl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            if xl.shape() != hl.shape() {
                candle_core::bail!("residual-norm: x {:?} and h {:?}", xl.dims(), hl.dims());
            }
            let cols = *xl.dims().last().unwrap_or(&1);
            let rows = xl.shape().elem_count() / cols;
            let dev = x.device().clone();
            let f32_slice = |t: &Tensor| -> candle_core::Result<u64> {
                let (st, l) = t.storage_and_layout();
                let Storage::Cuda(st) = &*st else { candle_core::bail!("residual-norm: scale not on the GPU") };
                let Some((o, _)) = l.contiguous_offsets() else {
                    candle_core::bail!("residual-norm: scale not contiguous")
                };
                use candle_core::cuda_backend::cudarc::driver::DevicePtr;
                let stream = dev.cuda_stream();
                let (p, _) = st.as_cuda_slice::<f32>()?.device_ptr(&stream);
                Ok(p + 4 * o as u64)
            };
            let s1 = f32_slice(&self.s1)?;
            let s2 = match &self.s2 {
                Some(s) => f32_slice(s)?,
                None => 0,
            };
            let (Some((x0, x1)), Some((h0, h1))) = (xl.contiguous_offsets(), hl.contiguous_offsets()) else {
                candle_core::bail!("residual-norm: inputs not contiguous")
            };
            let xs = x.as_cuda_slice::<half::bf16>()?.slice(x0..x1);
            let hs = h.as_cuda_slice::<half::bf16>()?.slice(h0..h1);
            let outputs = if self.s2.is_some() { 2 } else { 1 };
            let out = unsafe { dev.alloc::<half::bf16>(outputs * rows * cols)? };
            let aligned = s1 % 16 == 0 && s2 % 16 == 0;
            let (name, cfg) = match aligned && warp_rows(DType::BF16, (rows, cols), 0, [xl, hl].into_iter()) {
                true => ("add_rmsnorm_bf16_warp", warp_grid(rows)),
                false => (
                    "add_rmsnorm_bf16",
                    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 },
                ),
            };
            let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
            let (r, c) = (rows as i32, cols as i32);
            let mut b = func.builder();
            b.arg(&xs).arg(&hs).arg(&s1).arg(&s2).arg(&out).arg(&r).arg(&c).arg(&self.eps);
            unsafe { b.launch(cfg) }.w()?;
            let mut shape = vec![outputs];
            shape.extend_from_slice(xl.dims());
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(shape)))
        }
    }

    pub struct RmsNorm {
        pub scale: Tensor,
        pub eps: f32,
    }

    struct RmsNormBwd {
        scale: Tensor,
        eps: f32,
    }

    /// Whether `rows` bf16 rows of `cols` take the warp-per-row kernels (rmsnorm.cu): training's
    /// and a prompt's many rows (a decode step's few rows stay one block each, where eight warps
    /// share a row's latency: one warp per row slowed an H200's batch-1 decode from 272 to 219
    /// tokens/s), a multiple of 8 columns, at most 3072, every input and the scale 16-byte aligned.
    fn warp_rows<'a>(
        dtype: DType,
        (rows, cols): (usize, usize),
        scale_offset: usize,
        inputs: impl Iterator<Item = &'a Layout>,
    ) -> bool {
        rows >= 256
            && dtype == DType::BF16
            && cols % 8 == 0
            && cols <= 3072
            && scale_offset % 4 == 0
            && inputs.into_iter().all(|l| l.start_offset() % 8 == 0)
    }

    /// Eight rows per block of 256 threads, one warp each.
    fn warp_grid(rows: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    fn launch(
        [name_f32, name_bf16, name_bf16_warp]: [&str; 3],
        inputs: &[(&CudaStorage, &Layout)],
        scale: &Tensor,
        eps: f32,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (x, xl) = inputs[0];
        let shape = xl.shape().clone();
        let cols = *shape.dims().last().unwrap_or(&1);
        let rows = shape.elem_count() / cols;
        let dev = x.device().clone();
        let (ss, sl) = scale.storage_and_layout();
        let Storage::Cuda(ss) = &*ss else { candle_core::bail!("rmsnorm: scale not on the GPU") };
        let Some((s0, s1)) = sl.contiguous_offsets() else { candle_core::bail!("rmsnorm: scale not contiguous") };
        let s = ss.as_cuda_slice::<f32>()?.slice(s0..s1);
        let warp = warp_rows(x.dtype(), (rows, cols), s0, inputs.iter().map(|(_, l)| *l));
        let (cfg, name_bf16) = match warp {
            true => (warp_grid(rows), name_bf16_warp),
            false => {
                (LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }, name_bf16)
            }
        };
        let (c, e, r) = (cols as i32, eps, rows as i32);
        macro_rules! go {
            ($t:ty, $name:expr) => {{
                let out = unsafe { dev.alloc::<$t>(shape.elem_count())? };
                let func = dev.get_or_load_custom_func($name, MODULE, PTX)?;
                let mut b = func.builder();
                let mut slices = vec![];
                for (st, l) in inputs {
                    let Some((o0, o1)) = l.contiguous_offsets() else {
                        candle_core::bail!("rmsnorm: input not contiguous")
                    };
                    slices.push(st.as_cuda_slice::<$t>()?.slice(o0..o1));
                }
                for sl in &slices {
                    b.arg(sl);
                }
                b.arg(&s);
                b.arg(&out);
                b.arg(&c);
                b.arg(&e);
                if warp {
                    b.arg(&r);
                }
                unsafe { b.launch(cfg) }.w()?;
                Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
            }};
        }
        match x.dtype() {
            DType::F32 => go!(f32, name_f32),
            DType::BF16 => go!(half::bf16, name_bf16),
            d => candle_core::bail!("rmsnorm: unsupported dtype {d:?}"),
        }
    }

    impl CustomOp1 for RmsNorm {
        fn name(&self) -> &'static str {
            "gemma-rmsnorm"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("gemma-rmsnorm: the CPU path is composed")
        }
        fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            launch(["rmsnorm_fwd_f32", "rmsnorm_fwd_bf16", "rmsnorm_fwd_bf16_warp"], &[(x, l)], &self.scale, self.eps)
        }
        fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
            let dx = x
                .contiguous()?
                .apply_op2_no_bwd(&g.contiguous()?, &RmsNormBwd { scale: self.scale.clone(), eps: self.eps })?;
            Ok(Some(dx))
        }
    }

    impl CustomOp2 for RmsNormBwd {
        fn name(&self) -> &'static str {
            "gemma-rmsnorm-bwd"
        }
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("gemma-rmsnorm-bwd: the CPU path is composed")
        }
        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            g: &CudaStorage,
            gl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            launch(
                ["rmsnorm_bwd_f32", "rmsnorm_bwd_bf16", "rmsnorm_bwd_bf16_warp"],
                &[(x, xl), (g, gl)],
                &self.scale,
                self.eps,
            )
        }
    }
}

/// LayerNorm over the last dimension, statistics in f32.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    normed.broadcast_mul(&weight.to_dtype(DType::F32)?)?.broadcast_add(&bias.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

/// Softmax over the last dimension of an f32 tensor (composed, so it has a backward).
pub fn softmax_last_dim_f32(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// CLIP's activation: `x * sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?)
}

/// Sum over rows of -log softmax(logits)[target] (f32) for logits [N, V] and target ids [N] (u32);
/// the max is a constant shift, so it is detached and not differentiated.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?.broadcast_sub(&lse)?;
    picked.sum_all()?.neg()
}

/// Gemma's MLP activation `gelu_pytorch_tanh(gate) * up`: one fused op each way on a GPU in bf16
/// (gelu_mul.rs), else candle's `gelu` (the tanh approximation) and a product.
pub fn gelu_tanh_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gate.device().is_cuda()
        && gate.dtype() == DType::BF16
        && crate::fused_ops::allowed(crate::fused_ops::FusedOp::GeluMul)
    {
        return crate::model::tape::run2(&gate.contiguous()?, &up.contiguous()?, crate::model::gelu_mul::GeluMul);
    }
    gate.gelu()? * up
}

/// a + b of the residual stream: on the GPU in bf16 a 16-byte-wide kernel with the bits of
/// candle's add (gelu_mul.rs), else candle's add.
pub fn residual_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::fused_ops::allowed(crate::fused_ops::FusedOp::GeluMul) {
        return crate::model::gelu_mul::add(a, b);
    }
    a + b
}
