// Gemma's MLP activation, gelu_pytorch_tanh(gate) * up, one kernel each way (src/model/gelu_mul.rs),
// arithmetic in f32, bf16 in and out. The forward rounds gelu(gate) to bf16 before the product,
// as the composed gelu-then-multiply does. Header-free so plain nvcc --ptx builds it.

__device__ __forceinline__ float to_f(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ unsigned short to_bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

#define GELU_K 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_C 0.044715f

extern "C" __global__ void gelu_mul_fwd_bf16(const unsigned short* gate, const unsigned short* up, unsigned short* out,
                                             unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = to_f(gate[i]);
    float g = 0.5f * x * (1.0f + tanhf(GELU_K * (x + GELU_C * x * x * x)));
    out[i] = to_bf(to_f(to_bf(g)) * to_f(up[i]));
}

// d_gate = dy * up * gelu'(gate), d_up = dy * gelu(gate)
extern "C" __global__ void gelu_mul_bwd_bf16(const unsigned short* gate, const unsigned short* up,
                                             const unsigned short* dy, unsigned short* d_gate, unsigned short* d_up,
                                             unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = to_f(gate[i]), u = to_f(up[i]), g = to_f(dy[i]);
    float t = tanhf(GELU_K * (x + GELU_C * x * x * x));
    float gelu = 0.5f * x * (1.0f + t);
    float dgelu = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_K * (1.0f + 3.0f * GELU_C * x * x);
    d_up[i] = to_bf(g * to_f(to_bf(gelu)));
    d_gate[i] = to_bf(g * u * dgelu);
}
