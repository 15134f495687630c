// Elementwise bf16 kernels of training. Gemma's MLP activation, gelu_pytorch_tanh(gate) * up, one kernel
// each way (src/model/gelu_mul.rs),
// arithmetic in f32, bf16 in and out. The forward rounds gelu(gate) to bf16 before the product,
// as the composed gelu-then-multiply does. Header-free so plain nvcc --ptx builds it.

__device__ __forceinline__ float to_f(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ unsigned short to_bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// to_bf's bits for every value but NaN (the hardware's canonical 0x7fff) in one instruction
// (sm_80's cvt): gelu*up's kernels are bound by their arithmetic (tanhf, no FMA), not memory.
__device__ __forceinline__ unsigned short to_bf_cvt(float f) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

#define GELU_K 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_C 0.044715f

__device__ __forceinline__ unsigned short fwd1(unsigned short gate, unsigned short up) {
    float x = to_f(gate);
    float g = 0.5f * x * (1.0f + tanhf(GELU_K * (x + GELU_C * x * x * x)));
    return to_bf_cvt(to_f(to_bf_cvt(g)) * to_f(up));
}

// d_gate = dy * up * gelu'(gate), d_up = dy * gelu(gate)
__device__ __forceinline__ void bwd1(unsigned short gate, unsigned short up, unsigned short dy, unsigned short* d_gate,
                                     unsigned short* d_up) {
    float x = to_f(gate), u = to_f(up), g = to_f(dy);
    float t = tanhf(GELU_K * (x + GELU_C * x * x * x));
    float gelu = 0.5f * x * (1.0f + t);
    float dgelu = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_K * (1.0f + 3.0f * GELU_C * x * x);
    *d_up = to_bf_cvt(g * to_f(to_bf_cvt(gelu)));
    *d_gate = to_bf_cvt(g * u * dgelu);
}

extern "C" __global__ void gelu_mul_fwd_bf16(const unsigned short* gate, const unsigned short* up, unsigned short* out,
                                             unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = fwd1(gate[i], up[i]);
}

extern "C" __global__ void gelu_mul_bwd_bf16(const unsigned short* gate, const unsigned short* up,
                                             const unsigned short* dy, unsigned short* d_gate, unsigned short* d_up,
                                             unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    bwd1(gate[i], up[i], dy[i], &d_gate[i], &d_up[i]);
}

// The same, eight elements per thread through 16-byte loads and stores (n a multiple of 8, every
// pointer 16-byte aligned): one element per thread moved two bytes per access and reached about
// 1.6 TB/s on an H200. Same arithmetic per element, so the same bits.
union Bf8 {
    uint4 v;
    unsigned short h[8];
};

extern "C" __global__ void gelu_mul_fwd_bf16_x8(const uint4* gate, const uint4* up, uint4* out, unsigned long long n8) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    Bf8 g, u, o;
    g.v = gate[i];
    u.v = up[i];
#pragma unroll
    for (int j = 0; j < 8; j++) o.h[j] = fwd1(g.h[j], u.h[j]);
    out[i] = o.v;
}

extern "C" __global__ void gelu_mul_bwd_bf16_x8(const uint4* gate, const uint4* up, const uint4* dy, uint4* d_gate,
                                                uint4* d_up, unsigned long long n8) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    Bf8 g, u, d, dg, du;
    g.v = gate[i];
    u.v = up[i];
    d.v = dy[i];
#pragma unroll
    for (int j = 0; j < 8; j++) bwd1(g.h[j], u.h[j], d.h[j], &dg.h[j], &du.h[j]);
    d_gate[i] = dg.v;
    d_up[i] = du.v;
}

// a + b for bf16 (the sum in f32, rounded once: the bits of a bf16 add, since two bf16 values'
// f32 sum never lands on a bf16 rounding midpoint it was not exactly at), eight per thread.
extern "C" __global__ void add_bf16_x8(const uint4* a, const uint4* b, uint4* out, unsigned long long n8) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    Bf8 x, y, o;
    x.v = a[i];
    y.v = b[i];
#pragma unroll
    for (int j = 0; j < 8; j++) o.h[j] = to_bf(to_f(x.h[j]) + to_f(y.h[j]));
    out[i] = o.v;
}

// The frozen CLIP tower's linears (src/model/clip_linear.rs). Each output row starts as the bias,
// eight per thread (cols a multiple of 8), and a GEMM then adds x·Wᵀ with beta = 1.
extern "C" __global__ void bias_rows_bf16_x8(const uint4* bias, uint4* out, unsigned long long n8, unsigned long long cols8) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    out[i] = bias[i % cols8];
}

// CLIP's quick_gelu x * sigmoid(1.702 x) in place, rounded where PyTorch's bf16 ops round: after
// the scaling, after the sigmoid and after the product (each computed in f32).
extern "C" __global__ void quick_gelu_bf16_x8(uint4* x, unsigned long long n8) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    Bf8 v, o;
    v.v = x[i];
#pragma unroll
    for (int j = 0; j < 8; j++) {
        float t = to_f(v.h[j]);
        float a = to_f(to_bf(t * 1.702f));
        float s = to_f(to_bf(1.0f / (1.0f + expf(-a))));
        o.h[j] = to_bf(t * s);
    }
    x[i] = o.v;
}
