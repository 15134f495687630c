// Gemma RMSNorm with a frozen (1 + w) scale, all arithmetic in f32: forward
//   y = x * rsqrt(mean(x^2) + eps) * scale
// and the input gradient (the scale is frozen, so no weight gradient)
//   dx = r * (g * scale - xhat * mean(g * scale * xhat)),  r = rsqrt(mean(x^2) + eps), xhat = x * r.
// One block per row. Header-free (bf16 handled by hand) so plain nvcc --ptx builds it.

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ void from_f(float v, float* out) { *out = v; }
__device__ __forceinline__ void from_f(float f, unsigned short* out) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) { *out = 0x7fc0u; return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    *out = (unsigned short)(u >> 16);
}

// Sum over the block; every thread gets the result. blockDim.x is a multiple of 32, <= 1024.
__device__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = (threadIdx.x < warps) ? shared[threadIdx.x] : 0.0f;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    float total = shared[0];
    __syncthreads();
    return total;
}

// Rows of up to RN_VALS * blockDim.x values load all their inputs into registers first, every
// load in flight at once; a strided loop whose loads sit behind the previous column's store issues
// them one memory latency at a time. Each thread still sums columns tid, tid + blockDim.x, ... in
// that order, so both forms give the same bits.
#define RN_VALS 12

template <typename T>
__device__ void rmsnorm_fwd(const T* __restrict__ x, const float* __restrict__ scale, T* __restrict__ y, int cols, float eps) {
    __shared__ float shared[32];
    const T* xr = x + (size_t)blockIdx.x * cols;
    T* yr = y + (size_t)blockIdx.x * cols;
    if (cols <= RN_VALS * (int)blockDim.x) {
        float v[RN_VALS], s[RN_VALS];
        float ss = 0.0f;
#pragma unroll
        for (int i = 0; i < RN_VALS; i++) {
            int c = threadIdx.x + i * blockDim.x;
            v[i] = c < cols ? to_f(xr[c]) : 0.0f;
            s[i] = c < cols ? scale[c] : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < RN_VALS; i++)
            if (threadIdx.x + i * blockDim.x < cols) ss += v[i] * v[i];
        float r = rsqrtf(block_sum(ss, shared) / cols + eps);
#pragma unroll
        for (int i = 0; i < RN_VALS; i++) {
            int c = threadIdx.x + i * blockDim.x;
            if (c < cols) from_f(v[i] * r * s[i], &yr[c]);
        }
        return;
    }
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) { float v = to_f(xr[c]); ss += v * v; }
    float r = rsqrtf(block_sum(ss, shared) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) from_f(to_f(xr[c]) * r * scale[c], &yr[c]);
}

template <typename T>
__device__ void rmsnorm_bwd(const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ scale,
                            T* __restrict__ dx, int cols, float eps) {
    __shared__ float shared[32];
    const T* xr = x + (size_t)blockIdx.x * cols;
    const T* gr = g + (size_t)blockIdx.x * cols;
    T* dr = dx + (size_t)blockIdx.x * cols;
    if (cols <= RN_VALS * (int)blockDim.x) {
        float xv[RN_VALS], gs[RN_VALS];
#pragma unroll
        for (int i = 0; i < RN_VALS; i++) {
            int c = threadIdx.x + i * blockDim.x;
            xv[i] = c < cols ? to_f(xr[c]) : 0.0f;
            gs[i] = c < cols ? to_f(gr[c]) * scale[c] : 0.0f;
        }
        float ss = 0.0f;
#pragma unroll
        for (int i = 0; i < RN_VALS; i++)
            if (threadIdx.x + i * blockDim.x < cols) ss += xv[i] * xv[i];
        float r = rsqrtf(block_sum(ss, shared) / cols + eps);
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < RN_VALS; i++)
            if (threadIdx.x + i * blockDim.x < cols) dot += gs[i] * xv[i] * r;
        float m = block_sum(dot, shared) / cols;
#pragma unroll
        for (int i = 0; i < RN_VALS; i++) {
            int c = threadIdx.x + i * blockDim.x;
            if (c < cols) from_f(r * (gs[i] - xv[i] * r * m), &dr[c]);
        }
        return;
    }
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) { float v = to_f(xr[c]); ss += v * v; }
    float r = rsqrtf(block_sum(ss, shared) / cols + eps);
    float dot = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dot += to_f(gr[c]) * scale[c] * to_f(xr[c]) * r;
    float m = block_sum(dot, shared) / cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float xh = to_f(xr[c]) * r;
        from_f(r * (to_f(gr[c]) * scale[c] - xh * m), &dr[c]);
    }
}

extern "C" __global__ void rmsnorm_fwd_f32(const float* x, const float* s, float* y, int cols, float eps) { rmsnorm_fwd(x, s, y, cols, eps); }
extern "C" __global__ void rmsnorm_fwd_bf16(const unsigned short* x, const float* s, unsigned short* y, int cols, float eps) { rmsnorm_fwd(x, s, y, cols, eps); }
extern "C" __global__ void rmsnorm_bwd_f32(const float* x, const float* g, const float* s, float* dx, int cols, float eps) { rmsnorm_bwd(x, g, s, dx, cols, eps); }
extern "C" __global__ void rmsnorm_bwd_bf16(const unsigned short* x, const unsigned short* g, const float* s, unsigned short* dx, int cols, float eps) { rmsnorm_bwd(x, g, s, dx, cols, eps); }

// Answering's residual step: out_x = x + rmsnorm(h) * s1 (the norm rounded to bf16, then the
// sum), and with s2 also out_h = rmsnorm(out_x) * s2, the next norm of the same row: one launch
// where the composed form takes three, rounded as it rounds (rmsnorm_fwd's reduction, 256 threads).
// A decode row is one block, so latency is all it costs: rows of up to AR_VALS * blockDim.x values
// load h, x and both scales into registers at once (the scales are cold in L2 by then: the weights
// stream through it), and each thread still sums columns tid, tid + blockDim.x, ... in that order.
// Loaded inside the loops instead, the stores between them kept the next loads from issuing early
// and a row took ~12 us, one memory latency per column step.
#define AR_VALS 12

__device__ __forceinline__ void add_rmsnorm_regs(const unsigned short* __restrict__ xr, const unsigned short* __restrict__ hr,
                                                 const float* __restrict__ s1, const float* __restrict__ s2,
                                                 unsigned short* __restrict__ ox, unsigned short* __restrict__ oh,
                                                 int cols, float eps, float* shared) {
    float hv[AR_VALS], xv[AR_VALS], a[AR_VALS], b[AR_VALS];
#pragma unroll
    for (int i = 0; i < AR_VALS; i++) {
        int c = threadIdx.x + i * blockDim.x;
        bool in = c < cols;
        hv[i] = in ? to_f(hr[c]) : 0.0f;
        xv[i] = in ? to_f(xr[c]) : 0.0f;
        a[i] = in ? s1[c] : 0.0f;
        b[i] = in && s2 != 0 ? s2[c] : 0.0f;
    }
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < AR_VALS; i++)
        if (threadIdx.x + i * blockDim.x < cols) ss += hv[i] * hv[i];
    float r = rsqrtf(block_sum(ss, shared) / cols + eps);
    float ss2 = 0.0f;
#pragma unroll
    for (int i = 0; i < AR_VALS; i++) {
        int c = threadIdx.x + i * blockDim.x;
        if (c < cols) {
            unsigned short n, o;
            from_f(hv[i] * r * a[i], &n);
            from_f(xv[i] + to_f(n), &o);
            ox[c] = o;
            xv[i] = to_f(o);
            ss2 += xv[i] * xv[i];
        }
    }
    if (s2 == 0) return;
    float r2 = rsqrtf(block_sum(ss2, shared) / cols + eps);
#pragma unroll
    for (int i = 0; i < AR_VALS; i++) {
        int c = threadIdx.x + i * blockDim.x;
        if (c < cols) from_f(xv[i] * r2 * b[i], &oh[c]);
    }
}

extern "C" __global__ void add_rmsnorm_bf16(const unsigned short* __restrict__ x, const unsigned short* __restrict__ h,
                                            const float* __restrict__ s1, const float* __restrict__ s2,
                                            unsigned short* __restrict__ out, int rows, int cols, float eps) {
    __shared__ float shared[32];
    const unsigned short* xr = x + (size_t)blockIdx.x * cols;
    const unsigned short* hr = h + (size_t)blockIdx.x * cols;
    unsigned short* ox = out + (size_t)blockIdx.x * cols;
    unsigned short* oh = out + ((size_t)rows + blockIdx.x) * cols;
    if (cols <= AR_VALS * (int)blockDim.x) {
        add_rmsnorm_regs(xr, hr, s1, s2, ox, oh, cols, eps, shared);
        return;
    }
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) { float v = to_f(hr[c]); ss += v * v; }
    float r = rsqrtf(block_sum(ss, shared) / cols + eps);
    float ss2 = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        unsigned short n, o;
        from_f(to_f(hr[c]) * r * s1[c], &n);
        from_f(to_f(xr[c]) + to_f(n), &o);
        ox[c] = o;
        float v = to_f(o);
        ss2 += v * v;
    }
    if (s2 == 0) return;
    float r2 = rsqrtf(block_sum(ss2, shared) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) from_f(to_f(ox[c]) * r2 * s2[c], &oh[c]);
}

// Gemma's q/k RMSNorm followed by RoPE (rotate_half), for bf16 rows of one head: x [B, L, H, D]
// in, out [B, H, L, D]. The forward rounds where the composed path does (the norm's output, each
// product with the bf16 cos/sin tables, the sum). cos/sin are
// the f32 tables [L, D/2], rounded to bf16 here as the composed path casts them. One block per
// (b, l, h) row, D <= 2048.
__device__ __forceinline__ float bf(float v) { unsigned short h; from_f(v, &h); return to_f(h); }

extern "C" __global__ void qknorm_rope_fwd_bf16(const unsigned short* x, const float* scale, const float* cos_t,
                                                const float* sin_t, unsigned short* out, int heads, int len,
                                                int cols, float eps) {
    __shared__ float shared[32];
    int row = blockIdx.x, h = row % heads, l = (row / heads) % len, b = row / (heads * len);
    const unsigned short* xr = x + (size_t)row * cols;
    unsigned short* o = out + (((size_t)b * heads + h) * len + l) * cols;
    int half = cols / 2;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) { float v = to_f(xr[c]); ss += v * v; }
    float r = rsqrtf(block_sum(ss, shared) / cols + eps);
    for (int c = threadIdx.x; c < half; c += blockDim.x) {
        float n1 = bf(to_f(xr[c]) * r * scale[c]), n2 = bf(to_f(xr[c + half]) * r * scale[c + half]);
        float cs = bf(cos_t[(size_t)l * half + c]), sn = bf(sin_t[(size_t)l * half + c]);
        from_f(bf(n1 * cs) - bf(n2 * sn), &o[c]);
        from_f(bf(n2 * cs) + bf(n1 * sn), &o[c + half]);
    }
}

// Its input gradient: the inverse rotation of g (f32), then the RMSNorm backward as above.
extern "C" __global__ void qknorm_rope_bwd_bf16(const unsigned short* x, const unsigned short* g, const float* scale,
                                                const float* cos_t, const float* sin_t, unsigned short* dx,
                                                int heads, int len, int cols, float eps) {
    __shared__ float shared[32];
    __shared__ float dn[2048];
    int row = blockIdx.x, h = row % heads, l = (row / heads) % len, b = row / (heads * len);
    const unsigned short* xr = x + (size_t)row * cols;
    const unsigned short* gr = g + (((size_t)b * heads + h) * len + l) * cols;
    unsigned short* dr = dx + (size_t)row * cols;
    int half = cols / 2;
    for (int c = threadIdx.x; c < half; c += blockDim.x) {
        float cs = bf(cos_t[(size_t)l * half + c]), sn = bf(sin_t[(size_t)l * half + c]);
        float ga = to_f(gr[c]), gb = to_f(gr[c + half]);
        dn[c] = ga * cs + gb * sn;
        dn[c + half] = gb * cs - ga * sn;
    }
    __syncthreads();
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) { float v = to_f(xr[c]); ss += v * v; }
    float r = rsqrtf(block_sum(ss, shared) / cols + eps);
    float dot = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dot += dn[c] * scale[c] * to_f(xr[c]) * r;
    float m = block_sum(dot, shared) / cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float xh = to_f(xr[c]) * r;
        from_f(r * (dn[c] * scale[c] - xh * m), &dr[c]);
    }
}

// The same two kernels with one warp per (b, l, h) row, for rows of at most 256 values (head_dim
// 256 on the 4B): eight rows per block of 256 threads instead of one, and no block barriers; the
// one-row-per-block kernels spent most of their time in the barriers of 256-value rows (77 us for
// 32k rows of q on an H200, 0.4 TB/s). Lane j holds columns j, j + 32, ... (slot s = column / 32),
// which in those kernels belong to thread 32s + j, alone in its column: each slot sums across
// the warp with block_sum's butterfly, and the eight warp sums combine in the order block_sum's
// last step adds them, so the bits are the same.
__device__ __forceinline__ float warp_tree(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float eight_sums(const float* w) {
    return ((w[0] + w[4]) + (w[2] + w[6])) + ((w[1] + w[5]) + (w[3] + w[7]));
}

extern "C" __global__ void qknorm_rope_fwd_bf16_warp(const unsigned short* __restrict__ x, const float* __restrict__ scale,
                                                     const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                                     unsigned short* __restrict__ out, int heads, int len, int cols,
                                                     float eps, int rows) {
    int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    int h = row % heads, l = (row / heads) % len, b = row / (heads * len);
    const unsigned short* xr = x + (size_t)row * cols;
    unsigned short* o = out + (((size_t)b * heads + h) * len + l) * cols;
    int half = cols / 2;
    float w[8];
#pragma unroll
    for (int s = 0; s < 8; s++) {
        int c = 32 * s + lane;
        float v = c < cols ? to_f(xr[c]) : 0.0f;
        w[s] = warp_tree(v * v);
    }
    float r = rsqrtf(eight_sums(w) / cols + eps);
    for (int c = lane; c < half; c += 32) {
        float n1 = bf(to_f(xr[c]) * r * scale[c]), n2 = bf(to_f(xr[c + half]) * r * scale[c + half]);
        float cs = bf(cos_t[(size_t)l * half + c]), sn = bf(sin_t[(size_t)l * half + c]);
        from_f(bf(n1 * cs) - bf(n2 * sn), &o[c]);
        from_f(bf(n2 * cs) + bf(n1 * sn), &o[c + half]);
    }
}

extern "C" __global__ void qknorm_rope_bwd_bf16_warp(const unsigned short* __restrict__ x, const unsigned short* __restrict__ g,
                                                     const float* __restrict__ scale, const float* __restrict__ cos_t,
                                                     const float* __restrict__ sin_t, unsigned short* __restrict__ dx,
                                                     int heads, int len, int cols, float eps, int rows) {
    int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    int h = row % heads, l = (row / heads) % len, b = row / (heads * len);
    const unsigned short* xr = x + (size_t)row * cols;
    const unsigned short* gr = g + (((size_t)b * heads + h) * len + l) * cols;
    unsigned short* dr = dx + (size_t)row * cols;
    int half = cols / 2;
    float dn[8], xv[8], sc[8], w[8];
#pragma unroll
    for (int s = 0; s < 8; s++) {
        int c = 32 * s + lane;
        dn[s] = 0.0f;
        xv[s] = 0.0f;
        sc[s] = 0.0f;
        if (c < cols) {
            int p = c < half ? c : c - half;  // the pair's first column
            float cs = bf(cos_t[(size_t)l * half + p]), sn = bf(sin_t[(size_t)l * half + p]);
            float ga = to_f(gr[p]), gb = to_f(gr[p + half]);
            dn[s] = c < half ? ga * cs + gb * sn : gb * cs - ga * sn;
            xv[s] = to_f(xr[c]);
            sc[s] = scale[c];
        }
        w[s] = warp_tree(xv[s] * xv[s]);
    }
    float r = rsqrtf(eight_sums(w) / cols + eps);
#pragma unroll
    for (int s = 0; s < 8; s++) w[s] = warp_tree(32 * s + lane < cols ? dn[s] * sc[s] * xv[s] * r : 0.0f);
    float m = eight_sums(w) / cols;
#pragma unroll
    for (int s = 0; s < 8; s++) {
        int c = 32 * s + lane;
        if (c < cols) {
            float xh = xv[s] * r;
            from_f(r * (dn[s] * sc[s] - xh * m), &dr[c]);
        }
    }
}

// The row norms again, one warp per row for bf16 rows of at most RW_CHUNKS * 256 columns (cols a
// multiple of 8, rows 16-byte aligned): 16-byte loads, every load of the row in flight at once,
// and a butterfly over the lanes instead of two block-wide reductions with their barriers. The
// block-per-row kernels above moved about 1.5-1.8 TB/s on an H200's [4096, 2560] training rows.
// Lane l holds the 8-column chunks l, l + 32, ... and sums them in that order; the butterfly
// leaves every lane the same total (each step adds the same two values, in either order). The
// forward, the residual step and its next norm use the same order, so a chained residual step and
// the separate norm still give the same bits. Different bits from the block kernels: another order.
#define RW_CHUNKS 12

union Bf8 {
    uint4 v;
    unsigned short h[8];
};

__device__ __forceinline__ float warp_total(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ void scale8(const float4* s, int c, float* out) {
    float4 a = s[2 * c], b = s[2 * c + 1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

__device__ __forceinline__ float sumsq8(const Bf8& v, float ss) {
#pragma unroll
    for (int j = 0; j < 8; j++) { float f = to_f(v.h[j]); ss += f * f; }
    return ss;
}

// The row's chunks lane, lane + 32, ... into registers (the arrays stay in registers once inlined).
__device__ __forceinline__ void load_row(const uint4* __restrict__ r, Bf8* v, int lane, int n8) {
#pragma unroll
    for (int i = 0; i < RW_CHUNKS; i++) if (lane + 32 * i < n8) v[i].v = r[lane + 32 * i];
}

// rsqrt(mean(x^2) + eps) of the row held in v.
__device__ __forceinline__ float row_rsqrt(const Bf8* v, int lane, int n8, int cols, float eps) {
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < RW_CHUNKS; i++) if (lane + 32 * i < n8) ss = sumsq8(v[i], ss);
    return rsqrtf(warp_total(ss) / cols + eps);
}

// out = v * r * scale, rounded to bf16.
__device__ __forceinline__ void store_normed(const Bf8* v, float r, const float4* __restrict__ s, uint4* __restrict__ out,
                                             int lane, int n8) {
#pragma unroll
    for (int i = 0; i < RW_CHUNKS; i++) {
        int c = lane + 32 * i;
        if (c >= n8) continue;
        float sc[8];
        scale8(s, c, sc);
        Bf8 o;
#pragma unroll
        for (int j = 0; j < 8; j++) from_f(to_f(v[i].h[j]) * r * sc[j], &o.h[j]);
        out[c] = o.v;
    }
}

extern "C" __global__ void rmsnorm_fwd_bf16_warp(const uint4* __restrict__ x, const float4* __restrict__ s,
                                                 uint4* __restrict__ y, int cols, float eps, int rows) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    int n8 = cols >> 3;
    Bf8 v[RW_CHUNKS];
    load_row(x + (size_t)row * n8, v, lane, n8);
    store_normed(v, row_rsqrt(v, lane, n8, cols, eps), s, y + (size_t)row * n8, lane, n8);
}

extern "C" __global__ void rmsnorm_bwd_bf16_warp(const uint4* __restrict__ x, const uint4* __restrict__ g,
                                                 const float4* __restrict__ s, uint4* __restrict__ dx, int cols,
                                                 float eps, int rows) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    int n8 = cols >> 3;
    uint4* dr = dx + (size_t)row * n8;
    Bf8 xv[RW_CHUNKS], gv[RW_CHUNKS];
    load_row(x + (size_t)row * n8, xv, lane, n8);
    load_row(g + (size_t)row * n8, gv, lane, n8);
    float r = row_rsqrt(xv, lane, n8, cols, eps);
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < RW_CHUNKS; i++) {
        int c = lane + 32 * i;
        if (c >= n8) continue;
        float sc[8];
        scale8(s, c, sc);
#pragma unroll
        for (int j = 0; j < 8; j++) dot += to_f(gv[i].h[j]) * sc[j] * to_f(xv[i].h[j]) * r;
    }
    float m = warp_total(dot) / cols;
#pragma unroll
    for (int i = 0; i < RW_CHUNKS; i++) {
        int c = lane + 32 * i;
        if (c >= n8) continue;
        float sc[8];
        scale8(s, c, sc);
        Bf8 o;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float xf = to_f(xv[i].h[j]);
            from_f(r * (to_f(gv[i].h[j]) * sc[j] - xf * r * m), &o.h[j]);
        }
        dr[c] = o.v;
    }
}

extern "C" __global__ void add_rmsnorm_bf16_warp(const uint4* __restrict__ x, const uint4* __restrict__ h,
                                                 const float4* __restrict__ s1, const float4* __restrict__ s2,
                                                 uint4* __restrict__ out, int rows, int cols, float eps) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    int n8 = cols >> 3;
    uint4* ox = out + (size_t)row * n8;
    Bf8 xv[RW_CHUNKS], hv[RW_CHUNKS];
    load_row(x + (size_t)row * n8, xv, lane, n8);
    load_row(h + (size_t)row * n8, hv, lane, n8);
    float r = row_rsqrt(hv, lane, n8, cols, eps);
#pragma unroll
    for (int i = 0; i < RW_CHUNKS; i++) {
        int c = lane + 32 * i;
        if (c >= n8) continue;
        float sc[8];
        scale8(s1, c, sc);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            unsigned short n;
            from_f(to_f(hv[i].h[j]) * r * sc[j], &n);
            from_f(to_f(xv[i].h[j]) + to_f(n), &xv[i].h[j]);
        }
        ox[c] = xv[i].v;
    }
    if (s2 == 0) return;
    store_normed(xv, row_rsqrt(xv, lane, n8, cols, eps), s2, out + ((size_t)rows + row) * n8, lane, n8);
}
