//! Shared by the integration tests: the tiny checkpoint (written once per test binary by the same
//! code as `gemmaclip init --preset tiny --seed 0`) and the reference fixtures.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use gemmaclip::checkpoint::{init, Preset};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub fn tiny_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().expect("tempdir");
        init(Preset::Tiny, d.path(), 0).expect("init tiny");
        d
    })
    .path()
}

pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub struct Fixture {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

impl Fixture {
    pub fn load(name: &str) -> Self {
        let path = fixture_path(name);
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture");
        let bytes = std::fs::read(&path).expect("fixture bytes");
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("fixture header");
        let metadata = meta.metadata().clone().unwrap_or_default();
        Self { tensors, metadata }
    }

    pub fn get(&self, k: &str) -> &Tensor {
        self.tensors.get(k).unwrap_or_else(|| panic!("fixture has no tensor {k}"))
    }

    /// An integer tensor as rows of i64.
    pub fn rows_i64(&self, k: &str) -> Vec<Vec<i64>> {
        self.get(k).to_dtype(candle_core::DType::I64).unwrap().to_vec2::<i64>().unwrap()
    }
}

/// max |a - b| over all elements (both converted to f32).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(candle_core::DType::F32).unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}
