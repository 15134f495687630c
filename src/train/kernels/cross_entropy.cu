// Cross-entropy over a 262k vocabulary straight from the bf16 logits (src/train/fused_ce.rs):
// the forward keeps each row's log-sum-exp, the backward writes d(logits) in bf16 in one pass.
// Arithmetic in f32; one block per row; an online max/sum so each row is read once. Header-free.

__device__ __forceinline__ float to_f(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ unsigned short to_bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

#define NEG_INF __int_as_float(0xff800000)

// (m, s) stands for s * exp(m): combining two keeps the larger exponent
__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {
    if (m2 == NEG_INF) return;
    if (m == NEG_INF) { m = m2; s = s2; return; }
    float M = fmaxf(m, m2);
    s = s * expf(m - M) + s2 * expf(m2 - M);
    m = M;
}

// loss[row] = scale * (lse(row) - x[row, target]); lse[row] kept for the backward
extern "C" __global__ void ce_fwd_bf16(const unsigned short* logits, const unsigned int* targets, float* loss,
                                       float* lse, unsigned long long vocab, float scale) {
    __shared__ float sm[32], ss[32];
    const unsigned short* x = logits + (unsigned long long)blockIdx.x * vocab;
    float m = NEG_INF, s = 0.0f;
    for (unsigned long long j = threadIdx.x; j < vocab; j += blockDim.x) {
        float v = to_f(x[j]);
        if (v > m) { s = s * expf(m - v) + 1.0f; m = v; } else { s += expf(v - m); }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        combine(m, s, m2, s2);
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) { sm[warp] = m; ss[warp] = s; }
    __syncthreads();
    if (warp == 0) {
        int warps = blockDim.x >> 5;
        m = lane < warps ? sm[lane] : NEG_INF;
        s = lane < warps ? ss[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            combine(m, s, m2, s2);
        }
        if (lane == 0) {
            float l = m + logf(s);
            lse[blockIdx.x] = l;
            loss[blockIdx.x] = scale * (l - to_f(x[targets[blockIdx.x]]));
        }
    }
}

// d(logits)[row, j] = g[row] * scale * (softmax_j - [j == target])
extern "C" __global__ void ce_bwd_bf16(const unsigned short* logits, const unsigned int* targets, const float* lse,
                                       const float* g, unsigned short* dx, unsigned long long vocab, float scale) {
    unsigned long long row = blockIdx.x;
    const unsigned short* x = logits + row * vocab;
    unsigned short* d = dx + row * vocab;
    float l = lse[row], gs = g[row] * scale;
    unsigned int t = targets[row];
    for (unsigned long long j = threadIdx.x; j < vocab; j += blockDim.x) {
        float p = expf(to_f(x[j]) - l);
        d[j] = to_bf(gs * (p - (j == t ? 1.0f : 0.0f)));
    }
}
