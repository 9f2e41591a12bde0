/*
Attention through cuDNN's fused (flash-style) kernels for train_moe.cu: USE_CUDNN=1 builds, bf16 only.
cudnn-frontend graphs, one per shape, built once and cached: the same tensors in the same layouts as the
built-in kernels (q[B,T,H,D], k,v[B,T,Hkv,D]), stats = the natural-log logsumexp lse[B,H,T] that the
built-in backward also reads; the backward asks for cuDNN's deterministic algorithm. A shape cuDNN does
not support falls back to the built-in kernels, with one note on stderr.

Defines:
  cudnn_att_init, cudnn_att_free   the cuDNN handle (gpu_init, gpu_free); free prints the line
                                   "cudnn: N graph executions" that dev/gpu_check.sh reads, and how
                                   many calls that asked for cuDNN fell back
  attention_forward_cudnn          1 if cuDNN ran the forward, 0 if the caller must run its own kernels
  attention_backward_cudnn         the same for the backward (dq, dk, dv)
  cudnn_att_runs, cudnn_att_fallbacks, att_graphs, att_max_graphs   read by test_moe_cu's checks

The graph cache holds att_max_graphs graphs and evicts the least recently used one, so the shapes of
training always get one; decoding's forwards (prefill, sampling: Model.decoding) do not ask for cuDNN,
so their many shapes never enter it.

Hooks in train_moe.cu: #included (under #ifdef USE_CUDNN) after the built-in attention forward kernel;
attention_forward and attention_backward try the functions here first; gpu_init and gpu_free call
cudnn_att_init and cudnn_att_free. The C++ headers below are also included at the top of train_moe.cu,
before train_moe.c (which is included inside namespace cpu), so that none of their system headers is
first seen inside that namespace.
*/
#include <map>
#include <tuple>
#include <memory>
#include <unordered_map>
#include <string>
#include <cudnn_frontend.h> // header-only, from PyPI nvidia-cudnn-frontend (see dev/cuda_build.mk)
namespace fe = cudnn_frontend;

static cudnnHandle_t cudnn_handle;
static void* cudnn_workspace = NULL;
static size_t cudnn_workspace_size = 0;
static long cudnn_att_runs = 0;      // graph executions, forward and backward
static long cudnn_att_fallbacks = 0; // calls that asked for cuDNN and ran on the built-in kernels
typedef std::shared_ptr<fe::graph::Tensor_attributes> FeTensor;
typedef struct {
    std::shared_ptr<fe::graph::Graph> graph;
    FeTensor Q, K, V, O, stats, dO, dQ, dK, dV;
    int ok;
    unsigned long long used; // att_clock at its last use
} AttGraph;
static std::map<std::tuple<int, int, int, int, int, int>, AttGraph> att_graphs; // (backward?, B, T, H, Hkv, D)
static unsigned long long att_clock = 0;
static size_t att_max_graphs = 8; // (test_moe_cu lowers it, to see evictions with few graph builds)

static int fe_ok(fe::error_t err, std::string* msg) {
    if (err.is_good()) return 1;
    *msg = err.get_message();
    return 0;
}
static FeTensor fe_tensor(fe::graph::Graph* g, const char* name, int B, int NH, int T, int D) { // x[B,T,NH,D]
    return g->tensor(fe::graph::Tensor_attributes().set_name(name).set_dim({B, NH, T, D})
                         .set_stride({(int64_t)T * NH * D, D, (int64_t)NH * D, 1}));
}
static AttGraph* att_graph(int backward, int B, int T, int H, int Hkv, int D) {
    auto key = std::make_tuple(backward, B, T, H, Hkv, D);
    auto it = att_graphs.find(key);
    if (it != att_graphs.end()) {
        it->second.used = ++att_clock;
        return it->second.ok ? &it->second : NULL;
    }
    while (att_graphs.size() >= att_max_graphs && !att_graphs.empty()) { // full: the least recently used goes
        auto lru = att_graphs.begin();
        for (auto g = att_graphs.begin(); g != att_graphs.end(); ++g)
            if (g->second.used < lru->second.used) lru = g;
        cudaCheck(cudaDeviceSynchronize()); // nothing of its plan still in flight
        att_graphs.erase(lru);
    }
    AttGraph ag;
    ag.used = ++att_clock;
    ag.graph = std::make_shared<fe::graph::Graph>();
    fe::graph::Graph* g = ag.graph.get();
    g->set_io_data_type(fe::DataType_t::BFLOAT16).set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    ag.Q = fe_tensor(g, "Q", B, H, T, D);
    ag.K = fe_tensor(g, "K", B, Hkv, T, D);
    ag.V = fe_tensor(g, "V", B, Hkv, T, D);
    float scale = 1.0f / sqrtf((float)D);
    if (!backward) {
        auto opts = fe::graph::SDPA_attributes().set_name("attention").set_generate_stats(true)
                        .set_causal_mask(true).set_attn_scale(scale);
        auto outs = g->sdpa(ag.Q, ag.K, ag.V, opts);
        ag.O = outs[0]; ag.stats = outs[1];
        ag.O->set_output(true).set_dim({B, H, T, D}).set_stride({(int64_t)T * H * D, D, (int64_t)H * D, 1});
        ag.stats->set_output(true).set_data_type(fe::DataType_t::FLOAT).set_dim({B, H, T, 1})
            .set_stride({(int64_t)H * T, T, 1, 1});
    } else {
        ag.O = fe_tensor(g, "O", B, H, T, D);
        ag.dO = fe_tensor(g, "dO", B, H, T, D);
        ag.stats = g->tensor(fe::graph::Tensor_attributes().set_name("stats").set_dim({B, H, T, 1})
                                 .set_stride({(int64_t)H * T, T, 1, 1}).set_data_type(fe::DataType_t::FLOAT));
        // deterministic: the default backward may add partial sums with float atomics, in a varying order
        auto opts = fe::graph::SDPA_backward_attributes().set_name("attention_backward").set_causal_mask(true)
                        .set_attn_scale(scale).set_deterministic_algorithm(true);
        auto outs = g->sdpa_backward(ag.Q, ag.K, ag.V, ag.O, ag.dO, ag.stats, opts);
        ag.dQ = outs[0]; ag.dK = outs[1]; ag.dV = outs[2];
        ag.dQ->set_output(true).set_dim({B, H, T, D}).set_stride({(int64_t)T * H * D, D, (int64_t)H * D, 1});
        ag.dK->set_output(true).set_dim({B, Hkv, T, D}).set_stride({(int64_t)T * Hkv * D, D, (int64_t)Hkv * D, 1});
        ag.dV->set_output(true).set_dim({B, Hkv, T, D}).set_stride({(int64_t)T * Hkv * D, D, (int64_t)Hkv * D, 1});
    }
    std::string msg;
    int64_t ws = 0;
    ag.ok = fe_ok(g->validate(), &msg) && fe_ok(g->build_operation_graph(cudnn_handle), &msg) &&
            fe_ok(g->create_execution_plans({fe::HeurMode_t::A}), &msg) && fe_ok(g->check_support(cudnn_handle), &msg) &&
            fe_ok(g->build_plans(cudnn_handle), &msg) && fe_ok(g->get_workspace_size(ws), &msg);
    if (!ag.ok)
        fprintf(stderr, "note: cuDNN attention %s unavailable for B=%d T=%d H=%d Hkv=%d D=%d (%s): using the built-in kernels\n",
                backward ? "backward" : "forward", B, T, H, Hkv, D, msg.c_str());
    if (ag.ok && (size_t)ws > cudnn_workspace_size) {
        cuda_free(cudnn_workspace);
        cudnn_workspace = cudaMallocCheck((size_t)ws);
        cudnn_workspace_size = (size_t)ws;
    }
    att_graphs[key] = ag;
    return ag.ok ? &att_graphs[key] : NULL;
}
// run a graph on the tensors of pack; 0 (after a note, the graph marked unusable) if cuDNN refused it
static int att_graph_run(AttGraph* ag, std::unordered_map<FeTensor, void*>& pack, const char* what) {
    std::string msg;
    if (!fe_ok(ag->graph->execute(cudnn_handle, pack, cudnn_workspace), &msg)) { // e.g. a misaligned pointer
        fprintf(stderr, "note: cuDNN attention %s failed (%s): using the built-in kernels\n", what, msg.c_str());
        ag->ok = 0;
        cudnn_att_fallbacks++;
        return 0;
    }
    cudnn_att_runs++;
    return 1;
}
static int attention_forward_cudnn(floatX* out, float* lse, const floatX* q, const floatX* k, const floatX* v,
                                   int B, int T, int H, int Hkv, int D) {
    AttGraph* ag = att_graph(0, B, T, H, Hkv, D);
    if (!ag) { cudnn_att_fallbacks++; return 0; }
    std::unordered_map<FeTensor, void*> pack = {{ag->Q, (void*)q}, {ag->K, (void*)k}, {ag->V, (void*)v},
                                                {ag->O, (void*)out}, {ag->stats, (void*)lse}};
    return att_graph_run(ag, pack, "forward");
}
static int attention_backward_cudnn(floatX* dq, floatX* dk, floatX* dv, const floatX* dout, const floatX* out,
                                    const float* lse, const floatX* q, const floatX* k, const floatX* v,
                                    int B, int T, int H, int Hkv, int D) {
    AttGraph* ag = att_graph(1, B, T, H, Hkv, D);
    if (!ag) { cudnn_att_fallbacks++; return 0; }
    std::unordered_map<FeTensor, void*> pack = {
        {ag->Q, (void*)q}, {ag->K, (void*)k}, {ag->V, (void*)v}, {ag->O, (void*)out}, {ag->dO, (void*)dout},
        {ag->stats, (void*)lse}, {ag->dQ, (void*)dq}, {ag->dK, (void*)dk}, {ag->dV, (void*)dv}};
    return att_graph_run(ag, pack, "backward");
}

// the handle, and the version in the device line
static void cudnn_att_init(void) {
    cudnnStatus_t cs = cudnnCreate(&cudnn_handle);
    if (cs != CUDNN_STATUS_SUCCESS) cpu::die("cuDNN: %s", cudnnGetErrorString(cs), __FILE__, __LINE__);
    printf("attention: cuDNN %zu (fused, flash-style)\n", cudnnGetVersion());
}
// the counts (the first line is what dev/gpu_check.sh reads), then the graphs, workspace and handle go
static void cudnn_att_free(void) {
    printf("cudnn: %ld graph executions\n", cudnn_att_runs);
    if (cudnn_att_fallbacks)
        printf("cudnn: %ld attention calls that asked for cuDNN ran on the built-in kernels (see the notes above)\n",
               cudnn_att_fallbacks);
    att_graphs.clear();
    cuda_free(cudnn_workspace);
    cudnn_workspace = NULL;
    cudnn_workspace_size = 0;
    cudnnDestroy(cudnn_handle);
}
