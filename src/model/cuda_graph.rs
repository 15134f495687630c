//! The greedy decode step (decode.rs) captured once into a CUDA graph and replayed for every
//! further token: about 2,000 kernel launches per token become one graph launch. What makes the
//! replay equal the eager step (docs/ARCHITECTURE.md, "Generation and evaluation"): every input and output of
//! the step is a buffer of the KV cache allocated before capture (ids, column, padding, keys and
//! values, RoPE tables, the vocabulary index), nothing allocated before capture is freed inside
//! it, every tensor made inside it is dropped before the capture ends, and candle's kernel
//! parameters (dims, strides) come from its device-side cache, filled by one eager step run with
//! the same guard held.

use crate::model::gemma3::Gemma3Text;
use crate::model::kv_cache::KvCache;
use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::cuda_backend::WrapErr;

pub struct DecodeGraph {
    graph: CudaGraph,
}

impl DecodeGraph {
    /// Runs one greedy step eagerly (loading every kernel and filling candle's parameter cache),
    /// then captures the same step. The eager step's tokens are in `cache.ids` on return (an error
    /// there is the step's own); the captured step has not run. A capture that fails gives `None`
    /// after saying why once: the generation goes on with eager steps.
    pub fn warm_up_and_capture(llm: &Gemma3Text, cache: &KvCache) -> candle_core::Result<Option<Self>> {
        let dev = llm.device().as_cuda_device()?;
        let _params_on_device = dev.enable_cuda_graph_htod_cache();
        llm.greedy_step(cache)?;
        let stream = dev.cuda_stream();
        stream.synchronize().w()?;
        match Self::capture(llm, cache) {
            Ok(g) => Ok(Some(g)),
            Err(e) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| eprintln!("warning: decoding without a CUDA graph (its capture failed: {e})"));
                Ok(None)
            }
        }
    }

    fn capture(llm: &Gemma3Text, cache: &KvCache) -> candle_core::Result<Self> {
        let graph = capture(llm.device().as_cuda_device()?, "the decode step", || llm.greedy_step(cache))?;
        Ok(Self { graph })
    }

    /// Runs the captured step on the stream (after `cache.set_step`).
    pub fn launch(&self) -> candle_core::Result<()> {
        self.graph.launch().w()
    }
}

/// What `f` queues on the device's stream, captured (this thread's work only) into an uploaded
/// CUDA graph; `what` names it in errors. The capture ends whatever `f` does, or the stream would
/// stay unusable.
pub fn capture(
    dev: &candle_core::CudaDevice,
    what: &str,
    f: impl FnOnce() -> candle_core::Result<()>,
) -> candle_core::Result<CudaGraph> {
    let stream = dev.cuda_stream();
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w()?;
    let recorded = f();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).w();
    recorded?;
    let graph = graph?.ok_or_else(|| candle_core::Error::Msg(format!("{what} captured no CUDA graph")))?;
    graph.upload().w()?;
    Ok(graph)
}
