// Attention of one new query per row over the whole KV cache (src/model/decode_attention.rs), in
// four launches where the composed form (attention.rs grouped_attention) takes about twelve, and
// rounded where that form rounds: each score q.k to bf16, times the scale to bf16, plus the
// additive f32 mask; softmax in f32 with p = exp(f - max) / sum rounded to bf16; out = sum p v
// in f32, rounded to bf16. Only summation orders differ. Split over keys (flash-decoding) so a
// batch of one row still fills the GPU; no atomics, so a replay gives the same bits.
// Built without FMA contraction (build.rs passes --fmad=false).

__device__ __forceinline__ unsigned int f32_to_bf16_rne(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}
__device__ __forceinline__ float bf16_to_f32(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ float bf16_round(float f) { return bf16_to_f32((unsigned short)f32_to_bf16_rne(f)); }

#define MAX_REP 4

// scores[b, h, j] for the rep query heads of kv head g: grid (B * nkv, ceil(T / chunk)), 256
// threads; a warp per key, each lane 8 of the hd <= 256 dimensions. Fully masked keys skip the
// dot: f32::MIN plus any score is f32::MIN.
extern "C" __global__ void decode_attn_scores(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                                              const float* __restrict__ mask, float* __restrict__ scores, int nkv,
                                              int rep, int T, int hd, int chunk, float scale) {
    int bg = blockIdx.x, b = bg / nkv, g = bg % nkv;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int nq = nkv * rep;
    bool has = lane * 8 < hd;
    // loops over the query heads run to MAX_REP with a guard, so qv and dots stay in registers
    float qv[MAX_REP][8];
#pragma unroll
    for (int i = 0; i < MAX_REP; i++) {
        if (i >= rep) break;
        const unsigned short* qr = q + ((size_t)b * nq + g * rep + i) * hd + lane * 8;
#pragma unroll
        for (int e = 0; e < 8; e++) qv[i][e] = has ? bf16_to_f32(qr[e]) : 0.0f;
    }
    int j0 = blockIdx.y * chunk, j1 = min(T, j0 + chunk);
    // KEYS keys per warp at once (j, j + 8, ...): their mask values, then their key rows, load
    // together, so a warp waits two memory latencies per KEYS keys instead of two per key
    const int KEYS = 4;
    for (int jb = j0 + warp; jb < j1; jb += 8 * KEYS) {
        float mk[KEYS];
        uint4 w[KEYS];
#pragma unroll
        for (int u = 0; u < KEYS; u++) {
            int j = jb + 8 * u;
            mk[u] = j < j1 ? mask[(size_t)b * T + j] : -3.40282347e38f;
        }
#pragma unroll
        for (int u = 0; u < KEYS; u++) {
            int j = jb + 8 * u;
            w[u] = (has && mk[u] != -3.40282347e38f) ? *(const uint4*)(k + (((size_t)b * nkv + g) * T + j) * hd + lane * 8)
                                                     : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < KEYS; u++) {
            int j = jb + 8 * u;
            if (j >= j1) break;
            float dots[MAX_REP] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (mk[u] != -3.40282347e38f) {
                float kv[8];
                unsigned int ws[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    kv[2 * e] = bf16_to_f32((unsigned short)(ws[e] & 0xffffu));
                    kv[2 * e + 1] = bf16_to_f32((unsigned short)(ws[e] >> 16));
                }
#pragma unroll
                for (int i = 0; i < MAX_REP; i++) {
                    if (i >= rep) break;
                    float a = 0.0f;
#pragma unroll
                    for (int e = 0; e < 8; e++) a += qv[i][e] * kv[e];
                    for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
                    dots[i] = a;
                }
            }
            if (lane == 0) {
#pragma unroll
                for (int i = 0; i < MAX_REP; i++) {
                    if (i >= rep) break;
                    float f = (mk[u] != -3.40282347e38f) ? bf16_round(bf16_round(dots[i]) * scale) + mk[u] : mk[u];
                    scores[((size_t)b * nq + g * rep + i) * T + j] = f;
                }
            }
        }
    }
}

__device__ float block_reduce(float v, bool is_max, float* red) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int o = 16; o > 0; o >>= 1) {
        float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, u) : v + u;
    }
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = red[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++) r = is_max ? fmaxf(r, red[w]) : r + red[w];
    __syncthreads();
    return r;
}

// stats[bh] = (max, sum of exp(f - max)) over every key of the row: grid B * nq, hd threads (a
// multiple of 32). Once per row, where each values block used to recompute them for itself.
extern "C" __global__ void decode_attn_stats(const float* __restrict__ scores, float* __restrict__ stats, int T) {
    __shared__ float red[32];
    const float* f = scores + (size_t)blockIdx.x * T;
    float m = -3.40282347e38f;
    for (int j = threadIdx.x; j < T; j += blockDim.x) m = fmaxf(m, f[j]);
    m = block_reduce(m, true, red);
    float s = 0.0f;
    for (int j = threadIdx.x; j < T; j += blockDim.x) s += expf(f[j] - m);
    s = block_reduce(s, false, red);
    if (threadIdx.x == 0) {
        stats[2 * blockIdx.x] = m;
        stats[2 * blockIdx.x + 1] = s;
    }
}

// partial[bh, s, d] = sum over the keys of chunk s of p_j v[j, d], p_j = bf16(exp(f_j - max) / sum)
// with the row's max and sum from decode_attn_stats: grid (B * nq, ceil(T / chunk)), hd threads
// (a multiple of 32, <= 256).
extern "C" __global__ void decode_attn_values(const float* __restrict__ scores, const float* __restrict__ stats,
                                              const unsigned short* __restrict__ v, float* __restrict__ partial,
                                              int nkv, int rep, int T, int hd, int chunk) {
    __shared__ float p[256];
    int bh = blockIdx.x, b = bh / (nkv * rep), g = (bh % (nkv * rep)) / rep;
    const float* f = scores + (size_t)bh * T;
    float m = stats[2 * bh], s = stats[2 * bh + 1];
    int j0 = blockIdx.y * chunk, j1 = min(T, j0 + chunk);
    float acc = 0.0f;
    int d = threadIdx.x;
    const unsigned short* vb = v + ((size_t)b * nkv + g) * T * hd;
    for (int c = j0; c < j1; c += blockDim.x) {
        int j = c + threadIdx.x;
        float pj = (j < j1) ? bf16_round(expf(f[j] - m) / s) : 0.0f;
        p[threadIdx.x] = pj;
        // the empty columns at the end of the cache (masked: p = 0) add nothing; skip their loads
        if (!__syncthreads_or(pj != 0.0f)) continue;
        int n = min((int)blockDim.x, j1 - c);
#pragma unroll 16
        for (int t = 0; t < n; t++) acc += p[t] * bf16_to_f32(vb[(size_t)(c + t) * hd + d]);
        __syncthreads();
    }
    partial[((size_t)bh * gridDim.y + blockIdx.y) * hd + d] = acc;
}

// out[bh, d] = bf16(sum over chunks of partial): grid B * nq, hd threads.
extern "C" __global__ void decode_attn_combine(const float* __restrict__ partial, unsigned short* __restrict__ out,
                                               int splits, int hd) {
    int bh = blockIdx.x, d = threadIdx.x;
    float acc = 0.0f;
#pragma unroll 8
    for (int s = 0; s < splits; s++) acc += partial[((size_t)bh * splits + s) * hd + d];
    out[(size_t)bh * hd + d] = (unsigned short)f32_to_bf16_rne(acc);
}
