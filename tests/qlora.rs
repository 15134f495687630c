//! The QLoRA core against the reference stack: NF4 bytes against bitsandbytes, LoRA and projector
//! gradients against PEFT (unquantized base, and NF4 base against PEFT on the dequantized weights),
//! checkpointing on vs off, no gradient for any frozen matrix, PEFT's adapter format both ways.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, qlora, tiny_dir, Fixture};
use gemmaclip::model::gemma3::BaseFormat;
use gemmaclip::peft::adapter::{self, Adapter};
use gemmaclip::peft::nf4::{dequantize_cpu, quantize_cpu, Nf4Weight};
use gemmaclip::train::step::StepOptions;

#[test]
fn nf4_bytes_absmax_and_dequant_equal_bitsandbytes() {
    let f = Fixture::load("nf4.safetensors");
    for case in ["normal", "bf16", "edge", "tail"] {
        let input = f.get(&format!("{case}.input"));
        let x = input.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        let (packed, absmax) = quantize_cpu(&x);
        let want_packed = f.get(&format!("{case}.packed")).to_vec1::<u8>().unwrap();
        let want_absmax = f.get(&format!("{case}.absmax")).to_vec1::<f32>().unwrap();
        let wrong = packed.iter().zip(&want_packed).filter(|(a, b)| a != b).count();
        assert_eq!(wrong, 0, "{case}: {wrong} of {} packed bytes differ", packed.len());
        assert_eq!(absmax, want_absmax, "{case}: absmax");
        let deq = dequantize_cpu(&packed, &absmax, x.len());
        assert_eq!(deq, f.get(&format!("{case}.dequant_f32")).to_vec1::<f32>().unwrap(), "{case}: f32 dequant");
        if x.len().is_multiple_of(64) {
            // the op path, as the model uses it: bf16 out, rounded to nearest even like torch
            let w = Nf4Weight::quantize(&input.reshape((x.len() / 64, 64)).unwrap()).unwrap();
            let bf = w.dequantize(DType::BF16).unwrap().flatten_all().unwrap();
            let want = f.get(&format!("{case}.dequant_bf16"));
            assert_eq!(max_abs_diff(&bf, want), 0.0, "{case}: bf16 dequant");
        }
        println!("{case}: {} values, packed bytes, absmax and dequantized values identical", x.len());
    }
}

fn compare(ours: &[(String, Tensor)], reference: &Fixture, prefix: &str) -> f32 {
    let mut worst = 0f32;
    for (name, g) in ours {
        let want = reference.get(&format!("{prefix}.{name}"));
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let rel = max_abs_diff(g, want) / scale.max(1e-12);
        assert!(rel <= 1e-4, "{prefix} {name}: relative error {rel:.3e}");
        worst = worst.max(rel);
    }
    worst
}

#[test]
fn lora_and_projector_gradients_match_peft_dense_base() {
    let reference = Fixture::load("grads.safetensors");
    let (loss, grads) = qlora::grads(&Device::Cpu, BaseFormat::Dense, None, &StepOptions::default());
    assert_eq!(grads.len(), 8 * 7 * 2 + 4);
    let worst = compare(&grads, &reference, "dense");
    let loss_err = (loss - reference.get("dense.loss").to_scalar::<f32>().unwrap()).abs();
    println!("dense base: {} gradients, max relative error {worst:.3e}; loss |diff| {loss_err:.3e}", grads.len());
    assert!(loss_err <= 1e-4);
}

#[test]
fn lora_and_projector_gradients_match_peft_nf4_base() {
    let reference = Fixture::load("grads.safetensors");
    let (loss, grads) = qlora::grads(&Device::Cpu, BaseFormat::Nf4, None, &StepOptions::default());
    let worst = compare(&grads, &reference, "nf4");
    let loss_err = (loss - reference.get("nf4.loss").to_scalar::<f32>().unwrap()).abs();
    println!("nf4 base: {} gradients, max relative error {worst:.3e}; loss |diff| {loss_err:.3e}", grads.len());
    assert!(loss_err <= 1e-4);
}

#[test]
fn checkpointing_gives_identical_gradients_with_dropout_replayed() {
    for base in [BaseFormat::Dense, BaseFormat::Nf4] {
        let opts =
            |ckpt| StepOptions { checkpointing: ckpt, dropout_seed: Some(42), loss_chunk: 7, ..Default::default() };
        let (l0, g0) = qlora::grads(&Device::Cpu, base, Some(0.1), &opts(false));
        let (l1, g1) = qlora::grads(&Device::Cpu, base, Some(0.1), &opts(true));
        assert_eq!(l0, l1, "{base:?}: loss");
        let mut worst = 0f32;
        for ((n, a), (_, b)) in g0.iter().zip(&g1) {
            let d = max_abs_diff(a, b);
            worst = worst.max(d);
            assert!(d <= 1e-6, "{base:?} {n}: {d}");
        }
        println!("{base:?}: checkpointing on vs off, max |diff| over {} gradients = {worst:.3e}", g0.len());
        // and dropout did something: the masked run differs from the unmasked one
        let (l2, _) = qlora::grads(&Device::Cpu, base, Some(0.1), &StepOptions::default());
        assert_ne!(l0, l2);
    }
}

#[test]
fn frozen_weights_get_no_gradient_and_no_dw_is_materialised() {
    let f = Fixture::load("parity.safetensors");
    let dev = Device::Cpu;
    for base in [BaseFormat::Dense, BaseFormat::Nf4] {
        let (mut vlm, vars) = qlora::model(&dev, base);
        let batch = qlora::batch(&f, &dev);
        let embeds = vlm.input_embeds(&batch.ids, batch.pixels.as_ref()).unwrap();
        let hidden = vlm.llm.forward_embeds(&embeds, Some(&batch.valid)).unwrap();
        let (loss, _) = vlm.loss(&hidden, &batch.supervised).unwrap();
        let store = loss.backward().unwrap();
        // every trainable var got a gradient ...
        for (n, v) in &vars {
            assert!(store.get(v.as_tensor()).is_some(), "{n}");
        }
        // ... no frozen tensor has one (identified by the tensor, not its shape) ...
        let mut frozen_tensors = vec![("embed_tokens".to_string(), vlm.llm.embed_tokens.clone())];
        let mut frozen: Vec<Vec<usize>> = vec![vlm.llm.embed_tokens.dims().to_vec()];
        for (name, lin) in vlm.llm.linears_mut() {
            let (o, i) = lin.base.shape();
            frozen.push(vec![o, i]);
            frozen.push(vec![i, o]);
            match &lin.base {
                gemmaclip::peft::frozen::FrozenWeight::Dense(w) => frozen_tensors.push((name, w.clone())),
                gemmaclip::peft::frozen::FrozenWeight::Nf4(q) => {
                    frozen_tensors.push((format!("{name}.packed"), q.packed.clone()));
                    frozen_tensors.push((format!("{name}.absmax"), q.absmax.clone()));
                }
            }
        }
        for (name, t) in &frozen_tensors {
            assert!(store.get(t).is_none(), "{base:?}: the frozen {name} got a gradient");
        }
        // ... and no other entry is a frozen matrix's weight gradient: any gradient shaped like one
        // must belong to a trainable var (by tensor id: in the tiny config the projector's shapes
        // coincide with q/k/v/o's)
        let trainable: std::collections::HashSet<candle_core::TensorId> =
            vars.iter().map(|(_, v)| v.as_tensor().id()).collect();
        let mut entries = 0;
        for id in store.get_ids() {
            let g = store.get_id(*id).unwrap();
            entries += 1;
            if frozen.contains(&g.dims().to_vec()) && !trainable.contains(id) {
                panic!("{base:?}: a gradient of shape {:?} (a frozen matrix's) was materialised", g.dims());
            }
        }
        println!("{base:?}: {entries} GradStore entries, none shaped like the {} frozen matrices", frozen.len());
    }
}

#[test]
fn adapters_round_trip_and_read_what_peft_writes() {
    let dev = Device::Cpu;
    let (ours, s_ours) = Adapter::load(&common::fixture_path("lora_init"), &dev).unwrap();
    let (peft, s_peft) = Adapter::load(&common::fixture_path("peft_saved"), &dev).unwrap();
    assert_eq!(s_ours, 2.0);
    assert_eq!(s_ours, s_peft);
    assert_eq!(ours.modules.len(), 8 * 7);
    assert_eq!(ours.modules.keys().collect::<Vec<_>>(), peft.modules.keys().collect::<Vec<_>>());
    for (m, (a, b)) in &ours.modules {
        let (pa, pb) = &peft.modules[m];
        assert_eq!(max_abs_diff(a, pa), 0.0, "{m}");
        assert_eq!(max_abs_diff(b, pb), 0.0, "{m}");
    }

    // save what we loaded, read it back: the same tensors, PEFT's key names
    let (mut vlm, _) = qlora::model(&dev, BaseFormat::Dense);
    let tmp = tempfile::tempdir().unwrap();
    adapter::save(tmp.path(), &mut vlm.llm, &ours.spec, "google/gemma-3-4b-it").unwrap();
    let (again, _) = Adapter::load(tmp.path(), &dev).unwrap();
    for (m, (a, _)) in &ours.modules {
        assert_eq!(max_abs_diff(a, &again.modules[m].0), 0.0);
    }
    let st = candle_core::safetensors::load(tmp.path().join("adapter_model.safetensors"), &dev).unwrap();
    assert!(st.contains_key("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert_eq!(st["base_model.model.model.language_model.layers.7.mlp.down_proj.lora_B.weight"].dims(), &[64, 4]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["target_modules"], r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)");
}

#[test]
fn bad_adapters_are_rejected_with_the_file_and_key_named() {
    let dev = Device::Cpu;
    let src = common::fixture_path("lora_init");
    let tmp = tempfile::tempdir().unwrap();
    let copy = || {
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
        }
    };
    let err = |p: &std::path::Path| {
        let e = Adapter::load(p, &dev).err().expect("an error");
        e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
    };

    copy();
    let cfg = tmp.path().join("adapter_config.json");
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("\"r\": 4", "\"r\": 8")).unwrap();
    let e = err(tmp.path());
    assert!(e.contains("rank") && e.contains("r = 8"), "{e}");

    copy();
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("\"use_dora\": false", "\"use_dora\": true"))
        .unwrap();
    assert!(err(tmp.path()).contains("use_dora"));

    copy();
    let st = tmp.path().join("adapter_model.safetensors");
    let mut t = candle_core::safetensors::load(&st, &dev).unwrap();
    t.remove("base_model.model.model.language_model.layers.2.mlp.up_proj.lora_B.weight");
    t.insert(
        "base_model.model.model.vision_tower.foo.lora_A.weight".into(),
        Tensor::zeros((4, 2), DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&t, &st).unwrap();
    let e = err(tmp.path());
    assert!(
        e.contains("adapter_model.safetensors") && (e.contains("vision_tower") || e.contains("layers.2.mlp.up_proj")),
        "{e}"
    );

    std::fs::remove_file(&st).unwrap();
    assert!(err(tmp.path()).contains("adapter_model.safetensors"));

    // an adapter for a different model: shapes do not fit
    copy();
    let (ad, scale) = Adapter::load(tmp.path(), &dev).unwrap();
    let w = gemmaclip::weights::Weights::open(&tiny_dir().join("llm"), DType::F32, &dev).unwrap();
    let mut cfg = common::forward::llm_cfg().text;
    cfg.num_hidden_layers = 6;
    cfg.layer_types.truncate(6);
    let mut llm = gemmaclip::model::gemma3::Gemma3Text::load(w, &cfg, BaseFormat::Dense).unwrap();
    let e = ad.attach(&mut llm, scale).unwrap_err().to_string();
    assert!(e.contains("layers.6") || e.contains("layers.7"), "{e}");
}
