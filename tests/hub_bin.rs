//! PyTorch `.bin` checkpoints (the zip format of `torch.save`), one file or sharded with
//! `pytorch_model.bin.index.json`: read tensor for tensor like the safetensors they were made from
//! (`tools/reference/make_bin_fixture.py` on the tiny CLIP), and never preferred to safetensors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, tiny_dir};
use gemmaclip::config::ClipVisionConfig;
use gemmaclip::model::clip::ClipVision;
use gemmaclip::weights::{checkpoint_files, Format, Weights};
use std::collections::HashMap;
use std::path::Path;

/// A CLIP directory: the tiny CLIP's configs and the files of one fixture directory.
fn clip_dir(fixture: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(tiny_dir().join("vision").join(f), d.path().join(f)).unwrap();
    }
    for e in std::fs::read_dir(fixture_path(fixture)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.path().join(p.file_name().unwrap())).unwrap();
    }
    d
}

fn safetensors_reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(tiny_dir().join("vision/model.safetensors"), &Device::Cpu).unwrap()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    let v = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
    a.dtype() == b.dtype() && a.dims() == b.dims() && v(a) == v(b)
}

fn assert_equals_reference(dir: &Path) {
    let reference = safetensors_reference();
    let w = Weights::open(dir, DType::F32, &Device::Cpu).unwrap();
    let probe = "vision_model.embeddings.patch_embedding.weight";
    let t = &reference[probe];
    assert!(
        same(&w.get_as(probe, t.dims(), t.dtype()).unwrap(), t),
        "the tiny preset changed: regenerate tests/fixtures/clip_bin* with tools/reference/make_bin_fixture.py"
    );
    for (name, t) in &reference {
        assert!(w.contains(name), "{name} missing");
        assert!(same(&w.get_as(name, t.dims(), t.dtype()).unwrap(), t), "{name} differs");
    }
    let cfg = ClipVisionConfig::from_file(&dir.join("config.json")).unwrap();
    ClipVision::load(Weights::open(dir, DType::F32, &Device::Cpu).unwrap(), &cfg).unwrap();
}

#[test]
fn a_single_pytorch_model_bin_reads_like_the_safetensors() {
    let d = clip_dir("clip_bin");
    assert_eq!(checkpoint_files(d.path()).unwrap(), (Format::Pth, vec![d.path().join("pytorch_model.bin")]));
    assert_equals_reference(d.path());
}

#[test]
fn sharded_bin_files_are_found_through_their_index() {
    let d = clip_dir("clip_bin_sharded");
    let (format, files) = checkpoint_files(d.path()).unwrap();
    assert_eq!((format, files.len()), (Format::Pth, 2));
    assert_equals_reference(d.path());

    std::fs::remove_file(d.path().join("pytorch_model-00002-of-00002.bin")).unwrap();
    let e = format!("{:#}", Weights::open(d.path(), DType::F32, &Device::Cpu).err().unwrap());
    assert!(
        e.contains("pytorch_model.bin.index.json") && e.contains("pytorch_model-00002-of-00002.bin is missing"),
        "{e}"
    );
}

#[test]
fn safetensors_win_where_both_are_there() {
    let d = clip_dir("clip_bin");
    // safetensors holding other values than the .bin: whichever is read shows through
    let doubled: HashMap<String, Tensor> =
        safetensors_reference().into_iter().map(|(n, t)| (n, (&t + &t).unwrap())).collect();
    candle_core::safetensors::save(&doubled, d.path().join("model.safetensors")).unwrap();
    assert_eq!(checkpoint_files(d.path()).unwrap().0, Format::Safetensors);
    let w = Weights::open(d.path(), DType::F32, &Device::Cpu).unwrap();
    for (name, t) in &doubled {
        assert!(same(&w.get_as(name, t.dims(), t.dtype()).unwrap(), t), "{name} not from model.safetensors");
    }
}

#[test]
fn bin_errors_name_the_file_and_the_tensor() {
    let d = clip_dir("clip_bin");
    let w = Weights::open(d.path(), DType::F32, &Device::Cpu).unwrap();
    let e = w.get("vision_model.pre_layrnorm.weight", &[7]).unwrap_err().to_string();
    assert!(e.contains("vision_model.pre_layrnorm.weight") && e.contains("[7]"), "{e}");
    let e = w.get("vision_model.nope", &[1]).unwrap_err().to_string();
    assert!(e.contains("`vision_model.nope` is missing"), "{e}");

    // the legacy (pre-zip) format and stray bytes are refused with the file named, never executed
    std::fs::write(d.path().join("pytorch_model.bin"), b"\x80\x02}q\x00.").unwrap();
    let e = format!("{:#}", Weights::open(d.path(), DType::F32, &Device::Cpu).err().unwrap());
    assert!(e.contains("pytorch_model.bin: not a PyTorch zip checkpoint"), "{e}");
}
