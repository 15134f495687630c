// The optimizer step over every trainable tensor at once (the idea of PyTorch's fused AdamW and
// multi_tensor_apply): the tensors stay where they are and the kernels get a table of their
// pointers, so one launch covers all of them instead of ~15 small ops per tensor.
//
// table layout (u64): [params n][grads n][exp_avg n][exp_avg_sq n][work n][grad_is_bf16 n][offsets n+1]
// offsets are the prefix sums of the tensors' element counts (offsets[n] = total). Params and
// moments are f32; a gradient is f32 or bf16 (widened exactly); work, where not 0, is the bf16
// working copy of the parameter that the forward reads, rewritten from the updated f32 value. Sums are taken in a fixed order (block partials, then one block), so the gradient norm
// and every update are the same from run to run: a resumed run stays bit for bit.

#define THREADS 256
#define OFFSETS(table, n) ((table) + 6 * (n))

__device__ __forceinline__ float grad_at(const unsigned long long* table, unsigned int n, unsigned int t,
                                         unsigned long long j) {
    const unsigned long long g = table[n + t];
    if (table[5 * n + t]) return __uint_as_float(((unsigned int)((const unsigned short*)g)[j]) << 16);
    return ((const float*)g)[j];
}

// f32 -> bf16, round to nearest even, NaN kept a NaN (as candle's to_dtype does it).
__device__ __forceinline__ unsigned short to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// The tensor that holds element i, walking on from t, a tensor at or before it: a thread's
// grid-stride elements only increase, so each thread walks the offsets once in all (a binary
// search per element cost more than the update itself).
__device__ __forceinline__ unsigned int tensor_from(const unsigned long long* offsets, unsigned int t,
                                                    unsigned long long i) {
    while (offsets[t + 1] <= i) t++;  // offsets[t] <= i < offsets[t + 1]; skips empty tensors
    return t;
}

__device__ float block_sum(float v) {
    __shared__ float shared[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = (threadIdx.x < warps) ? shared[threadIdx.x] : 0.0f;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;  // valid in thread 0
}

// partials[blockIdx.x] = sum of g^2 over this block's grid-stride share of all gradients.
extern "C" __global__ void multi_sumsq_f32(const unsigned long long* table, unsigned int n, float* partials) {
    const unsigned long long* offsets = OFFSETS(table, n);
    unsigned long long total = offsets[n];
    float acc = 0.0f;
    unsigned int t = 0;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        t = tensor_from(offsets, t, i);
        float g = grad_at(table, n, t, i - offsets[t]);
        acc += g * g;
    }
    float s = block_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// One block: out[0] = sqrt(sum of partials) (the global L2 norm), out[1] = the clipping factor
// min(1, max_norm / (norm + 1e-6)) as torch's clip_grad_norm_ computes it.
extern "C" __global__ void multi_norm_finish_f32(const float* partials, unsigned int blocks, float max_norm, float* out) {
    float acc = 0.0f;
    for (unsigned int i = threadIdx.x; i < blocks; i += blockDim.x) acc += partials[i];
    float s = block_sum(acc);
    if (threadIdx.x == 0) {
        float norm = sqrtf(s);
        float coef = max_norm / (norm + 1e-6f);
        out[0] = norm;
        out[1] = coef < 1.0f ? coef : 1.0f;
    }
}

// AdamW on every tensor, in the composed path's order of operations:
//   g *= clip;  m = m*b1 + g*(1-b1);  v = v*b2 + g^2*(1-b2);
//   theta = theta*(1 - lr*wd) - lr * (m/bc1) / (sqrt(v/bc2) + eps)
// where, as candle's scalar ops do, x/bc is computed as x * (1/bc) with 1/bc rounded to f32.
extern "C" __global__ void multi_adamw_f32(const unsigned long long* table, unsigned int n, const float* norm_and_clip,
                                           float lr, float beta1, float one_minus_beta1, float beta2,
                                           float one_minus_beta2, float eps, float decay, float inv_bc1,
                                           float inv_bc2) {
    const unsigned long long* params = table;
    const unsigned long long* ms = table + 2 * n;
    const unsigned long long* vs = table + 3 * n;
    const unsigned long long* works = table + 4 * n;
    const unsigned long long* offsets = OFFSETS(table, n);
    unsigned long long total = offsets[n];
    float clip = norm_and_clip[1];
    unsigned int t = 0;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        t = tensor_from(offsets, t, i);
        unsigned long long j = i - offsets[t];
        float g = grad_at(table, n, t, j);
        if (clip < 1.0f) g = g * clip;
        float* m = (float*)ms[t];
        float* v = (float*)vs[t];
        float* p = (float*)params[t];
        float mj = m[j] * beta1 + g * one_minus_beta1;
        float vj = v[j] * beta2 + (g * g) * one_minus_beta2;
        m[j] = mj;
        v[j] = vj;
        float update = (mj * inv_bc1) / (sqrtf(vj * inv_bc2) + eps);
        float theta = p[j];
        if (decay != 1.0f) theta = theta * decay;
        float updated = theta - update * lr;
        p[j] = updated;
        if (works[t]) ((unsigned short*)works[t])[j] = to_bf16(updated);
    }
}

// Gradient accumulation over micro-batches, every tensor in one launch:
//   acc = first ? widen(g) : acc + widen(g)   (first: the tensor's first gradient of the step)
// table layout (u64): [acc n][grads n][grad_is_bf16 n][first n][offsets n+1]; acc is f32.
extern "C" __global__ void multi_accumulate_f32(const unsigned long long* table, unsigned int n) {
    const unsigned long long* accs = table;
    const unsigned long long* grads = table + n;
    const unsigned long long* bf16 = table + 2 * n;
    const unsigned long long* firsts = table + 3 * n;
    const unsigned long long* offsets = table + 4 * n;
    unsigned long long total = offsets[n];
    unsigned int t = 0;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        t = tensor_from(offsets, t, i);
        unsigned long long j = i - offsets[t];
        float g = bf16[t] ? __uint_as_float(((unsigned int)((const unsigned short*)grads[t])[j]) << 16)
                          : ((const float*)grads[t])[j];
        float* acc = (float*)accs[t];
        acc[j] = firsts[t] ? g : acc[j] + g;
    }
}
