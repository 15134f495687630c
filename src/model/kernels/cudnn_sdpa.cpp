// cuDNN fused scaled-dot-product attention (forward with log-sum-exp statistics, deterministic
// backward) behind a small C API for src/model/cudnn_attention.rs. Built with the cuDNN C++
// frontend in dynamic-loading mode: nothing here links libcudnn or libcudart; gc_cudnn_init opens
// libcudnn.so.9 at run time, so a binary without it still starts and falls back to composed
// attention. The traps it avoids: the deterministic backward (the default one is not bitwise
// repeatable), 16-byte aligned strides, Stats packed in B,H,S order, known-bad 9.10.0/9.10.1.

#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <cudnn_frontend.h>

namespace cudnn_frontend {
// The frontend's dynamic loader resolves every cuDNN symbol through this handle.
void *cudnn_dlhandle = nullptr;
}  // namespace cudnn_frontend

namespace fe = cudnn_frontend;

extern "C" {
// One attention call. Strides are in elements, in {B, H, S, D} order for every tensor; query head
// h uses key/value head h / (hq / hkv).
struct gc_sdpa_desc {
    int64_t b, hq, hkv, sq, skv, d;
    // q, k, v, o, then (backward) do, dq, dk, dv
    int64_t stride[8][4];
    // with causal: 0 for no window; else query i sees key j iff i - j < window
    int64_t window;
    // 1: query i sees keys j <= i (top-left aligned); 0: every key (CLIP's encoder)
    int32_t causal;
    // right padding: seq_lens (int32 [B]) holds each row's valid length
    int32_t padded;
    // forward: also write Stats (f32 [B, Hq, Sq, 1], packed) for the backward
    int32_t stats;
    float scale;
};
}

namespace {

enum Uid : int64_t { Q = 1, K, V, O, STATS, DO, DQ, DK, DV, SCALE, SEQ_Q, SEQ_KV };

std::mutex g_mutex;
cudnnHandle_t g_handle = nullptr;
using Key = std::vector<int64_t>;
std::map<Key, std::shared_ptr<fe::graph::Graph>> g_fwd, g_bwd;

void set_err(char *err, int len, const std::string &msg) {
    if (err && len > 0) {
        std::snprintf(err, static_cast<size_t>(len), "%s", msg.c_str());
    }
}

Key key_of(const gc_sdpa_desc &d, int64_t n_strides) {
    Key k = {d.b, d.hq, d.hkv, d.sq, d.skv, d.d, d.window, d.causal, d.padded, d.stats};
    for (int64_t t = 0; t < n_strides; t++) {
        for (int j = 0; j < 4; j++) k.push_back(d.stride[t][j]);
    }
    return k;
}

std::vector<int64_t> dims(const gc_sdpa_desc &d, int64_t h, int64_t s) { return {d.b, h, s, d.d}; }
std::vector<int64_t> strides(const gc_sdpa_desc &d, int t) {
    return {d.stride[t][0], d.stride[t][1], d.stride[t][2], d.stride[t][3]};
}

std::shared_ptr<fe::graph::Tensor_attributes> input(fe::graph::Graph &g, const char *name, Uid uid,
                                                     std::vector<int64_t> dim, std::vector<int64_t> stride) {
    return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(dim).set_stride(stride));
}

std::shared_ptr<fe::graph::Graph> new_graph() {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    return g;
}

std::shared_ptr<fe::graph::Tensor_attributes> scale_tensor(fe::graph::Graph &g) {
    return g.tensor(fe::graph::Tensor_attributes()
                        .set_name("attn_scale")
                        .set_uid(SCALE)
                        .set_dim({1, 1, 1, 1})
                        .set_stride({1, 1, 1, 1})
                        .set_is_pass_by_value(true)
                        .set_data_type(fe::DataType_t::FLOAT));
}

std::shared_ptr<fe::graph::Tensor_attributes> seq_tensor(fe::graph::Graph &g, const char *name, Uid uid,
                                                         int64_t b) {
    return g.tensor(fe::graph::Tensor_attributes()
                        .set_name(name)
                        .set_uid(uid)
                        .set_dim({b, 1, 1, 1})
                        .set_stride({1, 1, 1, 1})
                        .set_data_type(fe::DataType_t::INT32));
}

// Causal (top-left aligned) with an optional window, optional right padding: the same attributes
// on the forward and the backward.
template <typename A>
void set_mask(A &attrs, fe::graph::Graph &g, const gc_sdpa_desc &d) {
    if (d.causal) {
        attrs.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT).set_diagonal_band_right_bound(0);
        if (d.window > 0) attrs.set_diagonal_band_left_bound(static_cast<int>(d.window));
    }
    if (d.padded) {
        attrs.set_padding_mask(true)
            .set_seq_len_q(seq_tensor(g, "seq_q", SEQ_Q, d.b))
            .set_seq_len_kv(seq_tensor(g, "seq_kv", SEQ_KV, d.b));
    }
}

std::string build(fe::graph::Graph &g) {
    auto st = g.validate();
    if (st.is_good()) st = g.build_operation_graph(g_handle);
    if (st.is_good()) st = g.create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK});
    if (st.is_good()) st = g.check_support(g_handle);
    if (st.is_good()) st = g.build_plans(g_handle);
    return st.is_good() ? std::string() : st.get_message();
}

std::shared_ptr<fe::graph::Graph> fwd_graph(const gc_sdpa_desc &d, std::string &err) {
    Key key = key_of(d, 4);
    auto it = g_fwd.find(key);
    if (it != g_fwd.end()) return it->second;
    auto g = new_graph();
    auto q = input(*g, "Q", Q, dims(d, d.hq, d.sq), strides(d, 0));
    auto k = input(*g, "K", K, dims(d, d.hkv, d.skv), strides(d, 1));
    auto v = input(*g, "V", V, dims(d, d.hkv, d.skv), strides(d, 2));
    auto attrs = fe::graph::SDPA_attributes().set_name("sdpa").set_generate_stats(d.stats != 0).set_attn_scale(
        scale_tensor(*g));
    set_mask(attrs, *g, d);
    auto [o, stats] = g->sdpa(q, k, v, attrs);
    o->set_output(true).set_uid(O).set_dim(dims(d, d.hq, d.sq)).set_stride(strides(d, 3));
    if (d.stats) {
        stats->set_output(true)
            .set_uid(STATS)
            .set_data_type(fe::DataType_t::FLOAT)
            .set_dim({d.b, d.hq, d.sq, 1})
            .set_stride({d.hq * d.sq, d.sq, 1, 1});
    }
    err = build(*g);
    if (!err.empty()) return nullptr;
    g_fwd.emplace(key, g);
    return g;
}

std::shared_ptr<fe::graph::Graph> bwd_graph(const gc_sdpa_desc &d, std::string &err) {
    Key key = key_of(d, 8);
    auto it = g_bwd.find(key);
    if (it != g_bwd.end()) return it->second;
    auto g = new_graph();
    auto q = input(*g, "Q", Q, dims(d, d.hq, d.sq), strides(d, 0));
    auto k = input(*g, "K", K, dims(d, d.hkv, d.skv), strides(d, 1));
    auto v = input(*g, "V", V, dims(d, d.hkv, d.skv), strides(d, 2));
    auto o = input(*g, "O", O, dims(d, d.hq, d.sq), strides(d, 3));
    auto d_o = input(*g, "dO", DO, dims(d, d.hq, d.sq), strides(d, 4));
    auto stats = g->tensor(fe::graph::Tensor_attributes()
                               .set_name("stats")
                               .set_uid(STATS)
                               .set_dim({d.b, d.hq, d.sq, 1})
                               .set_stride({d.hq * d.sq, d.sq, 1, 1})
                               .set_data_type(fe::DataType_t::FLOAT));
    // Deterministic: resume must replay a run bit for bit.
    auto attrs = fe::graph::SDPA_backward_attributes()
                     .set_name("sdpa_backward")
                     .set_deterministic_algorithm(true)
                     .set_attn_scale(scale_tensor(*g));
    set_mask(attrs, *g, d);
    auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, d_o, stats, attrs);
    dq->set_output(true).set_uid(DQ).set_dim(dims(d, d.hq, d.sq)).set_stride(strides(d, 5));
    dk->set_output(true).set_uid(DK).set_dim(dims(d, d.hkv, d.skv)).set_stride(strides(d, 6));
    dv->set_output(true).set_uid(DV).set_dim(dims(d, d.hkv, d.skv)).set_stride(strides(d, 7));
    err = build(*g);
    if (!err.empty()) return nullptr;
    g_bwd.emplace(key, g);
    return g;
}

// Runs `g` unless the workspace is too small, in which case returns 2 with the size needed.
int execute(fe::graph::Graph &g, std::unordered_map<int64_t, void *> &pack, void *stream, void *ws, int64_t ws_size,
            int64_t *ws_needed, char *err, int errlen) {
    int64_t need = g.get_workspace_size();
    *ws_needed = need;
    if (need > ws_size) return 2;
    auto st = fe::detail::set_stream(g_handle, static_cast<cudaStream_t>(stream));
    if (st != CUDNN_STATUS_SUCCESS) {
        set_err(err, errlen, "cudnnSetStream failed");
        return 1;
    }
    auto r = g.execute(g_handle, pack, ws);
    if (!r.is_good()) {
        set_err(err, errlen, "cuDNN attention: " + r.get_message());
        return 1;
    }
    return 0;
}

}  // namespace

extern "C" {

// Opens libcudnn.so.9 and creates the handle. Returns cudnnGetVersion() (e.g. 91900), or 0 with
// the reason in err.
int64_t gc_cudnn_init(char *err, int errlen) {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_handle) return static_cast<int64_t>(fe::detail::get_backend_version());
    try {
        if (!fe::cudnn_dlhandle) {
            fe::cudnn_dlhandle = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_GLOBAL);
            if (!fe::cudnn_dlhandle) {
                const char *e = dlerror();
                set_err(err, errlen, std::string("cannot load libcudnn.so.9: ") + (e ? e : "unknown error"));
                return 0;
            }
        }
        int64_t version = static_cast<int64_t>(fe::detail::get_backend_version());
        // 9.10.0 and 9.10.1 compute a wrong SDPA backward.
        if (version == 91000 || version == 91001) {
            set_err(err, errlen, "libcudnn " + std::to_string(version) + " has a known-bad attention backward");
            return 0;
        }
        if (fe::detail::create_handle(&g_handle) != CUDNN_STATUS_SUCCESS) {
            g_handle = nullptr;
            set_err(err, errlen, "cudnnCreate failed");
            return 0;
        }
        return version;
    } catch (const std::exception &e) {
        set_err(err, errlen, e.what());
        return 0;
    }
}

// Forward: o (and stats when desc->stats) from q, k, v. 0 ok, 1 error (message in err), 2 the
// workspace is smaller than *ws_needed.
int gc_sdpa_fwd(const gc_sdpa_desc *desc, void *stream, void *q, void *k, void *v, void *o, void *stats,
                void *seq_lens, void *ws, int64_t ws_size, int64_t *ws_needed, char *err, int errlen) {
    std::lock_guard<std::mutex> lock(g_mutex);
    try {
        std::string e;
        auto g = fwd_graph(*desc, e);
        if (!g) {
            set_err(err, errlen, "cuDNN attention forward graph: " + e);
            return 1;
        }
        float scale = desc->scale;
        std::unordered_map<int64_t, void *> pack = {{Q, q}, {K, k}, {V, v}, {O, o}, {SCALE, &scale}};
        if (desc->stats) pack[STATS] = stats;
        if (desc->padded) {
            pack[SEQ_Q] = seq_lens;
            pack[SEQ_KV] = seq_lens;
        }
        return execute(*g, pack, stream, ws, ws_size, ws_needed, err, errlen);
    } catch (const std::exception &ex) {
        set_err(err, errlen, ex.what());
        return 1;
    }
}

// Backward: dq, dk, dv from q, k, v, o, do and the forward's stats (same return codes).
int gc_sdpa_bwd(const gc_sdpa_desc *desc, void *stream, void *q, void *k, void *v, void *o, void *d_o,
                void *stats, void *seq_lens, void *dq, void *dk, void *dv, void *ws, int64_t ws_size,
                int64_t *ws_needed, char *err, int errlen) {
    std::lock_guard<std::mutex> lock(g_mutex);
    try {
        std::string e;
        auto g = bwd_graph(*desc, e);
        if (!g) {
            set_err(err, errlen, "cuDNN attention backward graph: " + e);
            return 1;
        }
        float scale = desc->scale;
        std::unordered_map<int64_t, void *> pack = {{Q, q},   {K, k},   {V, v},   {O, o},   {DO, d_o},     {STATS, stats},
                                                    {DQ, dq}, {DK, dk}, {DV, dv}, {SCALE, &scale}};
        if (desc->padded) {
            pack[SEQ_Q] = seq_lens;
            pack[SEQ_KV] = seq_lens;
        }
        return execute(*g, pack, stream, ws, ws_size, ws_needed, err, errlen);
    } catch (const std::exception &ex) {
        set_err(err, errlen, ex.what());
        return 1;
    }
}

}  // extern "C"
