//! A decode step's attention on the GPU as one op (four kernels, kernels/decode_attention.cu):
//! one new query per row over the whole KV cache with the step's additive mask, rounded where the
//! composed `grouped_attention` rounds. Tested against it in tests/gpu.rs.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"));
const MODULE: &str = "gemmaclip_decode_attention";
/// Keys per block of the scores and values kernels: 32 at batch 1 (T = 1056 gives 33 blocks per
/// KV head, 132 in all: one per SM of an H100/H200), more (up to `max`) where the batch already
/// gives at least `BLOCKS` blocks, so that wide batches are not spread over thousands of tiny blocks.
fn chunk(rows: usize, t: usize, max: usize) -> usize {
    const BLOCKS: usize = 1024;
    let mut c = 32;
    while c < max && rows * t.div_ceil(2 * c) >= BLOCKS {
        c *= 2;
    }
    c
}

/// q [B, nq, 1, hd], k/v [B, nkv, T, hd] (bf16), mask [B, 1, 1, T] f32 (0 or f32::MIN) ->
/// [B, 1, nq*hd], or None where the op does not apply (CPU, other dtypes or shapes, switched off).
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Option<Tensor>> {
    let (b, nq, lq, hd) = q.dims4()?;
    let (_, nkv, t, _) = k.dims4()?;
    if !q.device().is_cuda()
        || q.dtype() != DType::BF16
        || lq != 1
        || hd % 32 != 0
        || hd > 256
        || nq % nkv != 0
        || nq / nkv > 4
        || mask.dims() != [b, 1, 1, t]
        || !crate::fused_ops::allowed(crate::fused_ops::FusedOp::Attention)
    {
        return Ok(None);
    }
    let op =
        DecodeAttention { mask: mask.to_dtype(DType::F32)?.contiguous()?, scale: half::bf16::from_f64(scale).to_f32() };
    let out = q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
    Ok(Some(out.reshape((b, 1, nq * hd))?))
}

fn slice<'a>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, half::bf16>> {
    let Some((a, z)) = l.contiguous_offsets() else { candle_core::bail!("decode-attention: input not contiguous") };
    Ok(s.as_cuda_slice::<half::bf16>()?.slice(a..z))
}

struct DecodeAttention {
    mask: Tensor,
    /// the scale as the composed path's bf16 multiply sees it
    scale: f32,
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("decode-attention is GPU only; the CPU runs grouped_attention")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = q.device().clone();
        let (b, nq, _, hd) = ql.shape().dims4()?;
        let (_, nkv, t, _) = kl.shape().dims4()?;
        let (qs, ks, vs) = (slice(q, ql)?, slice(k, kl)?, slice(v, vl)?);
        let (ms, ml) = self.mask.storage_and_layout();
        let Storage::Cuda(ms) = &*ms else { candle_core::bail!("decode-attention: mask not on the GPU") };
        let Some((m0, m1)) = ml.contiguous_offsets() else {
            candle_core::bail!("decode-attention: mask not contiguous")
        };
        let mask = ms.as_cuda_slice::<f32>()?.slice(m0..m1);
        // a values block walks its keys one after another (16 loads in flight): at most 64 of them
        let (score_chunk, value_chunk) = (chunk(b * nkv, t, 256), chunk(b * nq, t, 64));
        let splits = t.div_ceil(value_chunk);
        let scores = unsafe { dev.alloc::<f32>(b * nq * t)? };
        let stats = unsafe { dev.alloc::<f32>(b * nq * 2)? };
        let partial = unsafe { dev.alloc::<f32>(b * nq * splits * hd)? };
        let out = unsafe { dev.alloc::<half::bf16>(b * nq * hd)? };
        let (nkv_i, rep, t_i, hd_i, chunk, splits_i) =
            (nkv as i32, (nq / nkv) as i32, t as i32, hd as i32, score_chunk as i32, splits as i32);
        let f = dev.get_or_load_custom_func("decode_attn_scores", MODULE, PTX)?;
        let mut a = f.builder();
        a.arg(&qs)
            .arg(&ks)
            .arg(&mask)
            .arg(&scores)
            .arg(&nkv_i)
            .arg(&rep)
            .arg(&t_i)
            .arg(&hd_i)
            .arg(&chunk)
            .arg(&self.scale);
        let cfg = LaunchConfig {
            grid_dim: ((b * nkv) as u32, t.div_ceil(score_chunk) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { a.launch(cfg) }.w()?;
        let f = dev.get_or_load_custom_func("decode_attn_stats", MODULE, PTX)?;
        let mut a = f.builder();
        a.arg(&scores).arg(&stats).arg(&t_i);
        let cfg = LaunchConfig { grid_dim: ((b * nq) as u32, 1, 1), block_dim: (hd as u32, 1, 1), shared_mem_bytes: 0 };
        unsafe { a.launch(cfg) }.w()?;
        let f = dev.get_or_load_custom_func("decode_attn_values", MODULE, PTX)?;
        let mut a = f.builder();
        let value_chunk_i = value_chunk as i32;
        a.arg(&scores)
            .arg(&stats)
            .arg(&vs)
            .arg(&partial)
            .arg(&nkv_i)
            .arg(&rep)
            .arg(&t_i)
            .arg(&hd_i)
            .arg(&value_chunk_i);
        let cfg = LaunchConfig {
            grid_dim: ((b * nq) as u32, splits as u32, 1),
            block_dim: (hd as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { a.launch(cfg) }.w()?;
        let f = dev.get_or_load_custom_func("decode_attn_combine", MODULE, PTX)?;
        let mut a = f.builder();
        a.arg(&partial).arg(&out).arg(&splits_i).arg(&hd_i);
        let cfg = LaunchConfig { grid_dim: ((b * nq) as u32, 1, 1), block_dim: (hd as u32, 1, 1), shared_mem_bytes: 0 };
        unsafe { a.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((b, nq, 1, hd))))
    }
}
