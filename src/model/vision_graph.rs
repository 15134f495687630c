//! The frozen CLIP tower's forward captured into a CUDA graph, one per pixel-batch shape, and
//! replayed: its ~300 small launches become one. At batch 1 the tower was bound by the host (about
//! 4 ms of queuing for about 2 ms of kernels, at the start of every step, when the GPU has nothing
//! else queued). Replay equals the eager forward for the reasons the decode graph's does
//! (src/model/cuda_graph.rs, docs/ARCHITECTURE.md): the pixels and the features live in buffers
//! allocated before capture, candle's kernel parameters come from its device-side cache filled by
//! an eager run with the guard held, and nothing made inside the capture outlives it. A capture
//! that fails says why once; that shape then runs eagerly. `GEMMACLIP_COMPOSED=graph` turns
//! graphs off.

use crate::model::clip::ClipVision;
use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::sync::Mutex;

struct Captured {
    graph: CudaGraph,
    /// the pixels are copied in here before each launch
    input: Tensor,
    /// the graph writes the features here
    output: Tensor,
    /// the thread that captured it, the only one that replays it (candle's device stream and
    /// cuBLAS handle are the capturing thread's)
    thread: std::thread::ThreadId,
}

// SAFETY: a graph is launched only from the thread that captured it (checked in `forward`, under
// the lock); other threads may only drop it, which cudarc does with the graph's context bound.
unsafe impl Send for Captured {}

/// The captured forwards of one tower, by the pixels' shape and dtype (None: the capture failed).
#[derive(Default)]
pub struct Graphs {
    by_shape: Mutex<HashMap<(Vec<usize>, DType), Option<Captured>>>,
}

/// Larger batches of images run eagerly: their kernels outweigh the host's queuing anyway, and
/// each graph keeps its intermediate buffers reserved while it lives, in CUDA's graph memory, which
/// the stream pool's peak (`bench`'s peak_alloc_gib) does not count (not measured; estimated from
/// the tower's activations at tens of MB per image).
const MAX_IMAGES: usize = 4;

static REPLAYS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many tower forwards this process has replayed from a graph (tests check which path ran).
pub fn replays() -> usize {
    REPLAYS.load(std::sync::atomic::Ordering::Relaxed)
}

impl Graphs {
    /// The tower's forward over `pixels` by graph replay, capturing it on the shape's first use;
    /// None where it runs eagerly (not CUDA, graphs switched off, a failed capture, another thread).
    pub fn forward(&self, tower: &ClipVision, pixels: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !pixels.device().is_cuda()
            || pixels.track_op()
            || pixels.dim(0)? > MAX_IMAGES
            || !crate::fused_ops::allowed(crate::fused_ops::FusedOp::DecodeGraph)
        {
            return Ok(None);
        }
        let key = (pixels.dims().to_vec(), pixels.dtype());
        let mut map = self.by_shape.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(&key) {
            let captured = match capture(tower, pixels) {
                Ok(c) => Some(c),
                Err(e) => {
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        eprintln!("warning: the vision tower runs without a CUDA graph (its capture failed: {e})")
                    });
                    None
                }
            };
            map.insert(key.clone(), captured);
        }
        let Some(Some(c)) = map.get(&key) else { return Ok(None) };
        if c.thread != std::thread::current().id() {
            return Ok(None);
        }
        c.input.slice_set(&pixels.contiguous()?, 0, 0)?;
        c.graph.launch().w()?;
        REPLAYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // a copy: the next replay overwrites the output buffer
        Ok(Some(c.output.copy()?))
    }
}

/// One eager forward with candle's parameter cache on (loading every kernel and filling the cache),
/// then the same forward captured, its result copied into the output buffer.
fn capture(tower: &ClipVision, pixels: &Tensor) -> candle_core::Result<Captured> {
    let dev = pixels.device().as_cuda_device()?;
    let _params_on_device = dev.enable_cuda_graph_htod_cache();
    let input = pixels.contiguous()?.copy()?;
    let output = tower.forward(&input)?.contiguous()?.copy()?;
    dev.cuda_stream().synchronize().w()?;
    let graph = crate::model::cuda_graph::capture(dev, "the vision tower", || {
        output.slice_set(&tower.forward(&input)?.contiguous()?, 0, 0)
    })?;
    Ok(Captured { graph, input, output, thread: std::thread::current().id() })
}
