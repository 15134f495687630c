//! Splicing the projected image features into the text embeddings at the `<image_soft_token>`
//! positions. The forward is one index_select over cat(text, image); its backward, written here, is
//! a gather of the output gradient's image rows. candle would differentiate the index_select with
//! an index_add into a zero-filled [B·L + M, H] tensor (2.6 ms of a batch-4 step on an H200, per
//! tools/gpu/kprof), and scatter's backward in candle is wrong (candle-core's backprop.rs). Each
//! image row lands in exactly one output row, so the gather is the exact gradient: no sums.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

/// Replaces the rows of `text` [B, L, H] whose id is `image_token` by the rows of `image` [M, H],
/// in order. Gradients flow to `image` only (the text embeddings are frozen).
pub fn splice_image_features(text: &Tensor, ids: &[Vec<u32>], image_token: u32, image: &Tensor) -> Result<Tensor> {
    let (b, l, h) = text.dims3()?;
    let m = image.dim(0)?;
    let mut index = Vec::with_capacity(b * l);
    let mut image_rows = Vec::with_capacity(m);
    for (bi, row) in ids.iter().enumerate() {
        for (t, &id) in row.iter().enumerate() {
            if id == image_token {
                index.push((b * l + image_rows.len()) as u32);
                image_rows.push((bi * l + t) as u32);
            } else {
                index.push((bi * l + t) as u32);
            }
        }
    }
    if image_rows.len() != m {
        bail!("the prompt has {} image tokens but the images give {m} feature rows", image_rows.len());
    }
    let dev = text.device();
    let all = Tensor::cat(&[text.reshape((b * l, h))?.detach(), image.detach().to_dtype(text.dtype())?], 0)?;
    let out = all.index_select(&Tensor::from_vec(index, b * l, dev)?, 0)?;
    if !image.track_op() {
        return Ok(out.reshape((b, l, h))?);
    }
    let rows = Tensor::from_vec(image_rows, m, dev)?;
    Ok(image.apply_op2(&out, SpliceGrad { rows })?.reshape((b, l, h))?)
}

/// Passes the spliced output [B·L, H] through (its second input) and gives the image [M, H] the
/// output gradient's rows at `rows`.
struct SpliceGrad {
    rows: Tensor,
}

impl CustomOp2 for SpliceGrad {
    fn name(&self) -> &'static str {
        "splice-image-features"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        out: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((out.try_clone(l)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        out: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((out.try_clone(l)?, l.shape().clone()))
    }

    fn bwd(
        &self,
        image: &Tensor,
        _out: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d_image = g.contiguous()?.index_select(&self.rows, 0)?.to_dtype(image.dtype())?;
        Ok((Some(d_image), None))
    }
}
