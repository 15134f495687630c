//! Generation's passes through the text model over the fixed KV cache (kv_cache.rs): the prompt
//! (prefill), then one decode step per token whose every input is a device buffer, so that the
//! greedy step can be captured once and replayed (cuda_graph.rs). Masks and RoPE positions of a
//! step are computed on the device from the step's column and each row's padding; the greedy
//! choice is made on the device, so only the chosen ids come back.

use crate::model::gemma3::Gemma3Text;
use crate::model::kv_cache::{CacheShape, KvCache};
use crate::model::layer_context::{LayerContext, Masks};
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

    /// `cache` with room for `capacity` columns: its keys, values and decode state moved into a
    /// new cache (the old buffers are freed when it is dropped, so both are held for a moment).
    pub fn grow_cache(&self, cache: KvCache, capacity: usize) -> candle_core::Result<KvCache> {
        let mut wider = self.new_cache(cache.batch, capacity)?;
        wider.take_from(&cache)?;
        Ok(wider)
    }

    /// Runs the prompt block embeds [B, L, H] (rows right-padded: `valid[b][t]` true on the row's
    /// first tokens only) through the model, writing its keys/values at column 0 of `cache`.
    /// -> hidden state of each row's last prompt token [B, H].
    pub fn prefill(&self, embeds: &Tensor, valid: &[Vec<bool>], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        let (b, l, h) = embeds.dims3()?;
        let mut lens = vec![];
        for row in valid {
            let n = row.iter().take_while(|&&v| v).count();
            if row.len() != l || n == 0 || row[n..].iter().any(|&v| v) {
                candle_core::bail!("prefill: rows must be right-padded to {l} positions");
            }
            lens.push(n);
        }
        if b != cache.batch {
            candle_core::bail!("prefill: {b} rows into a cache of {}", cache.batch);
        }
        cache.start(&lens, l)?;
        // RoPE positions are the columns; cuDNN's fused attention runs where it can
        let ctx = self.layer_context(valid, l, 0)?;
        let (x, _) = self.layers_cached(embeds, &ctx, cache, false)?;
        let last: Vec<u32> = lens.iter().enumerate().map(|(r, &n)| (r * l + n - 1) as u32).collect();
        x.reshape((b * l, h))?.index_select(&Tensor::new(last, x.device())?, 0)
    }

    /// The layer context of a decode step, from device buffers only. The query of row r sits at
    /// column `col` = position len[r] + col - L0; key column j holds position j (j < len[r]) or
    /// len[r] + j - L0 (L0 <= j <= col), other columns are padding or not yet written; sliding
    /// layers also hide keys 1024 or more positions back.
    fn decode_context(&self, c: &KvCache) -> candle_core::Result<LayerContext> {
        let (b, t) = (c.batch, c.capacity);
        let col = c.col.to_dtype(DType::F32)?.reshape((1, 1))?;
        let after = col.broadcast_sub(&c.block)?; // col - L0, [1, 1]
        let qpos = c.lens.broadcast_add(&after)?; // [B, 1]
        let pos = qpos.flatten_all()?.to_dtype(DType::U32)?; // [B]
        let rows = |r: &RopeTables| -> candle_core::Result<RopeTables> {
            Ok(RopeTables { cos: r.cos.index_select(&pos, 0)?, sin: r.sin.index_select(&pos, 0)? })
        };
        let f32 = |m: Tensor| m.to_dtype(DType::F32);
        let prompt = f32(c.columns.broadcast_lt(&c.lens)?)?; // [B, T]
        let new = f32(c.columns.broadcast_ge(&c.block)?)?.mul(&f32(c.columns.broadcast_le(&col)?)?)?; // [1, T]
        let global = prompt.broadcast_add(&new)?; // the two never overlap: 0 or 1
                                                  // key positions: the column in the prompt, shifted by len - L0 after it
        let kpos = c.columns.broadcast_add(&(1.0 - &prompt)?.broadcast_mul(&c.lens.broadcast_sub(&c.block)?)?)?;
        let window = f32(kpos.broadcast_gt(&qpos.affine(1.0, -(self.cfg.sliding_window as f64))?)?)?;
        let sliding = global.mul(&window)?;
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
        let x = self.embed(&cache.ids)?;
        match self.layers_cached(&x, &ctx, cache, true)? {
            (_, Some(normed)) => self.logits_of_normed(&normed.squeeze(1)?),
            (x, None) => self.logits(&x.squeeze(1)?),
        }
    }

    /// One greedy decode step: the first-max tokens of `decode_logits` go into `cache.ids`, where
    /// the next step reads them. Every input and output is a device buffer of the cache.
    pub fn greedy_step(&self, cache: &KvCache) -> candle_core::Result<()> {
        let next = first_max(&self.decode_logits(cache)?, &cache.vocab_index)?;
        cache.ids.slice_set(&next.reshape((cache.batch, 1))?, 0, 0)
    }

    /// Rows to answer together when the user did not say: as many as the device's free memory
    /// holds (each row's KV cache at its peak, `cache_columns` columns, twice over when the cache
    /// grows on the way (the old and the new one meet while it moves); the f32 scores,
    /// exponentials and probabilities of the composed attention over a prompt of `prompt` columns
    /// where cuDNN's does not run, its logits and 64 MiB of other activations; 2 GiB kept free;
    /// the dequantized base where the batch is wider than the NF4 GEMV takes), up to 32. 1 on the CPU.
    pub fn fitting_batch(&self, prompt: usize, cache_columns: usize, grows: bool) -> candle_core::Result<usize> {
        let free = crate::device::free_bytes(self.device()).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let Some(free) = free else { return Ok(1) };
        let c = &self.cfg;
        let copies = if grows { 2 } else { 1 };
        let kv = copies
            * self.layers.len()
            * 2
            * c.num_key_value_heads
            * c.head_dim
            * cache_columns
            * self.dtype().size_in_bytes();
        let prompt_attention = 3 * c.num_attention_heads * prompt * prompt * 4;
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
