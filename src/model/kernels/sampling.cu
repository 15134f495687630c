// Temperature / top-k / top-p sampling of one token per row on the device (src/model/device_sampling.rs),
// the choice src/sampling.rs makes on the host: the vocabulary in descending order (ties: the lower
// id first), the top_k largest kept, their softmax at the temperature (f64), the shortest prefix
// whose probability reaches top_p kept, and u picks by the kept tokens' cumulative probabilities.
// Nothing is sorted: the order's positions are found by radix descent on the logits' order-preserving
// 32-bit keys, 8 bits a pass, with counts (top-k) or probability mass (top-p, the draw) per bin, then
// among equal logits by id. One block of ST threads per row; mass histograms are one per warp, each
// bin's lanes summed in lane order, so every sum has a fixed order and a seed gives the same tokens.
// Sums group differently from the host's, so a draw within rounding of a boundary could differ.

#define ST 512
#define WARPS (ST / 32)
#define FULL 0xffffffffu

__device__ __forceinline__ unsigned int key_of(float f) {
    unsigned int b = __float_as_uint(f);
    return b ^ ((b >> 31) ? 0xffffffffu : 0x80000000u);
}
__device__ __forceinline__ float value_of(unsigned int k) {
    return __uint_as_float((k >> 31) ? (k ^ 0x80000000u) : ~k);
}

struct Row {
    const float* logits;
    double* w;  // exp((logit - max) / T) of the kept tokens, 0 elsewhere
    int v;
    bool use_k;
    unsigned int kstar;  // the top_k-th largest key
    int id_cut;          // the largest id kept among keys equal to kstar
    bool use_p;
    unsigned int kp;  // the top-p prefix's last key and id
    int idp;
};

__device__ __forceinline__ bool kept_k(const Row& r, int i, unsigned int key) {
    return !r.use_k || key > r.kstar || (key == r.kstar && i <= r.id_cut);
}
__device__ __forceinline__ bool kept_p(const Row& r, int i, unsigned int key) {
    return kept_k(r, i, key) && (!r.use_p || key > r.kp || (key == r.kp && i <= r.idp));
}
__device__ __forceinline__ bool kept(const Row& r, int level, int i, unsigned int key) {
    return level == 0 ? kept_k(r, i, key) : kept_p(r, i, key);
}

struct Shared {
    double hist[WARPS][256];
    double tot[256];
    unsigned int ctot[256];
    unsigned int cnt[ST];
    double red[WARPS];
    unsigned int word;
    int found;
    unsigned int total_cnt;
};

__device__ double block_sum_d(double v, Shared& sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    if (lane == 0) sh.red[warp] = v;
    __syncthreads();
    double t = 0.0;
    if (threadIdx.x == 0) {
        for (int k = 0; k < WARPS; k++) t += sh.red[k];
        sh.red[0] = t;
    }
    __syncthreads();
    t = sh.red[0];
    __syncthreads();
    return t;
}

// Among ids i with pred(i) (ascending), the n-th (1-based): each thread counts its contiguous
// chunk, the chunks' counts are prefix-summed, and the thread holding the n-th walks its chunk.
// Also leaves the number of such ids in sh.total_cnt.
template <typename P>
__device__ int nth_id(const Row& r, P pred, unsigned int n, Shared& sh) {
    int chunk = (r.v + ST - 1) / ST, lo = threadIdx.x * chunk, hi = min(lo + chunk, r.v);
    unsigned int c = 0;
    for (int i = lo; i < hi; i++) c += pred(i) ? 1u : 0u;
    sh.cnt[threadIdx.x] = c;
    if (threadIdx.x == 0) sh.found = -1;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int acc = 0;
        for (int t = 0; t < ST; t++) {
            unsigned int x = sh.cnt[t];
            sh.cnt[t] = acc;
            acc += x;
        }
        sh.total_cnt = acc;
    }
    __syncthreads();
    unsigned int before = sh.cnt[threadIdx.x];
    if (n > before && n <= before + c) {
        unsigned int j = before;
        for (int i = lo; i < hi; i++) {
            if (pred(i) && ++j == n) {
                sh.found = i;
                break;
            }
        }
    }
    __syncthreads();
    int f = sh.found;
    __syncthreads();
    return f;
}

// The key of the top_k-th largest logit and how many of the logits equal to it are kept.
__device__ void select_kth(const Row& r, unsigned int k, unsigned int* kstar, unsigned int* need, Shared& sh) {
    unsigned int* ch = (unsigned int*)sh.hist;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned int prefix = 0, mask = 0, remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int j = threadIdx.x; j < WARPS * 256; j += ST) ch[j] = 0;
        __syncthreads();
        for (int base = warp * 32; base < r.v; base += ST) {
            int i = base + lane;
            unsigned int key = i < r.v ? key_of(r.logits[i]) : 0;
            unsigned int bin = (i < r.v && (key & mask) == prefix) ? (key >> shift) & 255u : 256u;
            unsigned int g = __match_any_sync(FULL, bin);
            if (bin < 256 && lane == __ffs(g) - 1) ch[warp * 256 + bin] += __popc(g);
        }
        __syncthreads();
        if (threadIdx.x < 256) {
            unsigned int t = 0;
            for (int w = 0; w < WARPS; w++) t += ch[w * 256 + threadIdx.x];
            sh.ctot[threadIdx.x] = t;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned int cum = 0;
            int b = 255;
            for (; b > 0; b--) {
                if (cum + sh.ctot[b] >= remaining) break;
                cum += sh.ctot[b];
            }
            sh.word = prefix | ((unsigned int)b << shift);
            sh.cnt[0] = remaining - cum;
        }
        __syncthreads();
        prefix = sh.word;
        remaining = sh.cnt[0];
        mask |= 0xffu << shift;
        __syncthreads();
    }
    *kstar = prefix;
    *need = remaining;
}

// The first kept token (at `level`) in the order whose cumulative mass passes thr (>= thr, or > thr
// when strict); the last kept token if rounding leaves none. Returns its id; *through is the
// cumulative mass up to and including it.
__device__ int cross(const Row& r, int level, double thr, bool strict, double m, double temp, double* through,
                     Shared& sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned int prefix = 0, mask = 0;
    double above = 0.0;
    bool fallback = false;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int j = threadIdx.x; j < WARPS * 256; j += ST) (&sh.hist[0][0])[j] = 0.0;
        __syncthreads();
        for (int base = warp * 32; base < r.v; base += ST) {
            int i = base + lane;
            unsigned int key = i < r.v ? key_of(r.logits[i]) : 0;
            bool in = i < r.v && (key & mask) == prefix && kept(r, level, i, key);
            unsigned int bin = in ? (key >> shift) & 255u : 256u;
            double wv = in ? r.w[i] : 0.0;
            unsigned int g = __match_any_sync(FULL, bin);
            if (bin < 256) {
                double s = 0.0;
                for (unsigned int mm = g; mm; mm &= mm - 1) s += __shfl_sync(g, wv, __ffs(mm) - 1);
                if (lane == __ffs(g) - 1) sh.hist[warp][bin] += s;
            }
        }
        __syncthreads();
        if (threadIdx.x < 256) {
            double t = 0.0;
            for (int w = 0; w < WARPS; w++) t += sh.hist[w][threadIdx.x];
            sh.tot[threadIdx.x] = t;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int pick = -1, last = -1;
            double before_last = above;
            for (int b = 255; b >= 0; b--) {
                double t = sh.tot[b];
                if (t <= 0.0) continue;
                double next = above + t;
                if (!fallback && (strict ? next > thr : next >= thr)) {
                    pick = b;
                    break;
                }
                before_last = above;
                above = next;
                last = b;
            }
            if (pick < 0) {
                fallback = true;
                pick = last < 0 ? 0 : last;
                above = before_last;
            }
            sh.word = prefix | ((unsigned int)pick << shift);
            sh.red[0] = above;
            sh.cnt[0] = fallback ? 1u : 0u;
        }
        __syncthreads();
        prefix = sh.word;
        above = sh.red[0];
        fallback = sh.cnt[0] != 0;
        mask |= 0xffu << shift;
        __syncthreads();
    }
    // equal logits have equal weights: how many of them it takes, then which id that is
    double wk = exp(((double)value_of(prefix) - m) / temp);
    unsigned int key = prefix;
    auto same = [&](int i) { return key_of(r.logits[i]) == key && kept(r, level, i, key); };
    nth_id(r, same, 0xffffffffu, sh);  // counts them (no id is the 2^32-1-th)
    unsigned int count = sh.total_cnt, n = 1;
    double acc = above + wk;
    if (fallback) {
        n = count;
        acc = above + wk * count;
    } else {
        while (n < count && !(strict ? acc > thr : acc >= thr)) {
            acc += wk;
            n++;
        }
    }
    *through = acc;
    return nth_id(r, same, n, sh);
}

// logits f32 [B, V]; u f64 [B] (negative: the row has finished, it gets `pad`); w f64 [B, V] scratch.
extern "C" __global__ void __launch_bounds__(ST) sample_rows(const float* logits, const double* u, double* w,
                                                            unsigned int* out, int v, double temp, int top_k,
                                                            double top_p, unsigned int pad) {
    __shared__ Shared sh;
    int row = blockIdx.x;
    double ur = u[row];
    if (ur < 0.0) {
        if (threadIdx.x == 0) out[row] = pad;
        return;
    }
    Row r;
    r.logits = logits + (size_t)row * v;
    r.w = w + (size_t)row * v;
    r.v = v;
    r.use_k = top_k > 0 && top_k < v;
    r.kstar = 0;
    r.id_cut = v;
    r.use_p = false;
    r.kp = 0;
    r.idp = v;
    // the largest logit (NaN aside, as f32::max folds), always kept
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < v; i += ST) mx = fmaxf(mx, r.logits[i]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, o));
    if ((threadIdx.x & 31) == 0) sh.red[threadIdx.x >> 5] = (double)mx;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = -INFINITY;
        for (int k = 0; k < WARPS; k++) t = fmax(t, sh.red[k]);
        sh.red[0] = t;
    }
    __syncthreads();
    double m = sh.red[0];
    __syncthreads();
    if (r.use_k) {
        unsigned int kstar, need;
        select_kth(r, (unsigned int)top_k, &kstar, &need, sh);
        auto same = [&](int i) { return key_of(r.logits[i]) == kstar; };
        r.id_cut = nth_id(r, same, need, sh);
        r.kstar = kstar;
    }
    double part = 0.0;
    for (int i = threadIdx.x; i < v; i += ST) {
        unsigned int key = key_of(r.logits[i]);
        double x = kept_k(r, i, key) ? exp(((double)r.logits[i] - m) / temp) : 0.0;
        r.w[i] = x;
        part += x;
    }
    __syncthreads();
    double total = block_sum_d(part, sh);
    double mass = total;
    if (top_p < 1.0) {
        int idp = cross(r, 0, top_p * total, false, m, temp, &mass, sh);
        r.kp = key_of(r.logits[idp]);
        r.idp = idp;
        r.use_p = true;
    }
    double through;
    int id = cross(r, 1, ur * mass, true, m, temp, &through, sh);
    if (threadIdx.x == 0) out[row] = (unsigned int)id;
}
