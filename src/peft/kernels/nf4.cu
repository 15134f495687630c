// NF4 (bitsandbytes layout: blocks of 64, one f32 absmax per block, element 2i in the high nibble
// of byte i) and a counter-based dropout mask. Header-free so it builds with plain nvcc --ptx.
// Built without FMA contraction (build.rs passes --fmad=false) so the f32 arithmetic is the same
// rounding sequence as the CPU code in nf4.rs and dropout.rs.

__constant__ float NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

__device__ __forceinline__ unsigned int f32_to_bf16_rne(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}
__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// Index of the nearest code value as torch.bucketize(x, midpoints) (right=False) computes it:
// the number of midpoints strictly below x.
__device__ __forceinline__ unsigned int nf4_index(float x, const float* mid) {
    unsigned int k = 0;
#pragma unroll
    for (int j = 0; j < 15; j++) k += (mid[j] < x) ? 1u : 0u;
    return k;
}

__device__ __forceinline__ void load_midpoints(float* mid) {
    if (threadIdx.x < 15) mid[threadIdx.x] = (NF4_CODE[threadIdx.x] + NF4_CODE[threadIdx.x + 1]) / 2.0f;
    __syncthreads();
}

__device__ __forceinline__ unsigned char nf4_pack(float x0, float x1, float am, const float* mid) {
    float inv = 1.0f / fmaxf(am, 1e-38f);
    float s0 = fminf(fmaxf(x0 * inv, -1.0f), 1.0f);
    float s1 = fminf(fmaxf(x1 * inv, -1.0f), 1.0f);
    return (unsigned char)((nf4_index(s0, mid) << 4) | nf4_index(s1, mid));
}

// One thread per output byte; n_bytes = n / 2, block size a multiple of 2.
extern "C" __global__ void nf4_quantize_bf16(const unsigned short* __restrict__ w, const float* __restrict__ absmax,
                                             unsigned char* __restrict__ out, unsigned int n_bytes, unsigned int block) {
    __shared__ float mid[15];
    load_midpoints(mid);
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_bytes) return;
    out[i] = nf4_pack(bf16_to_f32(w[2 * i]), bf16_to_f32(w[2 * i + 1]), absmax[(2 * i) / block], mid);
}

extern "C" __global__ void nf4_quantize_f32(const float* __restrict__ w, const float* __restrict__ absmax,
                                            unsigned char* __restrict__ out, unsigned int n_bytes, unsigned int block) {
    __shared__ float mid[15];
    load_midpoints(mid);
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_bytes) return;
    out[i] = nf4_pack(w[2 * i], w[2 * i + 1], absmax[(2 * i) / block], mid);
}

// lo and hi rounded to bf16 (to nearest, ties to even) in one instruction (sm_80's cvt), packed lo
// first: f32_to_bf16_rne's bits for every value but NaN (the hardware's canonical 0x7fff), which a
// dequantized weight cannot be and dropout gives only for a NaN or infinite input.
__device__ __forceinline__ unsigned int bf16x2_rne(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// One thread = 4 words of 4 packed bytes, each -> 8 bf16 in one 16-byte store; n % 8 == 0 and
// block % 8 == 0. A block takes 4 x 256 consecutive words, word e of a thread at e x 256 past its
// first (coalesced loads and stores), and all four loads are issued before any is decoded: with one
// 4-byte load per thread too few bytes were in flight to keep the memory busy.
#define DQ_WORDS 4
extern "C" __global__ void nf4_dequantize_bf16(const unsigned int* __restrict__ q4, const float* __restrict__ absmax,
                                               uint4* __restrict__ out, unsigned int n_words, unsigned int block) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = NF4_CODE[threadIdx.x];
    unsigned int first = blockIdx.x * blockDim.x * DQ_WORDS + threadIdx.x;
    unsigned int w[DQ_WORDS];
    float s[DQ_WORDS];
#pragma unroll
    for (int e = 0; e < DQ_WORDS; e++) {
        unsigned int i = first + e * blockDim.x;
        if (i < n_words) {
            w[e] = q4[i];
            s[e] = absmax[(8u * i) / block];
        }
    }
    __syncthreads();
#pragma unroll
    for (int e = 0; e < DQ_WORDS; e++) {
        unsigned int i = first + e * blockDim.x;
        if (i >= n_words) break;
        unsigned int r[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            unsigned int b = (w[e] >> (8 * j)) & 0xffu;
            r[j] = bf16x2_rne(lut[b >> 4] * s[e], lut[b & 15] * s[e]);
        }
        out[i] = make_uint4(r[0], r[1], r[2], r[3]);
    }
}

extern "C" __global__ void nf4_dequantize_f32(const unsigned char* __restrict__ q, const float* __restrict__ absmax,
                                              float* __restrict__ out, unsigned int n, unsigned int block) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = NF4_CODE[threadIdx.x];
    __syncthreads();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned char b = q[i / 2];
    out[i] = lut[(i & 1) ? (b & 15) : (b >> 4)] * absmax[i / block];
}

// Inverted dropout: out[i] = keep ? scale : 0 with keep = uniform(seed, i) >= p, where uniform is
// the top 24 bits of splitmix64(seed + i * golden) -- the same stream dropout.rs draws on the CPU.
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
extern "C" __global__ void dropout_mask_f32(float* __restrict__ out, unsigned long long seed, unsigned long long n,
                                            float p, float scale) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned long long r = splitmix64(seed + (i + 1ull) * 0x9E3779B97F4A7C15ull);
    float u = (float)(r >> 40) * (1.0f / 16777216.0f);
    out[i] = (u >= p) ? scale : 0.0f;
}
extern "C" __global__ void dropout_mask_bf16(unsigned short* __restrict__ out, unsigned long long seed,
                                             unsigned long long n, float p, float scale) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned long long r = splitmix64(seed + (i + 1ull) * 0x9E3779B97F4A7C15ull);
    float u = (float)(r >> 40) * (1.0f / 16777216.0f);
    out[i] = (unsigned short)f32_to_bf16_rne((u >= p) ? scale : 0.0f);
}

// Decode fast path: y[m, n] = sum_k x[m, k] * W[n, k] straight from NF4 (0.5 byte per weight read
// instead of a bf16 copy written and read back), plus, where h is given, an unmerged LoRA term
// s * (h[m, :] . B[n, :]) rounded where the composed form (lora.rs) rounds it: the product to
// bf16, times s to bf16, the sum to bf16. `wpr` warps (1, 2 or 4) of a 256-thread block share an
// output row, splitting K; each lane takes 32 consecutive weights (one 16-byte load) per step.
// K % 64 == 0, M <= 8. f32 accumulation; products in f32 (no FMA contraction: --fmad=false).
#define GEMV_MAX_M 8
#define GEMV_PRELOAD 4
__device__ __forceinline__ float bf16_round(float f) { return bf16_to_f32((unsigned short)f32_to_bf16_rne(f)); }
// One lane's share of the row: M is a template parameter so the accumulators stay in registers,
// and up to GEMV_PRELOAD 16-byte weight loads are in flight before any is decoded.
template <int M>
__device__ __forceinline__ void gemv_lane(const unsigned char* __restrict__ wr, const float* __restrict__ am,
                                          const unsigned short* __restrict__ x, int K, int first, int stride,
                                          const float* lut, float* acc) {
    for (int base = first; base < K; base += GEMV_PRELOAD * stride) {
        uint4 w[GEMV_PRELOAD];
        float s[GEMV_PRELOAD];
#pragma unroll
        for (int p = 0; p < GEMV_PRELOAD; p++) {
            int k0 = base + p * stride;
            if (k0 < K) {
                w[p] = *(const uint4*)(wr + k0 / 2);
                s[p] = am[k0 / 64];
            }
        }
#pragma unroll
        for (int p = 0; p < GEMV_PRELOAD; p++) {
            int k0 = base + p * stride;
            if (k0 >= K) break;
            unsigned int ws[4] = {w[p].x, w[p].y, w[p].z, w[p].w};
            float wv[32];
#pragma unroll
            for (int j = 0; j < 16; j++) {
                unsigned int b = (ws[j >> 2] >> (8 * (j & 3))) & 0xffu;
                wv[2 * j] = lut[b >> 4] * s[p];
                wv[2 * j + 1] = lut[b & 15] * s[p];
            }
#pragma unroll
            for (int m = 0; m < M; m++) {
                const uint4* xp = (const uint4*)(x + (size_t)m * K + k0);
                float a = 0.0f;
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    uint4 xv = xp[c];
                    unsigned int xs[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        a += wv[8 * c + 2 * j] * bf16_to_f32((unsigned short)(xs[j] & 0xffffu));
                        a += wv[8 * c + 2 * j + 1] * bf16_to_f32((unsigned short)(xs[j] >> 16));
                    }
                }
                acc[m] += a;
            }
        }
    }
}

template <int MAXM>
__device__ __forceinline__ void nf4_gemv_body(const unsigned char* __restrict__ q, const float* __restrict__ absmax,
                                         const unsigned short* __restrict__ x, unsigned short* __restrict__ y,
                                         int M, int N, int K, int wpr, const unsigned short* __restrict__ h,
                                         const unsigned short* __restrict__ lb, int r, float scale) {
    __shared__ float lut[16];
    __shared__ float part[8][MAXM];
    if (threadIdx.x < 16) lut[threadIdx.x] = NF4_CODE[threadIdx.x];
    __syncthreads();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int row = blockIdx.x * (8 / wpr) + warp / wpr;
    int sub = warp % wpr;
    bool live = row < N;
    float acc[MAXM];
#pragma unroll
    for (int m = 0; m < MAXM; m++) acc[m] = 0.0f;
    if (live) {
        const unsigned char* wr = q + (size_t)row * (K / 2);
        const float* am = absmax + (size_t)row * (K / 64);
        int first = (sub * 32 + lane) * 32, stride = wpr * 1024;
        switch (M) {
            case 1: gemv_lane<1>(wr, am, x, K, first, stride, lut, acc); break;
            case 2: gemv_lane<2>(wr, am, x, K, first, stride, lut, acc); break;
            case 3: gemv_lane<3>(wr, am, x, K, first, stride, lut, acc); break;
            case 4: gemv_lane<4>(wr, am, x, K, first, stride, lut, acc); break;
            case 5: gemv_lane<5>(wr, am, x, K, first, stride, lut, acc); break;
            case 6: gemv_lane<6>(wr, am, x, K, first, stride, lut, acc); break;
            case 7: gemv_lane<7>(wr, am, x, K, first, stride, lut, acc); break;
            default: gemv_lane<8>(wr, am, x, K, first, stride, lut, acc); break;
        }
    }
#pragma unroll
    for (int m = 0; m < MAXM; m++) {
        if (m >= M) break;
        float v = acc[m];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) part[warp][m] = v;
    }
    __syncthreads();
    if (!live || sub != 0 || lane >= M) return;
    int m = lane;
    float t = 0.0f;
    for (int i = 0; i < wpr; i++) t += part[warp + i][m];
    float out = bf16_round(t);
    if (h != 0) {
        const unsigned short* hm = h + (size_t)m * r;
        const unsigned short* bn = lb + (size_t)row * r;
        float d = 0.0f;
        for (int j = 0; j < r; j++) d += bf16_to_f32(hm[j]) * bf16_to_f32(bn[j]);
        out = bf16_round(out + bf16_round(bf16_round(d) * scale));
    }
    y[(size_t)m * N + row] = (unsigned short)f32_to_bf16_rne(out);
}

// Up to GEMV_MAX_M activation rows (two blocks per SM: more accumulators); batch 1 has its own kernels below.
extern "C" __global__ void __launch_bounds__(256, 2) nf4_gemv_bf16(const unsigned char* __restrict__ q, const float* __restrict__ absmax,
                                         const unsigned short* __restrict__ x, unsigned short* __restrict__ y,
                                         int M, int N, int K, int wpr, const unsigned short* __restrict__ h,
                                         const unsigned short* __restrict__ lb, int r, float scale) {
    nf4_gemv_body<GEMV_MAX_M>(q, absmax, x, y, M, N, K, wpr, h, lb, r, scale);
}

// x[0 .. 32) (bf16) widened to f32.
__device__ __forceinline__ void widen32(const unsigned short* __restrict__ x, float* xv) {
    const uint4* xp = (const uint4*)x;
#pragma unroll
    for (int c = 0; c < 4; c++) {
        uint4 v = xp[c];
        unsigned int xs[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            xv[8 * c + 2 * j] = __uint_as_float(xs[j] << 16);
            xv[8 * c + 2 * j + 1] = __uint_as_float(xs[j] & 0xffff0000u);
        }
    }
}

// The 32 weights of one 16-byte NF4 load: sum of code value times x, FMAs in weight order
// (the block's absmax is applied to the sum by the caller).
__device__ __forceinline__ float nf4_dot32(uint4 w, const float* xv, const float* lut) {
    unsigned int ws[4] = {w.x, w.y, w.z, w.w};
    float a = 0.0f;
#pragma unroll
    for (int j = 0; j < 16; j++) {
        unsigned int b = (ws[j >> 2] >> (8 * (j & 3))) & 0xffu;
        a = __fmaf_rn(lut[b >> 4], xv[2 * j], a);
        a = __fmaf_rn(lut[b & 15], xv[2 * j + 1], a);
    }
    return a;
}

// Batch-1 decoding: the row split of nf4_gemv_bf16, but each lane sums its 32 weights' code
// values times x with FMAs and scales the sum once by the block's absmax (instead of scaling
// every weight and multiplying without FMA), each warp takes ROWS rows at once (their weight
// loads in flight together, each x chunk widened once for all of them), and the whole warp
// computes the LoRA term's dot product. The f32 sums group differently from nf4_gemv_bf16's:
// outputs agree to f32 rounding before the bf16 rounding of the result.
template <int ROWS>
__device__ __forceinline__ void gemv1_fast_body(const unsigned char* __restrict__ q, const float* __restrict__ absmax,
                                                const unsigned short* __restrict__ x, unsigned short* __restrict__ y,
                                                int N, int K, int wpr, const unsigned short* __restrict__ h,
                                                const unsigned short* __restrict__ lb, int r, float scale) {
    __shared__ float lut[16];
    __shared__ float part[8][ROWS];
    if (threadIdx.x < 16) lut[threadIdx.x] = NF4_CODE[threadIdx.x];
    __syncthreads();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int row0 = (blockIdx.x * (8 / wpr) + warp / wpr) * ROWS;
    int sub = warp % wpr;
    float acc[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; i++) acc[i] = 0.0f;
    int first = (sub * 32 + lane) * 32, stride = wpr * 1024;
    for (int base = first; base < K; base += GEMV_PRELOAD * stride) {
        uint4 w[ROWS][GEMV_PRELOAD];
        float sc[ROWS][GEMV_PRELOAD];
#pragma unroll
        for (int p = 0; p < GEMV_PRELOAD; p++) {
            int k0 = base + p * stride;
#pragma unroll
            for (int i = 0; i < ROWS; i++) {
                if (k0 < K && row0 + i < N) {
                    w[i][p] = *(const uint4*)(q + (size_t)(row0 + i) * (K / 2) + k0 / 2);
                    sc[i][p] = absmax[(size_t)(row0 + i) * (K / 64) + k0 / 64];
                } else {
                    w[i][p] = make_uint4(0u, 0u, 0u, 0u);
                    sc[i][p] = 0.0f;
                }
            }
        }
#pragma unroll
        for (int p = 0; p < GEMV_PRELOAD; p++) {
            int k0 = base + p * stride;
            if (k0 >= K) break;
            float xv[32];
            widen32(x + k0, xv);
#pragma unroll
            for (int i = 0; i < ROWS; i++) acc[i] = __fmaf_rn(nf4_dot32(w[i][p], xv, lut), sc[i][p], acc[i]);
        }
    }
#pragma unroll
    for (int i = 0; i < ROWS; i++) {
        float v = acc[i];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) part[warp][i] = v;
    }
    __syncthreads();
    if (sub != 0) return;
#pragma unroll
    for (int i = 0; i < ROWS; i++) {
        int row = row0 + i;
        if (row >= N) break;
        float t = 0.0f;
        for (int u = 0; u < wpr; u++) t += part[warp + u][i];
        float out = bf16_round(t);
        if (h != 0) {
            const unsigned short* bn = lb + (size_t)row * r;
            float d = 0.0f;
            for (int j = lane; j < r; j += 32) d = __fmaf_rn(bf16_to_f32(h[j]), bf16_to_f32(bn[j]), d);
            for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
            out = bf16_round(out + bf16_round(bf16_round(d) * scale));
        }
        if (lane == 0) y[row] = (unsigned short)f32_to_bf16_rne(out);
    }
}
extern "C" __global__ void __launch_bounds__(256, 3) nf4_gemv1_fast1_bf16(const unsigned char* __restrict__ q, const float* __restrict__ absmax,
                                         const unsigned short* __restrict__ x, unsigned short* __restrict__ y,
                                         int N, int K, int wpr, const unsigned short* __restrict__ h,
                                         const unsigned short* __restrict__ lb, int r, float scale) {
    gemv1_fast_body<1>(q, absmax, x, y, N, K, wpr, h, lb, r, scale);
}
extern "C" __global__ void __launch_bounds__(256, 2) nf4_gemv1_fast2_bf16(const unsigned char* __restrict__ q, const float* __restrict__ absmax,
                                         const unsigned short* __restrict__ x, unsigned short* __restrict__ y,
                                         int N, int K, int wpr, const unsigned short* __restrict__ h,
                                         const unsigned short* __restrict__ lb, int r, float scale) {
    gemv1_fast_body<2>(q, absmax, x, y, N, K, wpr, h, lb, r, scale);
}

// Batch-1 decoding, pipelined: a fixed grid (about two blocks per SM) whose warps walk the rows,
// the weights of their next row loading while they compute the current one, so the memory system
// never waits for the arithmetic (the kernels above load, then compute, then end, a block at a
// time). Row split, arithmetic and rounding as nf4_gemv1_fast*_bf16; the LoRA term's B row is
// loaded with the weights and h is held in registers. Needs K <= 4096 * wpr (each lane's share of a
// row in one load batch) and, with LoRA, an even r <= 64.
__device__ __forceinline__ void piped_load(const unsigned char* __restrict__ q, const float* __restrict__ absmax,
                                           const unsigned short* __restrict__ lb, int row, int N, int K, int r,
                                           int first, int stride, bool take_b, uint4* w, float* sc,
                                           unsigned int* bq) {
#pragma unroll
    for (int p = 0; p < GEMV_PRELOAD; p++) {
        int k0 = first + p * stride;
        if (row < N && k0 < K) {
            w[p] = *(const uint4*)(q + (size_t)row * (K / 2) + k0 / 2);
            sc[p] = absmax[(size_t)row * (K / 64) + k0 / 64];
        } else {
            w[p] = make_uint4(0u, 0u, 0u, 0u);
            sc[p] = 0.0f;
        }
    }
    *bq = (take_b && row < N) ? *(const unsigned int*)(lb + (size_t)row * r + 2 * (threadIdx.x & 31)) : 0u;
}

extern "C" __global__ void __launch_bounds__(256, 2) nf4_gemv1_piped_bf16(const unsigned char* __restrict__ q, const float* __restrict__ absmax,
                                         const unsigned short* __restrict__ x, unsigned short* __restrict__ y,
                                         int N, int K, int wpr, const unsigned short* __restrict__ h,
                                         const unsigned short* __restrict__ lb, int r, float scale) {
    __shared__ float lut[16];
    __shared__ float part[2][8];
    if (threadIdx.x < 16) lut[threadIdx.x] = NF4_CODE[threadIdx.x];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int groups_per_block = 8 / wpr, sub = warp % wpr;
    int groups = (N + groups_per_block - 1) / groups_per_block;
    int iters = (groups + gridDim.x - 1) / gridDim.x;
    int first = (sub * 32 + lane) * 32, stride = wpr * 1024;
    bool lora = h != 0;
    bool take_b = lora && sub == 0 && 2 * lane < r;
    float h0 = take_b ? bf16_to_f32(h[2 * lane]) : 0.0f, h1 = take_b ? bf16_to_f32(h[2 * lane + 1]) : 0.0f;
    uint4 w[GEMV_PRELOAD];
    float sc[GEMV_PRELOAD];
    unsigned int bq;
    int row = blockIdx.x * groups_per_block + warp / wpr;
    piped_load(q, absmax, lb, row, N, K, r, first, stride, take_b, w, sc, &bq);
    __syncthreads();
    for (int it = 0; it < iters; it++) {
        uint4 cw[GEMV_PRELOAD];
        float cs[GEMV_PRELOAD];
#pragma unroll
        for (int p = 0; p < GEMV_PRELOAD; p++) {
            cw[p] = w[p];
            cs[p] = sc[p];
        }
        unsigned int cb = bq;
        int cur = row;
        row += gridDim.x * groups_per_block;
        if (it + 1 < iters) piped_load(q, absmax, lb, row, N, K, r, first, stride, take_b, w, sc, &bq);
        float acc = 0.0f;
#pragma unroll
        for (int p = 0; p < GEMV_PRELOAD; p++) {
            int k0 = first + p * stride;
            if (k0 >= K) break;
            float xv[32];
            widen32(x + k0, xv);
            acc = __fmaf_rn(nf4_dot32(cw[p], xv, lut), cs[p], acc);
        }
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) part[it & 1][warp] = acc;
        // part[it & 1] is written again two iterations on, after every warp passed the next barrier
        __syncthreads();
        if (sub == 0 && cur < N) {
            float t = 0.0f;
            for (int u = 0; u < wpr; u++) t += part[it & 1][warp + u];
            float out = bf16_round(t);
            if (lora) {
                float d = __fmaf_rn(h1, __uint_as_float(cb & 0xffff0000u), h0 * __uint_as_float(cb << 16));
                for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                out = bf16_round(out + bf16_round(bf16_round(d) * scale));
            }
            if (lane == 0) y[cur] = (unsigned short)f32_to_bf16_rne(out);
        }
    }
}

// The LoRA down projection of a few rows, h[m, j] = bf16(sum_k x[m, k] A[j, k]) (bf16 in, f32
// accumulation, as cuBLAS computes x·Aᵀ in the composed form), written part by part where A
// stacks several adapters' A of RP rows each (h [R / RP, M, RP]; RP = R: plain [M, R]): one block of 8 warps per row j of A,
// the warps splitting K, each lane 8 values (one 16-byte load) per step. K % 8 == 0, M <= 8.
extern "C" __global__ void __launch_bounds__(256) lora_down_bf16(const unsigned short* __restrict__ x,
                                                                 const unsigned short* __restrict__ a,
                                                                 unsigned short* __restrict__ h, int M, int R, int K,
                                                                 int RP) {
    __shared__ float part[8][GEMV_MAX_M];
    int j = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float acc[GEMV_MAX_M];
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; m++) acc[m] = 0.0f;
    const unsigned short* ar = a + (size_t)j * K;
    for (int k0 = threadIdx.x * 8; k0 < K; k0 += 256 * 8) {
        uint4 w = *(const uint4*)(ar + k0);
        unsigned int ws[4] = {w.x, w.y, w.z, w.w};
        float av[8];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            av[2 * e] = bf16_to_f32((unsigned short)(ws[e] & 0xffffu));
            av[2 * e + 1] = bf16_to_f32((unsigned short)(ws[e] >> 16));
        }
#pragma unroll
        for (int m = 0; m < GEMV_MAX_M; m++) {
            if (m >= M) break;
            uint4 xv = *(const uint4*)(x + (size_t)m * K + k0);
            unsigned int xs[4] = {xv.x, xv.y, xv.z, xv.w};
            float t = 0.0f;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                t += av[2 * e] * bf16_to_f32((unsigned short)(xs[e] & 0xffffu));
                t += av[2 * e + 1] * bf16_to_f32((unsigned short)(xs[e] >> 16));
            }
            acc[m] += t;
        }
    }
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; m++) {
        if (m >= M) break;
        float v = acc[m];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) part[warp][m] = v;
    }
    __syncthreads();
    if (threadIdx.x >= M) return;
    int m = threadIdx.x;
    float t = 0.0f;
    for (int w = 0; w < 8; w++) t += part[w][m];
    h[(size_t)(j / RP) * M * RP + (size_t)m * RP + j % RP] = (unsigned short)f32_to_bf16_rne(t);
}

// The fused LoRA linear's dropout (src/peft/fused_lora.rs): the same mask as dropout_mask_bf16
// (tests/gpu.rs holds the fused linear with dropout to the composed one), applied in the same
// pass, with the same bf16 rounding as the composed mask-then-multiply. The draw's top 24 bits k
// give u = k / 2^24 exactly, so u >= p is k >= ceil(p * 2^24), also exact (p * 2^24 and its
// ceiling are representable): an integer compare instead of a 64-bit integer to float conversion
// per element.
__device__ __forceinline__ unsigned int keep_threshold(float p) {
    return p <= 0.0f ? 0u : (p >= 1.0f ? (1u << 24) : (unsigned int)ceilf(p * 16777216.0f));
}
__device__ __forceinline__ float dropout_factor(unsigned long long seed, unsigned long long i, float p, float scale) {
    unsigned long long r = splitmix64(seed + (i + 1ull) * 0x9E3779B97F4A7C15ull);
    return ((unsigned int)(r >> 40) >= keep_threshold(p)) ? bf16_to_f32((unsigned short)f32_to_bf16_rne(scale)) : 0.0f;
}
// out = x * mask
extern "C" __global__ void dropout_apply_bf16(unsigned short* __restrict__ out, const unsigned short* __restrict__ x,
                                              unsigned long long seed, unsigned long long n, float p, float scale) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = (unsigned short)f32_to_bf16_rne(bf16_to_f32(x[i]) * dropout_factor(seed, i, p, scale));
}
// The same two kernels eight elements per thread (16-byte loads and stores), for n % 8 == 0 and
// 16-byte aligned buffers: the splitmix64 input seed + (i + 1)·golden steps by golden from one
// element to the next, so the masks are those of the one-element kernels bit for bit.
// -> the mask's bits (bit e: element i0 + e kept)
__device__ __forceinline__ unsigned int dropout_factors8(unsigned long long seed, unsigned long long i0, float p,
                                                         float keep, float* f) {
    unsigned long long z = seed + (i0 + 1ull) * 0x9E3779B97F4A7C15ull;
    const unsigned int thr = keep_threshold(p);
    unsigned int bits = 0;
#pragma unroll
    for (int e = 0; e < 8; e++) {
        unsigned long long r = splitmix64(z);
        unsigned int k = ((unsigned int)(r >> 40) >= thr) ? 1u : 0u;
        f[e] = k ? keep : 0.0f;
        bits |= k << e;
        z += 0x9E3779B97F4A7C15ull;
    }
    return bits;
}
__device__ __forceinline__ void factors_from_bits8(unsigned int bits, float keep, float* f) {
#pragma unroll
    for (int e = 0; e < 8; e++) f[e] = ((bits >> e) & 1u) ? keep : 0.0f;
}
__device__ __forceinline__ float kept_scale(float scale) { return bf16_to_f32((unsigned short)f32_to_bf16_rne(scale)); }
// x * mask, eight elements
__device__ __forceinline__ uint4 apply8(uint4 v, const float* f) {
    unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int e = 0; e < 4; e++) {
        w[e] = bf16x2_rne(bf16_to_f32((unsigned short)(w[e] & 0xffffu)) * f[2 * e],
                          bf16_to_f32((unsigned short)(w[e] >> 16)) * f[2 * e + 1]);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}
// acc + t * mask, eight elements (the product rounded to bf16 first)
__device__ __forceinline__ uint4 accumulate8(uint4 av, uint4 tv, const float* f) {
    unsigned int tw[4] = {tv.x, tv.y, tv.z, tv.w}, aw[4] = {av.x, av.y, av.z, av.w};
#pragma unroll
    for (int e = 0; e < 4; e++) {
        unsigned int r2[2];
#pragma unroll
        for (int hsel = 0; hsel < 2; hsel++) {
            unsigned short tb = (unsigned short)(hsel ? (tw[e] >> 16) : (tw[e] & 0xffffu));
            unsigned short ab = (unsigned short)(hsel ? (aw[e] >> 16) : (aw[e] & 0xffffu));
            float prod = bf16_to_f32((unsigned short)f32_to_bf16_rne(bf16_to_f32(tb) * f[2 * e + hsel]));
            r2[hsel] = f32_to_bf16_rne(bf16_to_f32(ab) + prod);
        }
        aw[e] = r2[0] | (r2[1] << 16);
    }
    return make_uint4(aw[0], aw[1], aw[2], aw[3]);
}
extern "C" __global__ void dropout_apply_bf16_x8(uint4* __restrict__ out, const uint4* __restrict__ x,
                                                 unsigned long long seed, unsigned long long n8, float p, float scale) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    float f[8];
    dropout_factors8(seed, 8ull * i, p, kept_scale(scale), f);
    out[i] = apply8(x[i], f);
}
extern "C" __global__ void dropout_accumulate_bf16_x8(uint4* __restrict__ acc, const uint4* __restrict__ t,
                                                      unsigned long long seed, unsigned long long n8, float p,
                                                      float scale) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    float f[8];
    dropout_factors8(seed, 8ull * i, p, kept_scale(scale), f);
    acc[i] = accumulate8(acc[i], t[i], f);
}
// The mask drawn once, kept as bits for the backward (byte i: elements 8i..8i+7): drawing it costs
// about twice the memory time of applying it (the 64-bit hash per element), and the backward
// needs it twice (drop(x) for dA, the mask on dX's rank-r term).
extern "C" __global__ void dropout_apply_keep_bits_bf16_x8(uint4* __restrict__ out, const uint4* __restrict__ x,
                                                           unsigned char* __restrict__ bits, unsigned long long seed,
                                                           unsigned long long n8, float p, float scale) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    float f[8];
    bits[i] = (unsigned char)dropout_factors8(seed, 8ull * i, p, kept_scale(scale), f);
    out[i] = apply8(x[i], f);
}
extern "C" __global__ void dropout_bits_apply_bf16_x8(uint4* __restrict__ out, const uint4* __restrict__ x,
                                                      const unsigned char* __restrict__ bits, unsigned long long n8,
                                                      float scale) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    float f[8];
    factors_from_bits8(bits[i], kept_scale(scale), f);
    out[i] = apply8(x[i], f);
}
extern "C" __global__ void dropout_bits_accumulate_bf16_x8(uint4* __restrict__ acc, const uint4* __restrict__ t,
                                                           const unsigned char* __restrict__ bits,
                                                           unsigned long long n8, float scale) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    float f[8];
    factors_from_bits8(bits[i], kept_scale(scale), f);
    acc[i] = accumulate8(acc[i], t[i], f);
}
// acc += t * mask (the product rounded to bf16 first, as the composed backward does)
extern "C" __global__ void dropout_accumulate_bf16(unsigned short* __restrict__ acc,
                                                   const unsigned short* __restrict__ t, unsigned long long seed,
                                                   unsigned long long n, float p, float scale) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float prod = bf16_to_f32((unsigned short)f32_to_bf16_rne(bf16_to_f32(t[i]) * dropout_factor(seed, i, p, scale)));
    acc[i] = (unsigned short)f32_to_bf16_rne(bf16_to_f32(acc[i]) + prod);
}
