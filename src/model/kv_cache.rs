//! The KV cache of generation, allocated for a number of columns and written in place (a longer
//! generation moves into a wider cache, `take_from`):
//! per layer keys and values [B, nkv, T, hd] for a fixed capacity T, and the device buffers a
//! decode step reads (the column it writes, each row's prompt length), so that one decode step has
//! fixed shapes and fixed addresses and can be captured into a CUDA graph (cuda_graph.rs).
//!
//! Prompts are right-padded into a block of L0 columns (so the prompt pass runs through cuDNN's
//! fused attention, which takes right padding): row r's prompt fills columns 0..len[r], the token
//! of decode step s (s >= 1) goes to column L0 + s - 1 in every row. Column j is a real key of row
//! r when j < len[r] (position j) or L0 <= j (position len[r] + j - L0). Sliding layers keep every
//! column too (the window is a mask on positions), which costs memory, not exactness.

use crate::model::rope::RopeTables;
use candle_core::{DType, Device, Tensor};

/// One layer's keys and values [B, nkv, T, hd].
pub struct LayerCache {
    pub k: Tensor,
    pub v: Tensor,
}

impl LayerCache {
    /// Writes the prompt's keys and values [B, nkv, L, hd] at column 0.
    pub(crate) fn write_prompt(&self, k: &Tensor, v: &Tensor) -> candle_core::Result<()> {
        self.k.slice_set(&k.contiguous()?, 2, 0)?;
        self.v.slice_set(&v.contiguous()?, 2, 0)
    }

    /// Writes one decode step's keys and values [B, nkv, 1, hd] at the columns in `index`
    /// ([B, nkv, 1, hd] u32, every entry the step's column).
    pub(crate) fn write_step(&self, k: &Tensor, v: &Tensor, index: &Tensor) -> candle_core::Result<()> {
        self.k.scatter_set(index, &k.contiguous()?, 2)?;
        self.v.scatter_set(index, &v.contiguous()?, 2)
    }
}

/// The KV cache of a batch being generated, with the device-side state of a decode step.
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    pub batch: usize,
    pub capacity: usize,
    /// Columns filled by the prompt (L0, padding included).
    pub prompt_len: usize,
    /// Each row's prompt length (host copy of `lens`).
    pub lens_host: Vec<usize>,
    /// [B, 1] f32: each row's prompt length.
    pub(crate) lens: Tensor,
    /// [1, 1] f32: L0, the columns of the prompt block.
    pub(crate) block: Tensor,
    /// [1] u32: the column the running decode step writes.
    pub(crate) col: Tensor,
    /// [1, T] f32: 0..T, the column of each key.
    pub(crate) columns: Tensor,
    /// RoPE tables for positions 0..T, [T, hd/2] f32, of global and sliding layers.
    pub(crate) rope_global: RopeTables,
    pub(crate) rope_local: RopeTables,
    /// [B, 1] u32: the token each row feeds into the next decode step.
    pub ids: Tensor,
    /// [1, V] f32: 0..V, for the greedy choice on the device (decode.rs `first_max`).
    pub vocab_index: Tensor,
}

/// What `KvCache::new` needs of the model.
pub struct CacheShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
}

impl KvCache {
    /// A zeroed cache for `batch` rows and `capacity` columns, with the RoPE tables it needs.
    pub fn new(
        s: &CacheShape,
        batch: usize,
        capacity: usize,
        rope: (RopeTables, RopeTables),
        vocab: usize,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        let layers = (0..s.layers)
            .map(|_| {
                let shape = (batch, s.kv_heads, capacity, s.head_dim);
                Ok(LayerCache { k: Tensor::zeros(shape, s.dtype, dev)?, v: Tensor::zeros(shape, s.dtype, dev)? })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            batch,
            capacity,
            prompt_len: 0,
            lens_host: vec![0; batch],
            lens: Tensor::zeros((batch, 1), DType::F32, dev)?,
            block: Tensor::zeros((1, 1), DType::F32, dev)?,
            col: Tensor::zeros(1, DType::U32, dev)?,
            columns: Tensor::arange(0u32, capacity as u32, dev)?.to_dtype(DType::F32)?.reshape((1, capacity))?,
            rope_global: rope.0,
            rope_local: rope.1,
            ids: Tensor::zeros((batch, 1), DType::U32, dev)?,
            vocab_index: Tensor::arange(0u32, vocab as u32, dev)?.to_dtype(DType::F32)?.reshape((1, vocab))?,
        })
    }

    /// Starts a new generation: prompts of `lens[r]` tokens, right-padded to a block of `block` columns.
    pub(crate) fn start(&mut self, lens: &[usize], block: usize) -> candle_core::Result<()> {
        if lens.len() != self.batch || block > self.capacity || lens.iter().any(|&n| n == 0 || n > block) {
            candle_core::bail!(
                "kv cache of {} rows x {} columns given prompts of {lens:?} tokens in {block} columns",
                self.batch,
                self.capacity
            );
        }
        let dev = self.lens.device().clone();
        let n: Vec<f32> = lens.iter().map(|&n| n as f32).collect();
        self.lens.slice_set(&Tensor::from_vec(n, (self.batch, 1), &dev)?, 0, 0)?;
        self.block.slice_set(&Tensor::new(&[[block as f32]], &dev)?, 0, 0)?;
        self.lens_host = lens.to_vec();
        self.prompt_len = block;
        Ok(())
    }

    /// Takes `old`'s columns and decode state into this wider cache of as many rows.
    pub(crate) fn take_from(&mut self, old: &KvCache) -> candle_core::Result<()> {
        if old.batch != self.batch || old.capacity > self.capacity {
            candle_core::bail!(
                "kv cache of {} rows x {} columns cannot take one of {} x {}",
                self.batch,
                self.capacity,
                old.batch,
                old.capacity
            );
        }
        for (new, old) in self.layers.iter().zip(&old.layers) {
            new.write_prompt(&old.k, &old.v)?;
        }
        self.start(&old.lens_host, old.prompt_len)?;
        self.ids.slice_set(&old.ids, 0, 0)
    }

    /// Sets the column of decode step `step` (1-based) before it runs.
    pub(crate) fn set_step(&self, step: usize) -> candle_core::Result<()> {
        let col = self.prompt_len + step - 1;
        if col >= self.capacity {
            candle_core::bail!("decode step {step} past the kv cache's {} columns", self.capacity);
        }
        self.col.slice_set(&Tensor::new(&[col as u32], self.col.device())?, 0, 0)
    }

    /// Bytes the keys and values hold.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| 2 * l.k.elem_count() * l.k.dtype().size_in_bytes()).sum()
    }
}
