//! Generation's passes through the text model over the fixed KV cache (kv_cache.rs): the prompt
//! (prefill), then one decode step per token whose every input is a device buffer, so that the
//! greedy step can be captured once and replayed (cuda_graph.rs). Masks and RoPE positions of a
//! step are computed on the device from the step's column and each row's padding; the greedy
//! choice is made on the device, so only the chosen ids come back.

use crate::model::gemma3::Gemma3Text;
use crate::model::kv_cache::{CacheShape, KvCache};
use crate::model::layer_context::{attention_mask, LayerContext, Masks};
use crate::model::rope::RopeTables;
use crate::peft::frozen::FrozenWeight;
use crate::peft::nf4::Nf4Weight;
use candle_core::{DType, Tensor, D};

/// Per row the index of the first maximum of `logits` [B, V] (f32) -> [B] u32: the host's
/// first-max rule (candle's argmax may break ties otherwise on the GPU, and bf16 logits tie).
/// `index` is [1, V] f32 0..V (a buffer made once: an upload would break a graph capture).
pub fn first_max(logits: &Tensor, index: &Tensor) -> candle_core::Result<Tensor> {
    let (_, v) = logits.dims2()?;
    let max = two_stage(logits, |t| t.max_keepdim(D::Minus1))?;
    let hit = logits.broadcast_eq(&max)?.to_dtype(DType::F32)?; // 1 at every maximum
                                                                // index where hit, index + V elsewhere: the smallest is the first maximum (exact in f32 below 2^24)
    let keyed = index.broadcast_add(&hit.affine(-(v as f64), v as f64)?)?;
    // all-NaN logits hit nothing: keep the id in range
    two_stage(&keyed, |t| t.min_keepdim(D::Minus1))?.squeeze(1)?.clamp(0f32, (v - 1) as f32)?.to_dtype(DType::U32)
}

/// A max or min over the last dimension of x [B, V] -> [B, 1] in two passes over [B, V/d, d] and
/// [B, V/d] (the same value: either is exact in any order): candle reduces a row with one block,
/// which took 0.25 ms for one row of Gemma's 262,208 logits.
fn two_stage(x: &Tensor, reduce: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
    let (b, v) = x.dims2()?;
    match (256..=1024).rev().find(|d| v % d == 0) {
        Some(d) => reduce(&reduce(&x.reshape((b, v / d, d))?)?.reshape((b, v / d))?),
        None => reduce(x),
    }
}

impl Gemma3Text {
    /// A KV cache for `batch` rows and `capacity` columns (prompt block plus new tokens).
    pub fn new_cache(&self, batch: usize, capacity: usize) -> candle_core::Result<KvCache> {
        let c = &self.cfg;
        if capacity > c.max_position_embeddings {
            candle_core::bail!(
                "{capacity} positions exceed the model's max_position_embeddings ({})",
                c.max_position_embeddings
            );
        }
        let dev = self.device();
        let shape = CacheShape {
            layers: self.layers.len(),
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            dtype: self.dtype(),
        };
        let rope = (
            RopeTables::new(c.head_dim, c.rope_theta, c.rope_scaling_factor, 0, capacity, dev)?,
            RopeTables::new(c.head_dim, c.rope_local_base_freq, 1.0, 0, capacity, dev)?,
        );
        KvCache::new(&shape, batch, capacity, rope, c.vocab_size, dev)
    }

    /// Runs the prompt block embeds [B, L, H] (rows left-padded: `valid[b][t]` false on padding)
    /// through the model, writing its keys/values at column 0 of `cache`. -> last hidden [B, L, H].
    pub fn prefill(&self, embeds: &Tensor, valid: &[Vec<bool>], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        let (b, l, _) = embeds.dims3()?;
        let mut pad = vec![];
        for row in valid {
            let p = row.iter().take_while(|&&v| !v).count();
            if row.len() != l || !row[p..].iter().all(|&v| v) {
                candle_core::bail!("prefill: rows must be left-padded to {l} positions");
            }
            pad.push(p);
        }
        if b != cache.batch {
            candle_core::bail!("prefill: {b} rows into a cache of {}", cache.batch);
        }
        cache.start(&pad, l)?;
        let ctx = if pad.iter().all(|&p| p == 0) {
            self.layer_context(valid, l, 0)? // cuDNN's fused attention where it runs
        } else {
            // RoPE positions count each row's own tokens from 0; padding sits at position 0
            let c = &self.cfg;
            let dev = self.device();
            let positions: Vec<Vec<usize>> =
                pad.iter().map(|&p| (0..l).map(|j| j.saturating_sub(p)).collect()).collect();
            LayerContext {
                rope_global: RopeTables::for_rows(c.head_dim, c.rope_theta, c.rope_scaling_factor, &positions, dev)?,
                rope_local: RopeTables::for_rows(c.head_dim, c.rope_local_base_freq, 1.0, &positions, dev)?,
                masks: Masks::Composed {
                    global: attention_mask(valid, l, 0, None, dev)?,
                    sliding: attention_mask(valid, l, 0, Some(c.sliding_window), dev)?,
                },
                dropout_seed: None,
                write_index: None,
            }
        };
        let mut x = embeds.clone();
        for (layer, lc) in self.layers.iter().zip(&cache.layers) {
            x = layer.forward(&x, &ctx, Some(lc))?;
        }
        Ok(x)
    }

    /// The layer context of a decode step, from device buffers only: query column `col`, key
    /// column j seen by row r when pad[r] <= j <= col (and col - j < window on sliding layers),
    /// RoPE position col - pad[r].
    fn decode_context(&self, c: &KvCache) -> candle_core::Result<LayerContext> {
        let (b, t) = (c.batch, c.capacity);
        let col = c.col.to_dtype(DType::F32)?.reshape((1, 1))?;
        let pos = col.broadcast_sub(&c.pad)?.flatten_all()?.to_dtype(DType::U32)?; // [B]
        let rows = |r: &RopeTables| -> candle_core::Result<RopeTables> {
            Ok(RopeTables { cos: r.cos.index_select(&pos, 0)?, sin: r.sin.index_select(&pos, 0)? })
        };
        let real = c.columns.broadcast_ge(&c.pad)?.to_dtype(DType::F32)?; // [B, T]
        let seen = c.columns.broadcast_le(&col)?.to_dtype(DType::F32)?; // [1, T]
        let global = real.broadcast_mul(&seen)?;
        let window = c.columns.broadcast_gt(&col.affine(1.0, -(self.cfg.sliding_window as f64))?)?;
        let sliding = global.broadcast_mul(&window.to_dtype(DType::F32)?)?;
        // 1 -> 0, 0 -> f32::MIN: the composed path's additive mask
        let additive = |m: &Tensor| m.affine(f32::MAX as f64, -(f32::MAX as f64))?.reshape((b, 1, 1, t));
        let (nkv, hd) = (self.cfg.num_key_value_heads, self.cfg.head_dim);
        Ok(LayerContext {
            rope_global: rows(&c.rope_global)?,
            rope_local: rows(&c.rope_local)?,
            masks: Masks::Composed { global: additive(&global)?, sliding: additive(&sliding)? },
            dropout_seed: None,
            write_index: Some(c.col.reshape((1, 1, 1, 1))?.broadcast_as((b, nkv, 1, hd))?.contiguous()?),
        })
    }

    /// One decode step: the tokens in `cache.ids` at the column `cache.set_step` chose ->
    /// next-token logits [B, V] (f32).
    pub fn decode_logits(&self, cache: &KvCache) -> candle_core::Result<Tensor> {
        let ctx = self.decode_context(cache)?;
        let mut x = self.embed(&cache.ids)?;
        for (layer, lc) in self.layers.iter().zip(&cache.layers) {
            x = layer.forward(&x, &ctx, Some(lc))?;
        }
        self.logits(&x.squeeze(1)?)
    }

    /// One greedy decode step: the first-max tokens of `decode_logits` go into `cache.ids`, where
    /// the next step reads them. Every input and output is a device buffer of the cache.
    pub fn greedy_step(&self, cache: &KvCache) -> candle_core::Result<()> {
        let next = first_max(&self.decode_logits(cache)?, &cache.vocab_index)?;
        cache.ids.slice_set(&next.reshape((cache.batch, 1))?, 0, 0)
    }

    /// Rows to answer together when the user did not say: as many as the device's free memory
    /// holds (each row's KV cache of `columns` columns, the f32 scores, exponentials and
    /// probabilities of a left-padded prompt's composed attention, its logits and 64 MiB of other
    /// activations; 2 GiB kept free; the dequantized base where the batch is wider than the NF4
    /// GEMV takes), up to 32. 1 on the CPU.
    pub fn fitting_batch(&self, columns: usize) -> candle_core::Result<usize> {
        let free = crate::device::free_bytes(self.device()).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let Some(free) = free else { return Ok(1) };
        let c = &self.cfg;
        let kv = self.layers.len() * 2 * c.num_key_value_heads * c.head_dim * columns * self.dtype().size_in_bytes();
        let prompt_attention = 3 * c.num_attention_heads * columns * columns * 4;
        let per_row = (kv + prompt_attention + 16 * c.vocab_size + (64 << 20)) as u64;
        let room = free.saturating_sub(2 << 30);
        let dense: u64 =
            self.nf4_weights().iter().map(|q| (q.shape.0 * q.shape.1 * self.dtype().size_in_bytes()) as u64).sum();
        let wide = room.saturating_sub(dense) / per_row;
        let b = if wide as usize > crate::peft::nf4::GEMV_MAX_ROWS {
            wide.min(32)
        } else {
            (room / per_row).clamp(1, crate::peft::nf4::GEMV_MAX_ROWS as u64)
        };
        Ok(b as usize)
    }

    /// The NF4 base weights of the decoder layers.
    fn nf4_weights(&self) -> Vec<&Nf4Weight> {
        let mut v = vec![];
        for l in &self.layers {
            let (a, m) = (&l.self_attn, &l.mlp);
            for lin in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj] {
                if let FrozenWeight::Nf4(q) = &lin.base {
                    v.push(q);
                }
            }
        }
        v
    }

    /// For a batch wider than the NF4 GEMV takes (`GEMV_MAX_ROWS`) every decode step would
    /// dequantize every base weight again: this keeps them dequantized for one generation, when
    /// the device has room for them and `headroom` bytes more. None where it has not, on the CPU,
    /// or with a dense base.
    pub fn keep_dequantized(&self, headroom: u64) -> candle_core::Result<Option<DequantizedBase<'_>>> {
        let weights = self.nf4_weights();
        let need: u64 = weights.iter().map(|q| (q.shape.0 * q.shape.1 * self.dtype().size_in_bytes()) as u64).sum();
        let free = crate::device::free_bytes(self.device()).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if weights.is_empty() || free.is_none_or(|f| f < need + headroom) {
            return Ok(None);
        }
        let kept = DequantizedBase(weights);
        for q in &kept.0 {
            q.keep_dequantized(self.dtype())?;
        }
        Ok(Some(kept))
    }
}

/// NF4 weights kept dequantized (Gemma3Text::keep_dequantized) until this drops.
pub struct DequantizedBase<'a>(Vec<&'a Nf4Weight>);

impl Drop for DequantizedBase<'_> {
    fn drop(&mut self) {
        for q in &self.0 {
            q.release_dequantized();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::first_max;
    use candle_core::{DType, Device, Tensor};

    /// The device-side greedy choice equals the host's first-max rule, ties and the two-pass
    /// reduction included (2048 columns: two passes of 1024; 300: one).
    #[test]
    fn first_max_breaks_ties_as_the_host_does() {
        let dev = Device::Cpu;
        for v in [2048usize, 300] {
            let mut rows = vec![vec![0f32; v]; 3];
            rows[0][7] = 5.0;
            rows[0][1500 % v] = 5.0; // a tie: the first one wins
            rows[1][v - 1] = 1.0;
            rows[2].iter_mut().enumerate().for_each(|(i, x)| *x = -(i as f32)); // the maximum at 0
            let host: Vec<u32> = rows
                .iter()
                .map(|r| {
                    r.iter().enumerate().fold((0, f32::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m }).0 as u32
                })
                .collect();
            let logits = Tensor::from_vec(rows.concat(), (3, v), &dev).unwrap();
            let index =
                Tensor::arange(0u32, v as u32, &dev).unwrap().to_dtype(DType::F32).unwrap().reshape((1, v)).unwrap();
            assert_eq!(first_max(&logits, &index).unwrap().to_vec1::<u32>().unwrap(), host, "{v} columns");
        }
    }
}
