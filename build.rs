//! With the `cuda` feature, compiles src/{peft,model,train}/kernels/*.cu to PTX with nvcc (which candle's own
//! CUDA build already requires). The PTX targets `compute_<CUDA_COMPUTE_CAP>` (default 80), so the
//! driver JIT-compiles it for any GPU of that generation or newer.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/peft/kernels");
    println!("cargo:rerun-if-changed=src/model/kernels");
    println!("cargo:rerun-if-changed=src/train/kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let cap: String = std::env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "80".into())
        .chars()
        .filter(|c| c.is_ascii_digit())
        .collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for (src, name) in [
        ("src/peft/kernels/nf4.cu", "nf4.ptx"),
        ("src/model/kernels/rmsnorm.cu", "rmsnorm.ptx"),
        ("src/model/kernels/elementwise.cu", "elementwise.ptx"),
        ("src/model/kernels/decode_attention.cu", "decode_attention.ptx"),
        ("src/model/kernels/sampling.cu", "sampling.ptx"),
        ("src/train/kernels/optimizer.cu", "optimizer.ptx"),
        ("src/train/kernels/cross_entropy.cu", "cross_entropy.ptx"),
    ] {
        let status = std::process::Command::new(&nvcc)
            .args(["--ptx", "-O3", "--fmad=false", &format!("-arch=compute_{cap}"), "-o"])
            .arg(out.join(name))
            .arg(src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} (the cuda feature needs the CUDA toolkit): {e}"));
        assert!(status.success(), "nvcc failed on {src}");
    }
    build_cudnn_shim();
}

/// The cuDNN attention shim: C++ against the header-only cuDNN frontend in dynamic-loading mode,
/// so the binary links neither libcudnn nor libcudart (it opens libcudnn.so.9 at run time). The
/// headers are found through CUDNN_FRONTEND_INCLUDE_DIR and CUDNN_INCLUDE_DIR (PyPI nvidia-cudnn-frontend, nvidia-cudnn-cu13)
/// and the CUDA toolkit (CUDA_HOME, or nvcc's directory).
fn build_cudnn_shim() {
    const SRC: &str = "src/model/kernels/cudnn_sdpa.cpp";
    for v in ["CUDNN_FRONTEND_INCLUDE_DIR", "CUDNN_INCLUDE_DIR", "CUDA_HOME"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: the cuda feature builds the cuDNN attention shim; see README.md, GPU build")
        })
    };
    let cuda_home =
        std::env::var("CUDA_HOME").or_else(|_| std::env::var("CUDA_PATH")).unwrap_or_else(|_| "/usr/local/cuda".into());
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file(SRC)
        .include(var("CUDNN_FRONTEND_INCLUDE_DIR"))
        .include(var("CUDNN_INCLUDE_DIR"))
        .include(format!("{cuda_home}/include"))
        .define("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None)
        .opt_level(2)
        .warnings(false)
        .compile("gemmaclip_cudnn");
    println!("cargo:rustc-link-lib=dl");
}
