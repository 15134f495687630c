//! GPU checks (built with `--features cuda`; skipped when no GPU is present): the tiny model's
//! forwards on CUDA against the CPU run and the transformers fixtures, all in f32.
#![cfg(feature = "cuda")]

mod common;

use candle_core::Device;
use common::{forward, max_abs_diff, Fixture};

fn cuda() -> Option<Device> {
    if !candle_core::utils::cuda_is_available() {
        eprintln!("no CUDA device: skipped");
        return None;
    }
    Some(Device::new_cuda(0).expect("cuda device"))
}

#[test]
fn tiny_forwards_on_cuda_match_cpu_and_transformers() {
    let Some(gpu) = cuda() else { return };
    let f = Fixture::load("parity.safetensors");
    let cpu = Device::Cpu;
    let report = |what: &str, g: &candle_core::Tensor, c: &candle_core::Tensor, r: &candle_core::Tensor| {
        let (vs_cpu, vs_ref) = (max_abs_diff(g, c), max_abs_diff(g, r));
        println!("{what}: cuda vs cpu {vs_cpu:.3e}, cuda vs transformers {vs_ref:.3e}");
        assert!(vs_cpu <= 1e-4 && vs_ref <= 1e-4, "{what}");
    };
    let g = forward::text_logits(&f, &gpu).to_device(&cpu).unwrap();
    report("gemma logits", &g, &forward::text_logits(&f, &cpu), f.get("text.logits"));
    let g = forward::clip_features(&f, &gpu).to_device(&cpu).unwrap();
    report("clip layer -2", &g, &forward::clip_features(&f, &cpu), f.get("clip.features"));
    let (gl, glog, _) = forward::llava(&f, &gpu);
    let (cl, clog, _) = forward::llava(&f, &cpu);
    report("llava supervised logits", &glog.to_device(&cpu).unwrap(), &clog, f.get("vlm.supervised_logits"));
    let rl = f.get("vlm.loss").to_scalar::<f32>().unwrap();
    println!("llava loss: cuda {gl:.6}, cpu {cl:.6}, transformers {rl:.6}");
    assert!((gl - cl).abs() <= 1e-4 && (gl - rl).abs() <= 1e-4);
    for (b, (g, c)) in forward::batch_logits(&f, &gpu).iter().zip(forward::batch_logits(&f, &cpu)).enumerate() {
        let r = f.get("batch.logits").get(b).unwrap().narrow(0, 0, c.dim(0).unwrap()).unwrap();
        report(&format!("padded batch row {b}"), &g.to_device(&cpu).unwrap(), &c, &r);
    }
}
