//! GPU checks (built with `--features cuda`; they fail when no GPU is present, so a GPU machine
//! that lost its GPU cannot look green): the tiny model's
//! forwards on CUDA against the CPU run and the transformers fixtures, all in f32.
#![cfg(feature = "cuda")]

mod common;

use candle_core::Device;
use common::{forward, max_abs_diff, Fixture};

/// The device, and a lock held for the whole test: the fused-op switches (`force_composed`) and
/// the fused LoRA call counter are process-wide, so the tests that flip or read them must not
/// overlap, and one GPU is shared anyway.
fn cuda() -> Option<(Device, std::sync::MutexGuard<'static, ()>)> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    assert!(candle_core::utils::cuda_is_available(), "no CUDA device: the GPU tests need one (this is not a skip)");
    Some((Device::new_cuda(0).expect("cuda device"), guard))
}

#[test]
fn tiny_forwards_on_cuda_match_cpu_and_transformers() {
    let Some((gpu, _serial)) = cuda() else { return };
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

#[test]
fn nf4_cuda_kernels_match_bitsandbytes_and_the_cpu() {
    let Some((gpu, _serial)) = cuda() else { return };
    let f = Fixture::load("nf4.safetensors");
    for case in ["normal", "bf16", "edge"] {
        let input = f.get(&format!("{case}.input"));
        let n = input.elem_count();
        let w =
            gemmaclip::peft::nf4::Nf4Weight::quantize(&input.reshape((n / 64, 64)).unwrap().to_device(&gpu).unwrap())
                .unwrap();
        let packed = w.packed.to_device(&Device::Cpu).unwrap();
        assert_eq!(
            packed.to_vec1::<u8>().unwrap(),
            f.get(&format!("{case}.packed")).to_vec1::<u8>().unwrap(),
            "{case}"
        );
        let absmax = w.absmax.to_device(&Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&absmax, f.get(&format!("{case}.absmax"))), 0.0, "{case}");
        for (dt, key) in [(candle_core::DType::F32, "dequant_f32"), (candle_core::DType::BF16, "dequant_bf16")] {
            let d = w.dequantize(dt).unwrap().flatten_all().unwrap().to_device(&Device::Cpu).unwrap();
            assert_eq!(max_abs_diff(&d, f.get(&format!("{case}.{key}"))), 0.0, "{case} {key}");
        }
        println!("{case}: CUDA NF4 quantize/dequantize identical to bitsandbytes ({n} values)");
    }
}

#[test]
fn qlora_gradients_on_cuda_match_peft_and_checkpointing() {
    use gemmaclip::model::gemma3::BaseFormat;
    use gemmaclip::train::step::StepOptions;
    let Some((gpu, _serial)) = cuda() else { return };
    let reference = Fixture::load("grads.safetensors");
    for (base, prefix) in [(BaseFormat::Dense, "dense"), (BaseFormat::Nf4, "nf4")] {
        let (loss, grads) = common::qlora::grads(&gpu, base, None, &StepOptions::default());
        let mut worst = 0f32;
        for (name, g) in &grads {
            let want = reference.get(&format!("{prefix}.{name}"));
            let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            worst = worst.max(max_abs_diff(g, want) / scale);
        }
        let loss_err = (loss - reference.get(&format!("{prefix}.loss")).to_scalar::<f32>().unwrap()).abs();
        println!("{prefix} base on CUDA: max relative gradient error vs PEFT {worst:.3e}, loss |diff| {loss_err:.3e}");
        assert!(worst <= 1e-4 && loss_err <= 1e-4);

        let opts = |c| StepOptions { checkpointing: c, dropout_seed: Some(3), loss_chunk: 5, ..Default::default() };
        let (l0, g0) = common::qlora::grads(&gpu, base, Some(0.1), &opts(false));
        let (l1, g1) = common::qlora::grads(&gpu, base, Some(0.1), &opts(true));
        let (lc, gc) = common::qlora::grads(&Device::Cpu, base, Some(0.1), &opts(true));
        let d_ckpt = g0.iter().zip(&g1).map(|((_, a), (_, b))| max_abs_diff(a, b)).fold(0f32, f32::max);
        let d_cpu = g1.iter().zip(&gc).map(|((_, a), (_, b))| max_abs_diff(a, b)).fold(0f32, f32::max);
        println!(
            "{prefix} base on CUDA with dropout: checkpointing on vs off max |diff| {d_ckpt:.3e} (loss {l0} vs {l1}); CUDA vs CPU {d_cpu:.3e} (loss {l1} vs {lc})"
        );
        assert!(d_ckpt <= 1e-5 && d_cpu <= 1e-4 && (l1 - lc).abs() <= 1e-4);
    }
}

#[test]
fn nf4_gemv_fast_path_matches_dequantize_then_matmul() {
    use candle_core::{DType, Tensor};
    use gemmaclip::peft::frozen::FrozenWeight;
    use gemmaclip::peft::nf4::Nf4Weight;
    let Some((gpu, _serial)) = cuda() else { return };
    let bf16 = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
    // batch 1: the pipelined kernel (a ragged last block, four warps per row, fewer rows than a
    // block takes), and past its K limit the one-row (64) and two-row (1056) kernels
    let shapes = [(512usize, 2560usize, 1usize), (4224, 2560, 1), (1101, 10240, 1), (7, 128, 1), (64, 16448, 1)];
    for (n, k, m) in shapes.into_iter().chain([(1056, 16448, 1), (384, 10240, 3), (100, 4096, 2), (64, 64, 4)]) {
        let w = bf16(Tensor::randn(0f32, 0.02, (n, k), &gpu).unwrap());
        let q = Nf4Weight::quantize(&w).unwrap();
        let x = bf16(Tensor::randn(0f32, 1.0, (m, k), &gpu).unwrap());
        let fused = q.gemv(&x, None).unwrap().expect("the fast path applies");
        // the unmerged LoRA term in the same pass against the composed form (lora.rs): bf16 h·Bᵀ,
        // times s, added in bf16
        let (a, b) = (
            bf16(Tensor::randn(0f32, 0.05, (16, k), &gpu).unwrap()),
            bf16(Tensor::randn(0f32, 0.05, (n, 16), &gpu).unwrap()),
        );
        let h = x.matmul(&a.t().unwrap()).unwrap();
        let down = gemmaclip::peft::nf4::lora_down(&x, &a).unwrap();
        // three adapters' down projections stacked into one launch give each one's bits
        let a3 = [0.05f32, 0.03, 0.07].map(|sd| bf16(Tensor::randn(0f32, sd, (16, k), &gpu).unwrap()));
        let stacked = Tensor::cat(&a3, 0).unwrap();
        let parts = gemmaclip::peft::nf4::lora_down_parts(&x, &stacked, 16).unwrap().expect("the kernel applies");
        assert_eq!(parts.dims(), [3, m, 16]);
        for (p, ap) in a3.iter().enumerate() {
            let alone = gemmaclip::peft::nf4::lora_down(&x, ap).unwrap();
            assert_eq!(max_abs_diff(&parts.get(p).unwrap(), &alone), 0.0, "part {p} of the stacked down projection");
        }
        let down_scale = common::max_abs(&h);
        let down_err = max_abs_diff(&down, &h) / down_scale;
        println!("LoRA down projection kernel [{m}x{k}] x [16x{k}]^T vs cuBLAS: max error {down_err:.2e} of the largest output");
        assert!(down_err < 1e-2, "{down_err}");
        let with_lora = q.gemv(&x, Some((&h, &b, 2.0))).unwrap().expect("the fast path applies");
        let composed = (&fused + (h.matmul(&b.t().unwrap()).unwrap() * 2.0).unwrap()).unwrap();
        let lora_scale = common::max_abs(&composed);
        let lora_err = max_abs_diff(&with_lora.to_dtype(DType::F32).unwrap(), &composed.to_dtype(DType::F32).unwrap())
            / lora_scale;
        println!("nf4 gemv + LoRA r 16 [{m}x{k}] vs composed: max error {lora_err:.2e} of the largest output");
        assert!(lora_err < 1e-2, "{lora_err}");
        let reference =
            x.to_dtype(DType::F32).unwrap().matmul(&q.dequantize(DType::F32).unwrap().t().unwrap()).unwrap();
        let scale = reference.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let err =
            max_abs_diff(&fused.to_device(&Device::Cpu).unwrap(), &reference.to_device(&Device::Cpu).unwrap()) / scale;
        println!("nf4 gemv [{m}x{k}] x [{n}x{k}]^T: max error {err:.2e} of the largest output (bf16 output rounding)");
        assert!(err < 1e-2, "{err}");
        // and the frozen linear takes it when nothing needs a gradient
        let via = FrozenWeight::Nf4(q).forward(&x).unwrap();
        assert_eq!(max_abs_diff(&via, &fused), 0.0);
    }
}

#[test]
fn fused_optimizer_matches_the_composed_one() {
    use candle_core::{Tensor, Var};
    use gemmaclip::train::optimizer::{AdamW, AdamWConfig};
    let Some((gpu, _serial)) = cuda() else { return };
    // odd sizes (not multiples of the block), a tensor without a gradient, weight decay; three
    // steps, the first two clipped (norm above 1), the third not (max_norm 1e6)
    let shapes: [&[usize]; 5] = [&[64, 2560], &[7], &[2560, 64], &[3, 5, 11], &[1000, 1]];
    let init: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(0f32, 0.5, *s, &gpu).unwrap()).collect();
    let make = |fused: bool| {
        let vars: Vec<Var> = init.iter().map(|t| Var::from_tensor(&t.copy().unwrap()).unwrap()).collect();
        let mut opt = AdamW::new(vars, AdamWConfig { weight_decay: 0.01, ..Default::default() }).unwrap();
        opt.fused = fused;
        opt
    };
    let (mut a, mut b) = (make(true), make(false));
    for (step, max_norm) in [(0u64, 1.0), (1, 1.0), (2, 1e6)] {
        let grads: Vec<Option<Tensor>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| (i != 1).then(|| Tensor::randn(0f32, 1.0 + step as f32, *s, &gpu).unwrap()))
            .collect();
        let (mut ga, mut gb) = (grads.clone(), grads);
        let (ca, cb) = (a.grad_norm(&mut ga, max_norm).unwrap(), b.grad_norm(&mut gb, max_norm).unwrap());
        let rel = (ca.norm - cb.norm).abs() / cb.norm;
        println!("step {step}: grad norm fused {:.6} composed {:.6} (rel {rel:.1e})", ca.norm, cb.norm);
        assert!(rel < 1e-5, "{rel}");
        a.step_clipped(&mut ga, ca, 1e-2).unwrap();
        b.step_clipped(&mut gb, cb, 1e-2).unwrap();
        for i in 0..shapes.len() {
            for (what, x, y) in [
                ("param", a.vars[i].as_tensor(), b.vars[i].as_tensor()),
                ("exp_avg", &a.m[i], &b.m[i]),
                ("exp_avg_sq", &a.v[i], &b.v[i]),
            ] {
                let (x, y) = (x.to_device(&Device::Cpu).unwrap(), y.to_device(&Device::Cpu).unwrap());
                let scale =
                    y.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-12);
                let err = max_abs_diff(&x, &y) / scale;
                assert!(err < 1e-5, "step {step} tensor {i} {what}: {err:.2e}");
            }
        }
        // the untouched tensor stayed as it was
        assert_eq!(max_abs_diff(a.vars[1].as_tensor(), &init[1]), 0.0);
    }
    println!("fused AdamW + clipping == composed within 1e-5 relative over 3 steps");
}

#[test]
fn bf16_working_copies_give_the_gradients_of_the_per_call_cast() {
    use candle_core::{DType, Var};
    use gemmaclip::config::ClipVisionConfig;
    use gemmaclip::model::clip::ClipVision;
    use gemmaclip::model::gemma3::{BaseFormat, Gemma3Text};
    use gemmaclip::model::projector::Projector;
    use gemmaclip::model::vlm::Vlm;
    use gemmaclip::peft::adapter::{self, Adapter};
    use gemmaclip::train::step::{loss_and_grads, StepOptions};
    use gemmaclip::weights::Weights;
    let Some((gpu, _serial)) = cuda() else { return };
    let f = Fixture::load("parity.safetensors");
    let dir = common::tiny_dir();
    let build = |working_copies: bool| {
        let cfg = common::forward::llm_cfg();
        let w = Weights::open(&dir.join("llm"), DType::BF16, &gpu).unwrap();
        let mut llm = Gemma3Text::load(w, &cfg.text, BaseFormat::Nf4).unwrap();
        let (ad, scale) = Adapter::load(&common::fixture_path("lora_init"), &gpu).unwrap();
        ad.attach(&mut llm, scale).unwrap();
        let masters: Vec<Var> = adapter::lora_vars(&mut llm).into_iter().map(|(_, v)| v).collect();
        let work = adapter::working_copies(&mut llm, if working_copies { DType::BF16 } else { DType::F32 }).unwrap();
        let graph: Vec<Var> = masters.iter().zip(&work).map(|(m, w)| w.clone().unwrap_or_else(|| m.clone())).collect();
        let vcfg = ClipVisionConfig::from_file(&dir.join("vision/config.json")).unwrap();
        let vision = ClipVision::load(Weights::open(&dir.join("vision"), DType::BF16, &gpu).unwrap(), &vcfg).unwrap();
        let pw =
            Weights::open_file(&common::fixture_path("lora_init/projector.safetensors"), DType::F32, &gpu).unwrap();
        let projector = Projector::load(&pw, vcfg.hidden_size, cfg.text.hidden_size).unwrap();
        (Vlm { vision, projector, llm, cfg }, graph)
    };
    // the working copies' claim is about the composed path (the fused LoRA op rounds elsewhere and
    // has its own test against this one)
    gemmaclip::fused_ops::force_composed(gemmaclip::fused_ops::FusedOp::Lora, true);
    let (plain, plain_vars) = build(false);
    let (copies, copy_vars) = build(true);
    let batch = common::qlora::batch(&f, &gpu);
    for checkpointing in [false, true] {
        let opts = StepOptions { checkpointing, dropout_seed: Some(3), loss_chunk: 5, ..Default::default() };
        let a = loss_and_grads(&plain, &batch, &plain_vars, &opts).unwrap();
        let b = loss_and_grads(&copies, &batch, &copy_vars, &opts).unwrap();
        assert_eq!(a.loss, b.loss, "checkpointing {checkpointing}");
        for (i, (ga, gb)) in a.grads.iter().zip(&b.grads).enumerate() {
            let (ga, gb) = (ga.as_ref().unwrap(), gb.as_ref().unwrap());
            assert_eq!((ga.dtype(), gb.dtype()), (DType::F32, DType::BF16));
            let gb = gb.to_dtype(DType::F32).unwrap();
            assert_eq!(max_abs_diff(ga, &gb), 0.0, "adapter tensor {i}, checkpointing {checkpointing}");
        }
        println!(
            "bf16, checkpointing {checkpointing}: loss {} and all {} LoRA gradients identical with working copies",
            a.loss,
            a.grads.len()
        );
    }
    gemmaclip::fused_ops::force_composed(gemmaclip::fused_ops::FusedOp::Lora, false);
}

#[test]
fn fused_optimizer_takes_bf16_gradients_and_refreshes_working_copies() {
    use candle_core::{DType, Tensor, Var};
    use gemmaclip::train::optimizer::{AdamW, AdamWConfig};
    let Some((gpu, _serial)) = cuda() else { return };
    let shapes: [&[usize]; 3] = [&[64, 2560], &[2560, 64], &[33]];
    let init: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(0f32, 0.5, *s, &gpu).unwrap()).collect();
    let make = |fused: bool| {
        let vars: Vec<Var> = init.iter().map(|t| Var::from_tensor(&t.copy().unwrap()).unwrap()).collect();
        let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
        opt.fused = fused;
        opt.work = opt
            .vars
            .iter()
            .map(|v| Some(Var::from_tensor(&v.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap()))
            .collect();
        opt
    };
    let (mut a, mut b) = (make(true), make(false));
    for step in 0..3 {
        let grads: Vec<Option<Tensor>> = shapes
            .iter()
            .map(|s| Some(Tensor::randn(0f32, 1.0, *s, &gpu).unwrap().to_dtype(DType::BF16).unwrap()))
            .collect();
        let (mut ga, mut gb) = (grads.clone(), grads);
        let (ca, cb) = (a.grad_norm(&mut ga, 1.0).unwrap(), b.grad_norm(&mut gb, 1.0).unwrap());
        assert!((ca.norm - cb.norm).abs() / cb.norm < 1e-5);
        a.step_clipped(&mut ga, ca, 1e-2).unwrap();
        b.step_clipped(&mut gb, cb, 1e-2).unwrap();
        for i in 0..shapes.len() {
            let (pa, pb) = (a.vars[i].as_tensor(), b.vars[i].as_tensor());
            let scale = pb.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(max_abs_diff(pa, pb) / scale < 1e-5, "step {step} tensor {i}");
            // the working copy is the master rounded to bf16, as candle's cast rounds it
            let wa = a.work[i].as_ref().unwrap().as_tensor();
            assert_eq!(max_abs_diff(wa, &pa.to_dtype(DType::BF16).unwrap()), 0.0, "step {step} tensor {i}");
        }
    }
    println!("fused AdamW on bf16 gradients == composed; working copies == bf16(master) exactly");
}

#[test]
fn resident_bf16_adapters_answer_as_the_per_call_cast_did() {
    use candle_core::DType;
    use gemmaclip::generate::{generate, GenerateOptions};
    use gemmaclip::model::gemma3::{BaseFormat, Gemma3Text};
    use gemmaclip::model::projector::Projector;
    use gemmaclip::model::vlm::Vlm;
    use gemmaclip::peft::adapter::Adapter;
    use gemmaclip::weights::Weights;
    let Some((gpu, _serial)) = cuda() else { return };
    let dir = common::tiny_dir();
    let answer = |resident: bool| {
        let cfg = common::forward::llm_cfg();
        let w = Weights::open(&dir.join("llm"), DType::BF16, &gpu).unwrap();
        let mut llm = Gemma3Text::load(w, &cfg.text, BaseFormat::Nf4).unwrap();
        let (ad, scale) = Adapter::load(&common::fixture_path("peft_saved"), &gpu).unwrap();
        ad.attach(&mut llm, scale).unwrap();
        llm.freeze_adapters(if resident { DType::BF16 } else { DType::F32 }).unwrap();
        let vision = common::forward::clip(&gpu);
        let projector = Projector::init(vision.cfg.hidden_size, cfg.text.hidden_size, 0, &gpu).unwrap();
        let vlm = Vlm { vision, projector, llm, cfg };
        let prompts: Vec<Vec<u32>> = vec![(2..40).collect(), (5..20).collect()];
        let o = GenerateOptions::greedy(12, vec![]);
        let (gen, _) = generate(&vlm, &prompts, None, &o, &mut |_, _| {}).unwrap();
        gen.into_iter().map(|g| g.tokens).collect::<Vec<_>>()
    };
    let (cast, resident) = (answer(false), answer(true));
    assert_eq!(cast, resident);
    println!("bf16 greedy answers with resident adapters == per-call cast: {resident:?}");
}

#[test]
fn fused_accumulation_adds_exactly_as_candle_does() {
    use candle_core::{DType, Tensor};
    use gemmaclip::train::fused::Accumulator;
    let Some((gpu, _serial)) = cuda() else { return };
    let shapes: [&[usize]; 3] = [&[64, 2560], &[2560, 64], &[7, 3]];
    let params: Vec<Tensor> = shapes.iter().map(|s| Tensor::zeros(*s, DType::F32, &gpu).unwrap()).collect();
    let mut acc = Accumulator::new(&params.iter().collect::<Vec<_>>()).unwrap();
    let dev = gpu.as_cuda_device().unwrap();
    for step in 0..2 {
        let mut composed: Vec<Option<Tensor>> = vec![None; shapes.len()];
        for micro in 0..3 {
            // bf16 gradients for the first two (LoRA working copies), f32 for the last; the last
            // has none in the first micro-batch (a text-only batch gives the projector none)
            let grads: Vec<Option<Tensor>> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let g = Tensor::randn(0f32, 1.0, *s, &gpu).unwrap();
                    match i {
                        2 if micro == 0 => None,
                        2 => Some(g),
                        _ => Some(g.to_dtype(DType::BF16).unwrap()),
                    }
                })
                .collect();
            acc.add(&grads, dev).unwrap();
            for (c, g) in composed.iter_mut().zip(&grads) {
                if let Some(g) = g {
                    let g = g.to_dtype(DType::F32).unwrap();
                    *c = Some(match c.take() {
                        Some(a) => (a + g).unwrap(),
                        None => g,
                    });
                }
            }
        }
        let fused = acc.take();
        for (i, (f, c)) in fused.iter().zip(&composed).enumerate() {
            assert_eq!(max_abs_diff(f.as_ref().unwrap(), c.as_ref().unwrap()), 0.0, "step {step} tensor {i}");
        }
    }
    println!("fused accumulation == candle's widen-and-add, bit for bit, over 2 steps of 3 micro-batches");
}

/// cuDNN's fused attention (bf16) against the composed path in f32 on the same inputs, forward and
/// backward, for what Gemma-3 and CLIP need: GQA 8/4 heads, head_dim 256, scale 1/16, causal,
/// causal + window, right padding; CLIP's unmasked 16 x 64 over 577 tokens. Errors are
/// max |fused - f32| / max |f32|; the bound 2e-2 is bf16 rounding with margin (2-6e-3 measured on
/// an H200). The backward is also run twice: bit-identical (the deterministic algorithm).
#[test]
fn cudnn_attention_matches_the_composed_path_forward_and_backward() {
    use candle_core::{DType, Tensor, Var};
    use gemmaclip::model::attention::grouped_attention;
    use gemmaclip::model::cudnn_attention::{available, sdpa, Mask};
    use gemmaclip::model::layer_context::attention_mask;
    let Some((gpu, _serial)) = cuda() else { return };
    let version = available().expect("libcudnn 9 must load on the GPU machine");
    println!("libcudnn {version}");
    let rel = |a: &Tensor, b: &Tensor| {
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        max_abs_diff(&a.to_dtype(DType::F32).unwrap(), &b.to_dtype(DType::F32).unwrap()) / scale
    };
    // (name, batch, q heads, kv heads, length, head_dim, window, row lengths, causal)
    let cases: [(&str, usize, usize, usize, usize, usize, Option<usize>, Option<Vec<usize>>, bool); 5] = [
        ("causal", 2, 8, 4, 384, 256, None, None, true),
        ("causal + window 128", 2, 8, 4, 384, 256, Some(128), None, true),
        ("right padding", 2, 8, 4, 384, 256, None, Some(vec![384, 201]), true),
        ("right padding + window 100", 2, 8, 4, 384, 256, Some(100), Some(vec![250, 384]), true),
        ("clip, unmasked", 1, 16, 16, 577, 64, None, None, false),
    ];
    for (name, b, hq, hkv, l, hd, window, lens, causal) in cases {
        let scale = 1.0 / (hd as f64).sqrt();
        let lens_v = lens.clone().unwrap_or(vec![l; b]);
        let valid: Vec<Vec<bool>> = lens_v.iter().map(|&n| (0..l).map(|t| t < n).collect()).collect();
        let rnd = |s: &[usize]| Tensor::randn(0f32, 1.0, s, &gpu).unwrap().to_dtype(DType::BF16).unwrap();
        let q = Var::from_tensor(&rnd(&[b, hq, l, hd])).unwrap();
        let k = Var::from_tensor(&rnd(&[b, hkv, l, hd])).unwrap();
        // v as the projection lays it out, [B, L, Hkv, D], read through a transposed view
        let v = Var::from_tensor(&rnd(&[b, l, hkv, hd])).unwrap();
        // the upstream gradient; zero on padded query rows, which carry no loss in training
        let rowmask: Vec<f32> = valid.iter().flatten().map(|&ok| if ok { 1.0 } else { 0.0 }).collect();
        let rowmask = Tensor::from_vec(rowmask, (b, l, 1), &gpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (b, l, hq * hd), &gpu).unwrap().broadcast_mul(&rowmask).unwrap();
        let mask = Mask {
            causal,
            window,
            seq_lens: lens
                .as_ref()
                .map(|v| Tensor::new(v.iter().map(|&n| n as i32).collect::<Vec<_>>(), &gpu).unwrap()),
        };
        // Gemma's layers pass v as the projection's [B, L, Hkv*D]; CLIP a transposed [B, Hkv, L, D] view
        let vt = if causal {
            v.as_tensor().reshape((b, l, hkv * hd)).unwrap()
        } else {
            v.as_tensor().transpose(1, 2).unwrap()
        };
        let fused = sdpa(q.as_tensor(), k.as_tensor(), &vt, &mask, scale).unwrap(); // [B, L, Hq*D]
        let run_bwd = || {
            let loss = (fused.to_dtype(DType::F32).unwrap() * &w).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            [q.as_tensor(), k.as_tensor(), v.as_tensor()].map(|t| g.get(t).unwrap().to_dtype(DType::F32).unwrap())
        };
        let (fg, fg2) = (run_bwd(), run_bwd());

        // composed in f32 on the same (bf16-rounded) values
        let [q32, k32, v32] = [q.as_tensor(), k.as_tensor(), v.as_tensor()]
            .map(|t| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap());
        let m = if causal {
            attention_mask(&valid, l, 0, window, &gpu).unwrap()
        } else {
            Tensor::zeros((b, 1, l, l), DType::F32, &gpu).unwrap()
        };
        let v32t = v32.as_tensor().transpose(1, 2).unwrap().contiguous().unwrap();
        let composed = grouped_attention(q32.as_tensor(), k32.as_tensor(), &v32t, &m, scale).unwrap();
        let composed = composed.transpose(1, 2).unwrap().reshape((b, l, hq * hd)).unwrap();
        let g = (&composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let cg = [q32.as_tensor(), k32.as_tensor(), v32.as_tensor()].map(|t| g.get(t).unwrap().clone());

        // outputs on valid rows only (cuDNN writes zeros on padded query rows)
        let fo = fused.to_dtype(DType::F32).unwrap().broadcast_mul(&rowmask).unwrap();
        let co = composed.broadcast_mul(&rowmask).unwrap();
        let e_o = rel(&fo, &co);
        let e = [0, 1, 2].map(|i| rel(&fg[i], &cg[i]));
        let same = (0..3).all(|i| max_abs_diff(&fg[i], &fg2[i]) == 0.0);
        println!(
            "{name}: O {e_o:.2e}, dQ {:.2e}, dK {:.2e}, dV {:.2e}; backward repeatable bit for bit: {same}",
            e[0], e[1], e[2]
        );
        assert!(e_o <= 2e-2 && e.iter().all(|&x| x <= 2e-2), "{name}");
        assert!(same, "{name}: the deterministic backward differed between two runs");
    }
}

/// The tiny model's QLoRA step in bf16 on the GPU with the fused ops (attention on right-padded,
/// windowed layers; one op per LoRA linear on bf16 working copies) against the same step composed,
/// and both against PEFT's f32 gradients: the fused path must be no further from PEFT than the
/// composed one (up to bf16 noise).
#[test]
fn tiny_bf16_step_with_fused_ops_matches_composed_and_peft() {
    use gemmaclip::fused_ops::{force_composed, FusedOp};
    use gemmaclip::model::fused_attention::enabled;
    use gemmaclip::model::gemma3::BaseFormat;
    use gemmaclip::train::step::StepOptions;
    let Some((gpu, _serial)) = cuda() else { return };
    assert!(enabled(&gpu, candle_core::DType::BF16), "fused attention must be on for bf16 on the GPU");
    let reference = Fixture::load("grads.safetensors");
    let vs_peft = |grads: &[(String, candle_core::Tensor)]| {
        let mut worst = 0f32;
        for (name, g) in grads {
            let want = reference.get(&format!("nf4.{name}"));
            let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            worst = worst.max(max_abs_diff(&g.to_dtype(candle_core::DType::F32).unwrap(), want) / scale);
        }
        worst
    };
    let opts = StepOptions::default();
    let (lf, gf) = common::qlora::grads_in(&gpu, candle_core::DType::BF16, BaseFormat::Nf4, &opts);
    for op in [FusedOp::Attention, FusedOp::Lora, FusedOp::NormRope, FusedOp::GeluMul, FusedOp::CrossEntropy] {
        force_composed(op, true);
    }
    let (lc, gc) = common::qlora::grads_in(&gpu, candle_core::DType::BF16, BaseFormat::Nf4, &opts);
    for op in [FusedOp::Attention, FusedOp::Lora, FusedOp::NormRope, FusedOp::GeluMul, FusedOp::CrossEntropy] {
        force_composed(op, false);
    }
    let want = reference.get("nf4.loss").to_scalar::<f32>().unwrap();
    let (ef, ec) = (vs_peft(&gf), vs_peft(&gc));
    println!("tiny bf16 step: loss fused {lf:.5} composed {lc:.5} PEFT {want:.5}; max relative gradient error vs PEFT: fused {ef:.3e}, composed {ec:.3e}");
    assert!((lf - lc).abs() <= 1e-2 * want.abs() && (lf - want).abs() <= 2e-2 * want.abs());
    assert!(ef <= 1.5 * ec + 1e-2, "fused attention moved the step's gradients away from PEFT's");
}

/// The decoder layer's hand-written backward (src/train/layer_backward.rs, recorded fused ops run
/// backward in reverse) against candle's autograd over the same fused ops, on the tiny model's
/// bf16 step, with checkpointing and without. Both round in bf16 at different points (the
/// hand-written one sums the q/k/v input gradients in another order), and on the tiny random model
/// a few rounding steps reach 1e-2 of a tensor's largest gradient, so the test holds the
/// hand-written backward to the exact answer: without dropout both are measured against the f32
/// step and the hand-written one must be as close as autograd (within 1.25x); with dropout (same
/// masks) the two must agree within 5e-2 of each tensor's largest gradient and give the same loss.
#[test]
fn hand_written_layer_backward_matches_autograd() {
    use candle_core::DType;
    use gemmaclip::model::gemma3::BaseFormat;
    use gemmaclip::train::layer_backward::{force, layers_done};
    use gemmaclip::train::step::StepOptions;
    let Some((gpu, _serial)) = cuda() else { return };
    let worst = |a: &[(String, candle_core::Tensor)], b: &[(String, candle_core::Tensor)]| {
        let mut w = 0f32;
        for ((name, a), (_, b)) in a.iter().zip(b) {
            let a = a.to_dtype(DType::F32).unwrap();
            let e = max_abs_diff(&b.to_dtype(DType::F32).unwrap(), &a) / common::max_abs(&a).max(1e-30);
            w = w.max(e);
            assert!(e.is_finite(), "{name}: {e}");
        }
        w
    };
    let both = |opts: &StepOptions| {
        force(Some(false));
        let auto = common::qlora::grads_in(&gpu, DType::BF16, BaseFormat::Nf4, opts);
        let before = layers_done();
        force(Some(true));
        let hand = common::qlora::grads_in(&gpu, DType::BF16, BaseFormat::Nf4, opts);
        force(None);
        assert!(layers_done() > before, "the hand-written backward did not run");
        (auto, hand)
    };
    for checkpointing in [true, false] {
        let plain = StepOptions { checkpointing, ..StepOptions::default() };
        let (_, exact) = common::qlora::grads_in(&gpu, DType::F32, BaseFormat::Nf4, &plain);
        let ((_, ga), (_, gh)) = both(&plain);
        let (ea, eh) = (worst(&exact, &ga), worst(&exact, &gh));
        let dropout = StepOptions { checkpointing, dropout_seed: Some(7), ..StepOptions::default() };
        // the masks depend on (seed, index) only, so the f32 step draws the same ones
        let (_, exact_d) = common::qlora::grads_in(&gpu, DType::F32, BaseFormat::Nf4, &dropout);
        let ((la, da), (lh, dh)) = both(&dropout);
        let (ed, ead, ehd) = (worst(&da, &dh), worst(&exact_d, &da), worst(&exact_d, &dh));
        println!(
            "layer backward (checkpointing {checkpointing}), worst relative gradient error over {} tensors vs the f32 step: \
             by hand {eh:.2e}, autograd {ea:.2e}; with dropout by hand {ehd:.2e}, autograd {ead:.2e} (by hand vs autograd \
             {ed:.2e}), loss {lh:.6} vs {la:.6}",
            ga.len()
        );
        assert!(eh <= 1.25 * ea, "the hand-written backward is further from the f32 step than autograd");
        // the q/k/v and gate/up input gradients are summed inside the LoRA GEMMs (rounded once, not
        // twice), so the two bf16 paths part by a little rounding; both must stay as near the f32 step
        assert!(ehd <= 1.25 * ead, "with dropout the hand-written backward is further from the f32 step than autograd");
        assert!(ed <= 5e-2, "with dropout the hand-written backward left autograd's gradients");
        // with checkpointing the first pass runs without a graph (each residual step fused with
        // the next norm, cuDNN's forward without statistics), which may round a bf16 value
        // differently; without, the recorded forward runs the autograd path's ops
        let el = ((lh - la) / la).abs();
        println!("loss of the hand-written path's forward vs the autograd path's: relative {el:.2e}");
        if checkpointing {
            assert!(el <= 1e-3, "the graphless first pass changed the loss: {lh} vs {la}");
        } else {
            assert_eq!(lh, la, "the recorded forward changed the loss");
        }
    }
}

/// The fused LoRA linear (one op, hand-written backward) against the composed form on the same
/// bf16 inputs, forward and backward (dX, dA, dB), with NF4 and dense bases, with and without
/// dropout (its mask kept as bits for the backward, and drawn again: the same bits), at the 4B's
/// q_proj and down_proj shapes. Errors are max |fused - composed| / max
/// |composed|; both are bf16 computations that round at different points, so the bound is 2e-2.
#[test]
fn fused_lora_linear_matches_the_composed_one_forward_and_backward() {
    use candle_core::{DType, Tensor, Var};
    use gemmaclip::fused_ops::{force_composed, FusedOp};
    use gemmaclip::peft::frozen::FrozenWeight;
    use gemmaclip::peft::lora::{Lora, LoraLinear, LoraSpec};
    use gemmaclip::peft::nf4::Nf4Weight;
    let Some((gpu, _serial)) = cuda() else { return };
    let rel = |a: &Tensor, b: &Tensor| {
        let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        max_abs_diff(&a, &b) / scale
    };
    for (n, k) in [(2048usize, 2560usize), (2560, 10240)] {
        for nf4 in [true, false] {
            for p in [0.0f32, 0.1] {
                let w = (Tensor::randn(0f32, 0.02, (n, k), &gpu).unwrap()).to_dtype(DType::BF16).unwrap();
                let base =
                    if nf4 { FrozenWeight::Nf4(Nf4Weight::quantize(&w).unwrap()) } else { FrozenWeight::Dense(w) };
                let spec = LoraSpec { r: 64, alpha: 128.0, dropout: p, targets: vec![] };
                let mut lora = Lora::init("layers.0.mlp.down_proj", k, n, &spec, 0, &gpu).unwrap();
                lora.b = Var::from_tensor(&Tensor::randn(0f32, 0.02, (n, 64), &gpu).unwrap()).unwrap();
                let wa = Var::from_tensor(&lora.a.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap();
                let wb = Var::from_tensor(&lora.b.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap();
                lora.work = Some((wa.clone(), wb.clone()));
                let lin = LoraLinear { base, lora: Some(lora) };
                let x = Var::from_tensor(
                    &Tensor::randn(0f32, 1.0, (2, 200, k), &gpu).unwrap().to_dtype(DType::BF16).unwrap(),
                )
                .unwrap();
                let up = Tensor::randn(0f32, 1.0, (2, 200, n), &gpu).unwrap();
                let run = |composed: bool| {
                    force_composed(FusedOp::Lora, composed);
                    let before = gemmaclip::peft::fused_lora::calls();
                    let y = lin.forward(x.as_tensor(), Some(11)).unwrap();
                    force_composed(FusedOp::Lora, false);
                    assert_eq!(gemmaclip::peft::fused_lora::calls() - before, usize::from(!composed), "which path ran");
                    let g = (y.to_dtype(DType::F32).unwrap() * &up).unwrap().sum_all().unwrap().backward().unwrap();
                    let grads =
                        [x.as_tensor(), wa.as_tensor(), wb.as_tensor()].map(|t| g.get(t).expect("gradient").clone());
                    (y, grads)
                };
                let ((yf, gf), (yc, gc)) = (run(false), run(true));
                if p > 0.0 {
                    // the backward drawing the mask again gives the bits of the kept mask's
                    gemmaclip::peft::fused_lora::keep_mask_bits(false);
                    let (yr, gr) = run(false);
                    gemmaclip::peft::fused_lora::keep_mask_bits(true);
                    assert_eq!(max_abs_diff(&yr, &yf), 0.0, "y with the mask drawn again");
                    for (a, b) in gr.iter().zip(&gf) {
                        assert_eq!(max_abs_diff(a, b), 0.0, "gradients with the mask drawn again");
                    }
                }
                let e = [rel(&yf, &yc), rel(&gf[0], &gc[0]), rel(&gf[1], &gc[1]), rel(&gf[2], &gc[2])];
                println!(
                    "LoRA [{n} x {k}], r 64, {} base, dropout {p}: y {:.2e}, dX {:.2e}, dA {:.2e}, dB {:.2e}",
                    if nf4 { "NF4" } else { "bf16" },
                    e[0],
                    e[1],
                    e[2],
                    e[3]
                );
                assert!(gf.iter().all(|g| g.dtype() == DType::BF16), "working-copy gradients stay bf16");
                assert!(e.iter().all(|&x| x <= 2e-2));
            }
        }
    }
}

/// The frozen CLIP tower replayed from a CUDA graph (src/model/vision_graph.rs) gives the eager
/// forward's features bit for bit, for the pixels it was captured with and for new ones, at two
/// batch sizes (one graph each), in bf16 (cuDNN attention, the fused linears) as training runs it.
#[test]
fn vision_tower_graph_replays_the_eager_forward() {
    use candle_core::{DType, Tensor};
    use gemmaclip::config::ClipVisionConfig;
    use gemmaclip::model::clip::ClipVision;
    use gemmaclip::model::vision_graph::replays;
    use gemmaclip::weights::Weights;
    let Some((gpu, _serial)) = cuda() else { return };
    let dir = common::tiny_dir().join("vision");
    let cfg = ClipVisionConfig::from_file(&dir.join("config.json")).unwrap();
    let tower = ClipVision::load(Weights::open(&dir, DType::BF16, &gpu).unwrap(), &cfg).unwrap();
    let s = cfg.image_size;
    for n in [1usize, 2] {
        for round in 0..2 {
            let px = Tensor::randn(0f32, 1.0, (n, 3, s, s), &gpu).unwrap();
            let eager = tower.forward(&px).unwrap();
            let before = replays();
            let replayed = tower.forward_frozen(&px).unwrap();
            assert_eq!(replays() - before, 1, "the tower was not replayed from a graph");
            let d = max_abs_diff(&eager, &replayed);
            println!("vision graph, {n} image(s), round {round}: max |replay - eager| {d:e}");
            assert_eq!(d, 0.0, "the replay left the eager forward");
        }
    }
}

/// The fused q/k RMSNorm + RoPE (one op each way) against the composed norm, transpose and
/// rotation on the same bf16 input, with the 4B's global-layer tables (theta 1e6, factor 8) and
/// head_dim 256, 8 heads, 300 positions. Forward and input gradient; errors relative to max |composed|.
#[test]
fn fused_norm_rope_matches_the_composed_one() {
    use candle_core::{DType, Tensor, Var};
    use gemmaclip::fused_ops::{force_composed, FusedOp};
    use gemmaclip::model::rope::{norm_rope, RopeTables};
    let Some((gpu, _serial)) = cuda() else { return };
    let (b, l, h, d) = (2, 300, 8, 256);
    let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (b, l, h * d), &gpu).unwrap()).to_dtype(DType::BF16).unwrap())
        .unwrap();
    let scale = (Tensor::randn(0f32, 0.3, d, &gpu).unwrap() + 1.0).unwrap();
    let rope = RopeTables::new(d, 1e6, 8.0, 0, l, &gpu).unwrap();
    let up = Tensor::randn(0f32, 1.0, (b, h, l, d), &gpu).unwrap();
    let run = |composed: bool| {
        force_composed(FusedOp::NormRope, composed);
        let y = norm_rope(x.as_tensor(), h, &scale, 1e-6, &rope).unwrap();
        force_composed(FusedOp::NormRope, false);
        let g = (y.to_dtype(DType::F32).unwrap() * &up).unwrap().sum_all().unwrap().backward().unwrap();
        (y.to_dtype(DType::F32).unwrap(), g.get(x.as_tensor()).unwrap().to_dtype(DType::F32).unwrap())
    };
    let ((yf, gf), (yc, gc)) = (run(false), run(true));
    assert_eq!(yf.dims(), yc.dims());
    let rel = |a: &Tensor, b: &Tensor| {
        max_abs_diff(a, b) / b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    };
    let (ey, eg) = (rel(&yf, &yc), rel(&gf, &gc));
    println!("norm+rope fused vs composed: y {ey:.2e} (max |diff| {:.2e}), dX {eg:.2e}", max_abs_diff(&yf, &yc));
    assert!(ey <= 1e-2 && eg <= 2e-2);
}

/// The fused MLP activation gelu_tanh(gate) * up against candle's gelu then product, on the same
/// bf16 inputs at the 4B's shape (2 x 200 x 10240): forward and both input gradients.
#[test]
fn fused_gelu_mul_matches_the_composed_one() {
    use candle_core::{DType, Tensor, Var};
    let Some((gpu, _serial)) = cuda() else { return };
    let shape = (2, 200, 10240);
    let bf = |t: Tensor| Var::from_tensor(&t.to_dtype(DType::BF16).unwrap()).unwrap();
    let (gate, up) =
        (bf(Tensor::randn(0f32, 2.0, shape, &gpu).unwrap()), bf(Tensor::randn(0f32, 1.0, shape, &gpu).unwrap()));
    let w = Tensor::randn(0f32, 1.0, shape, &gpu).unwrap();
    let grads = |y: Tensor| {
        let g = (y.to_dtype(DType::F32).unwrap() * &w).unwrap().sum_all().unwrap().backward().unwrap();
        (y, [gate.as_tensor(), up.as_tensor()].map(|t| g.get(t).unwrap().clone()))
    };
    let (yf, gf) = grads(gate.as_tensor().apply_op2(up.as_tensor(), gemmaclip::model::gelu_mul::GeluMul).unwrap());
    let (yc, gc) = grads((gate.as_tensor().gelu().unwrap() * up.as_tensor()).unwrap());
    let rel = |a: &Tensor, b: &Tensor| {
        max_abs_diff(a, b)
            / b.to_dtype(DType::F32)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
    };
    let e = [rel(&yf, &yc), rel(&gf[0], &gc[0]), rel(&gf[1], &gc[1])];
    println!("gelu*up fused vs composed: y {:.2e}, d_gate {:.2e}, d_up {:.2e}", e[0], e[1], e[2]);
    assert!(e.iter().all(|&x| x <= 2e-2));
}

/// The fused cross-entropy (per-row logsumexp - target logit straight from bf16 logits, one pass
/// back) against the composed f32 form on the same logits: 64 rows of Gemma-3's 262,208-entry
/// vocabulary, scale 1/100. Loss relative error and d(logits) error relative to its max.
#[test]
fn fused_cross_entropy_matches_the_composed_one() {
    use candle_core::{DType, Tensor, Var, D};
    let Some((gpu, _serial)) = cuda() else { return };
    let (n, v) = (64usize, 262_208usize);
    let logits =
        Var::from_tensor(&(Tensor::randn(0f32, 3.0, (n, v), &gpu).unwrap()).to_dtype(DType::BF16).unwrap()).unwrap();
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 4099 + 7) % v as u32).collect();
    let targets = Tensor::new(targets, &gpu).unwrap();
    let scale = 0.01;
    let fused =
        gemmaclip::train::fused_ce::cross_entropy_rows(logits.as_tensor(), &targets, scale).unwrap().sum_all().unwrap();
    let gf = fused.backward().unwrap().get(logits.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
    let x = logits.as_tensor().to_dtype(DType::F32).unwrap();
    let max = x.max_keepdim(D::Minus1).unwrap().detach();
    let shifted = x.broadcast_sub(&max).unwrap();
    let lse = shifted.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap();
    let picked = shifted.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap().broadcast_sub(&lse).unwrap();
    let composed = (picked.sum_all().unwrap().neg().unwrap() * scale).unwrap();
    let gc = composed.backward().unwrap().get(logits.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
    let (lf, lc) = (fused.to_scalar::<f32>().unwrap(), composed.to_scalar::<f32>().unwrap());
    let scale_g = gc.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let (el, eg) = ((lf - lc).abs() / lc.abs(), max_abs_diff(&gf, &gc) / scale_g);
    println!("cross-entropy fused vs composed: loss {lf} vs {lc} (relative {el:.2e}), d(logits) {eg:.2e}");
    assert!(el <= 1e-5 && eg <= 1e-2);
}

#[test]
fn captured_decode_step_replays_the_eager_step_token_for_token() {
    use candle_core::DType;
    use gemmaclip::fused_ops::{force_composed, FusedOp};
    use gemmaclip::generate::{generate, greedy_without_cache, GenerateOptions};
    use gemmaclip::model::gemma3::{BaseFormat, Gemma3Text};
    use gemmaclip::model::projector::Projector;
    use gemmaclip::model::vlm::Vlm;
    use gemmaclip::peft::adapter::Adapter;
    use gemmaclip::weights::Weights;
    let Some((gpu, _serial)) = cuda() else { return };
    // as src/device.rs runs it: one stream, no per-allocation events (a capture records none)
    unsafe { gpu.as_cuda_device().unwrap().disable_event_tracking() };
    let dir = common::tiny_dir();
    let cfg = common::forward::llm_cfg();
    let w = Weights::open(&dir.join("llm"), DType::BF16, &gpu).unwrap();
    let mut llm = Gemma3Text::load(w, &cfg.text, BaseFormat::Nf4).unwrap();
    let (ad, scale) = Adapter::load(&common::fixture_path("peft_saved"), &gpu).unwrap();
    ad.attach(&mut llm, scale).unwrap();
    llm.freeze_adapters(DType::BF16).unwrap();
    let vision = common::forward::clip(&gpu);
    let projector = Projector::init(vision.cfg.hidden_size, cfg.text.hidden_size, 0, &gpu).unwrap();
    let vlm = Vlm { vision, projector, llm, cfg: cfg.clone() };
    // prompts of different lengths (right padding), and decoding well past the sliding window
    let n = 3 * cfg.text.sliding_window;
    let prompts: Vec<Vec<u32>> = vec![(2..40).collect(), (5..20).collect(), (7..9).collect()];
    let o = GenerateOptions::greedy(n, vec![]);
    let run_with = |graph: bool, prompts: &[Vec<u32>], o: &GenerateOptions| {
        force_composed(FusedOp::DecodeGraph, !graph);
        let (gen, tm) = generate(&vlm, prompts, None, o, &mut |_, _| {}).unwrap();
        force_composed(FusedOp::DecodeGraph, false);
        assert_eq!(tm.decode_steps, n - 1);
        gen.into_iter().map(|g| g.tokens).collect::<Vec<_>>()
    };
    let run = |graph: bool, prompts: &[Vec<u32>]| run_with(graph, prompts, &o);
    let (eager, replayed) = (run(false, &prompts), run(true, &prompts));
    assert_eq!(replayed, eager, "graph replay != eager decode steps");
    assert!(replayed.iter().all(|t| t.len() == n));
    // a cache that starts with room for 5 new tokens and doubles it on the way: a graph per size
    let growing = GenerateOptions { cache_room: 5, ..o.clone() };
    assert_eq!(run_with(true, &prompts, &growing), eager, "graph replay through a growing cache != eager");
    // a batch wider than the NF4 GEMV takes: the base kept dequantized, the fused LoRA op
    let wide: Vec<Vec<u32>> = (0..6).map(|i| (2 + i..30 + 3 * i).collect()).collect();
    let (eager, replayed) = (run(false, &wide), run(true, &wide));
    assert_eq!(replayed, eager, "graph replay != eager decode steps, 6 rows");
    // one row alone (no padding) against recomputing the whole sequence at every token
    let alone = run(true, &prompts[..1]);
    let recomputed = greedy_without_cache(&vlm, &prompts[0], None, n, &[]).unwrap();
    let same = alone[0].iter().zip(&recomputed).take_while(|(a, b)| a == b).count();
    println!("{n} tokens x 3 and 6 rows: graph == eager; batch 1: {same}/{n} tokens equal to recomputation (bf16)");
    assert_eq!(alone[0], recomputed, "batch-1 cached greedy != recomputation");
}

#[test]
fn decode_attention_matches_the_composed_one() {
    use candle_core::{DType, Tensor};
    use gemmaclip::model::attention::grouped_attention;
    use gemmaclip::model::decode_attention::attend;
    let Some((gpu, _serial)) = cuda() else { return };
    let bf16 = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
    // (rows, cache columns, the step's column, sliding window, query heads, kv heads, head dim):
    // Gemma-3-4B's heads, then other head dims, four queries per kv head and odd column counts
    let cases = [
        (1usize, 1056usize, 900usize, None, 8usize, 4usize, 256usize),
        (3, 200, 150, Some(64usize), 8, 4, 256),
        (2, 64, 63, None, 8, 4, 256),
        (2, 333, 301, Some(100), 4, 1, 64),
        (1, 97, 96, None, 16, 4, 128),
        (3, 45, 31, None, 2, 2, 32),
        // a wide batch: larger key chunks per block (64 for the values, 128 for the scores)
        (32, 1440, 1000, None, 8, 4, 256),
        (40, 517, 400, Some(128), 8, 4, 256),
    ];
    for (b, t, col, window, nq, nkv, hd) in cases {
        let q = bf16(Tensor::randn(0f32, 1.0, (b, nq, 1, hd), &gpu).unwrap());
        let k = bf16(Tensor::randn(0f32, 1.0, (b, nkv, t, hd), &gpu).unwrap());
        let v = bf16(Tensor::randn(0f32, 1.0, (b, nkv, t, hd), &gpu).unwrap());
        // row r left-padded by 7 r columns; keys after the step's column unwritten
        let mut m = vec![f32::MIN; b * t];
        for r in 0..b {
            for j in 7 * r..=col {
                if window.is_none_or(|w| col - j < w) {
                    m[r * t + j] = 0.0;
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, 1, t), &gpu).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        let fused = attend(&q, &k, &v, &mask, scale).unwrap().expect("the decode op applies");
        let composed = grouped_attention(&q, &k, &v, &mask, scale)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, 1, nq * hd))
            .unwrap();
        let top = common::max_abs(&composed);
        let err = max_abs_diff(&fused, &composed) / top;
        let same = fused
            .flatten_all()
            .unwrap()
            .eq(&composed.flatten_all().unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!("decode attention [{b} x {nq}/{nkv} heads of {hd} over {t} columns, window {window:?}] vs composed: max error {err:.2e} of the largest output, {:.1}% identical", 100.0 * same);
        assert!(err < 1e-2, "{err}");
    }
}

#[test]
fn fused_residual_norm_matches_the_composed_one() {
    use candle_core::{DType, Tensor};
    use gemmaclip::model::ops::{gemma_rms_norm, residual_norm};
    let Some((gpu, _serial)) = cuda() else { return };
    let bf16 = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
    // a decode step's few rows (one block per row) and a training row's many (one warp per row)
    for dims in [(3usize, 5usize, 2560usize), (2, 300, 2560)] {
        let (x, h) =
            (bf16(Tensor::randn(0f32, 3.0, dims, &gpu).unwrap()), bf16(Tensor::randn(0f32, 1.0, dims, &gpu).unwrap()));
        let (s1, s2) = (Tensor::randn(1f32, 0.3, 2560, &gpu).unwrap(), Tensor::randn(1f32, 0.3, 2560, &gpu).unwrap());
        let (fx, fh) = residual_norm(&x, &h, &s1, Some(&s2), 1e-6).unwrap();
        let (fx1, none) = residual_norm(&x, &h, &s1, None, 1e-6).unwrap();
        assert!(none.is_none());
        let cx = (&x + gemma_rms_norm(&h, &s1, 1e-6).unwrap()).unwrap();
        let ch = gemma_rms_norm(&cx, &s2, 1e-6).unwrap();
        let (ex, eh, ex1) = (max_abs_diff(&fx, &cx), max_abs_diff(&fh.unwrap(), &ch), max_abs_diff(&fx1, &cx));
        println!("residual + norm {dims:?} fused vs separate norm and add: x' {ex:.2e}, next norm {eh:.2e}, x' alone {ex1:.2e} (max |diff|)");
        // the chained launch must give the separate norm's bits: the first pass of a checkpointed
        // training step chains, its recompute does not
        assert!(ex == 0.0 && eh == 0.0 && ex1 == ex, "{dims:?}: {ex} {eh} {ex1}");
    }
}

/// Gemma's RMSNorm kernels (warp per row for the 4B's 2560 columns, block per row for 2562),
/// forward and backward, against the composed form in f32 on the CPU from the same bf16 values.
#[test]
fn fused_rms_norm_matches_the_composed_one() {
    use candle_core::{DType, Device, Tensor, Var};
    use gemmaclip::model::ops::gemma_rms_norm;
    let Some((gpu, _serial)) = cuda() else { return };
    for dims in [(2usize, 700usize, 2560usize), (3, 7, 2562)] {
        let x = Tensor::randn(0f32, 2.0, dims, &gpu).unwrap().to_dtype(DType::BF16).unwrap();
        let g = Tensor::randn(0f32, 1.0, dims, &gpu).unwrap().to_dtype(DType::BF16).unwrap();
        let s = Tensor::randn(1f32, 0.3, dims.2, &gpu).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let y = gemma_rms_norm(xv.as_tensor(), &s, 1e-6).unwrap();
        let dx = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap().remove(xv.as_tensor()).unwrap();
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
        let cx = Var::from_tensor(&cpu(&x)).unwrap();
        let cy = gemma_rms_norm(cx.as_tensor(), &cpu(&s), 1e-6).unwrap();
        let cdx = (&cy * cpu(&g)).unwrap().sum_all().unwrap().backward().unwrap().remove(cx.as_tensor()).unwrap();
        let rel = |a: &Tensor, b: &Tensor| max_abs_diff(&cpu(a), b) / common::max_abs(b).max(1e-30);
        let (ey, edx) = (rel(&y, &cy.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()), rel(&dx, &cdx));
        println!("rmsnorm {dims:?} fused (bf16) vs composed (f32): y {ey:.2e}, dX {edx:.2e} of the largest");
        assert!(ey < 1e-2 && edx < 1e-2, "{dims:?}: y {ey}, dX {edx}");
    }
}

/// The frozen CLIP tower's bias linear (the output starts as the bias, one GEMM adds x·Wᵀ) against
/// candle's composed matmul then broadcast add on the same bf16 inputs, and its fc1 + quick_gelu
/// against quick_gelu computed on the CPU in f32 from that linear's output, rounded at PyTorch's
/// points (after the scaling, the sigmoid and the product). Also printed: how often the linear
/// equals the f32 product plus bias rounded once (PyTorch's addmm with a bias epilogue).
#[test]
fn clip_bias_linear_matches_the_composed_one() {
    use candle_core::{DType, Device, Tensor};
    let Some((gpu, _serial)) = cuda() else { return };
    let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let x = bf16(&Tensor::randn(0f32, 1.0, (2, 577, 1024), &gpu).unwrap());
    let w = bf16(&Tensor::randn(0f32, 0.03, (4096, 1024), &gpu).unwrap());
    let b = bf16(&Tensor::randn(0f32, 0.5, 4096, &gpu).unwrap());
    let composed = x.broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
    let once = bf16(&cpu(&x).broadcast_matmul(&cpu(&w).t().unwrap()).unwrap().broadcast_add(&cpu(&b)).unwrap());
    let y = gemmaclip::model::clip_linear::forward(&x, &w, &b, false).unwrap().expect("the fused op applies");
    let g = gemmaclip::model::clip_linear::forward(&x, &w, &b, true).unwrap().expect("the fused op applies");
    let t = cpu(&y);
    let a = cpu(&bf16(&(&t * 1.702).unwrap()));
    let s = cpu(&bf16(&candle_nn::ops::sigmoid(&a).unwrap()));
    let reference_gelu = cpu(&bf16(&(&t * &s).unwrap()));
    let same = |a: &Tensor, b: &Tensor| {
        let eq = cpu(a).eq(&cpu(b)).unwrap().to_dtype(DType::F32).unwrap().mean_all().unwrap();
        eq.to_scalar::<f32>().unwrap()
    };
    let rel = |a: &Tensor, b: &Tensor| max_abs_diff(&cpu(a), &cpu(b)) / common::max_abs(&cpu(b)).max(1e-30);
    let (sy, sg, so) = (same(&y, &composed), same(&g, &reference_gelu), same(&y, &once));
    let (ey, eg) = (rel(&y, &composed), rel(&g, &reference_gelu));
    println!(
        "CLIP bias linear [1154 x 1024] x [4096 x 1024]^T vs composed: {:.2}% identical (max error {ey:.2e}); \
         quick_gelu {:.2}% identical (max error {eg:.2e}); the linear equals f32 + bias rounded once in {:.1}%",
        100.0 * sy,
        100.0 * sg,
        100.0 * so
    );
    assert!(sy > 0.999 && sg > 0.999 && ey < 1e-2 && eg < 1e-2, "{sy} {sg} {ey} {eg}");
}

#[cfg(feature = "nccl")]
#[test]
fn nccl_beside_the_compute_stream_sums_in_place_while_kernels_write_elsewhere() {
    use candle_core::Tensor;
    use gemmaclip::dist::comm::Communicator;
    use gemmaclip::dist::control::Control;
    use gemmaclip::dist::nccl::{new_id, NcclComm};
    let Some((gpu, _serial)) = cuda() else { return };
    // as src/device.rs runs it: no per-allocation events, so only the comm's own joins order the streams
    unsafe { gpu.as_cuda_device().unwrap().disable_event_tracking() };
    // a group of one: its sums change nothing, so this shows the mechanics run (a stream of
    // NCCL's own, in-place sums of a stretch, joins, no corruption), not the streams' order,
    // which only ranks that really add can show (tools/gpu/data_parallel.sh: buckets == none)
    let comm = NcclComm::new(&gpu, (0, 1), &new_id().unwrap(), true, Control::start(0, vec![]).unwrap()).unwrap();
    assert!(comm.overlaps());
    let n = 1usize << 24;
    let flat = Tensor::randn(0f32, 1.0, n, &gpu).unwrap();
    let second = flat.narrow(0, n / 2, n / 2).unwrap();
    let kept = second.to_vec1::<f32>().unwrap();
    // written on the device's stream just before the sum starts: the sum must see it
    let marked = Tensor::full(7f32, 1024, &gpu).unwrap();
    flat.slice_set(&marked, 0, n / 2).unwrap();
    comm.start_sum_in_place(&second).unwrap();
    // the device's stream goes on writing the first half meanwhile
    for k in 0..20 {
        flat.slice_set(&Tensor::full(k as f32, n / 2, &gpu).unwrap(), 0, 0).unwrap();
    }
    comm.wait_sums().unwrap();
    let got = flat.to_vec1::<f32>().unwrap();
    assert!(got[..n / 2].iter().all(|&x| x == 19.0));
    assert!(got[n / 2..n / 2 + 1024].iter().all(|&x| x == 7.0));
    assert_eq!(&got[n / 2 + 1024..], &kept[1024..]);
    // the whole-buffer collectives through the stream of their own
    let t = Tensor::randn(0f32, 1.0, 4096, &gpu).unwrap();
    let summed = comm.all_reduce_sum_tensor(&t).unwrap();
    assert_eq!(summed.to_vec1::<f32>().unwrap(), t.to_vec1::<f32>().unwrap());
    let mut v = vec![1.5f32, -2.0];
    comm.all_reduce_sum(&mut v).unwrap();
    assert_eq!(v, [1.5, -2.0]);
    println!(
        "NCCL beside the compute stream: a 32 MiB in-place sum beside 20 writes, and the whole-buffer sums, in order"
    );
}

/// Sampling's choice on the device (model/device_sampling.rs) against the host's (sampling.rs,
/// itself held to a full sort of the vocabulary there): rows of Gemma's 262,208 logits and rows of
/// 1,000 logits with many equal values, under temperature / top-k / top-p settings, 24 draws each,
/// one row finished in every draw. The sums group differently on each side, so only a draw within
/// rounding of a boundary could tell them apart; none is expected.
#[test]
fn device_sampling_chooses_as_the_host_does() {
    use candle_core::{Device, Tensor};
    use gemmaclip::model::device_sampling::sample_rows;
    use gemmaclip::rng::SplitMix64;
    use gemmaclip::sampling::{sample, Sampling};
    let Some((gpu, _serial)) = cuda() else { return };
    let mut rng = SplitMix64::new(11);
    let settings =
        [(1.0, 0, 1.0), (0.7, 50, 1.0), (1.0, 0, 0.9), (1.3, 40, 0.8), (0.5, 1, 1.0), (2.0, 0, 0.5), (1.0, 300, 0.95)];
    let mut draws_done = 0;
    for (v, ties) in [(262_208usize, false), (1000, true)] {
        let x = Tensor::randn(0f32, 3.0, (4, v), &Device::Cpu).unwrap();
        let x = if ties { ((x * 2.0).unwrap().round().unwrap() / 2.0).unwrap() } else { x };
        let rows = x.to_vec2::<f32>().unwrap();
        let on_gpu = x.to_device(&gpu).unwrap();
        for &(temperature, top_k, top_p) in &settings {
            let s = Sampling { temperature, top_k, top_p };
            for round in 0..24 {
                let draws: Vec<Option<f64>> =
                    (0..rows.len()).map(|r| (r != round % rows.len()).then(|| rng.next_f64())).collect();
                let device = sample_rows(&on_gpu, &draws, s, 7).unwrap().to_vec1::<u32>().unwrap();
                let host: Vec<u32> =
                    rows.iter().zip(&draws).map(|(row, u)| u.map_or(7, |u| sample(row, s, u))).collect();
                assert_eq!(device, host, "{v} logits (ties {ties}), {s:?}, draws {draws:?}");
                draws_done += draws.iter().flatten().count();
            }
        }
    }
    println!("device sampling == host sampling on {draws_done} draws over {} settings", settings.len());
}
