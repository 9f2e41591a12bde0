/*
Tests train_moe.cu on the GPU against the PyTorch reference states (dev/moe_ref.py, the same files
test_moe.c reads), against train_moe.c itself (checkpoint interchange), and against itself (exact
resume, run-to-run determinism), then tests the trainer binary.
    make cuda-test                      (both precisions)
    ./test_moe_cu [-q] [DIR [TRAINER [CPU_TRAINER]]]
        DIR holds manifest.txt and NAME_model.bin / NAME_debug.bin; TRAINER is the binary of the same
        precision (default below), CPU_TRAINER train_moe.c's (default ./train_moe)
        -q: the quick subset, for compute-sanitizer (memcheck, racecheck): top-k on non-finite logits,
            long-context decoding attention, the classifier in chunks, cuDNN's graph cache (USE_CUDNN
            builds), one reference configuration (gqa), determinism and resume; no task eval, no trainer
            binaries
        -g: the GRPO subset: top-k, decoding and classifier checks as -q, then every GRPO check (each
            dev/ref case's update against the CPU, pi_old recomputed so the first ratios are 1, rollouts
            against the CPU's from one seed, the forward-only reference); no trainer binaries
USE_CUDNN builds fail where cuDNN ran no attention call, and end with the line `cudnn: N graph executions`.
Like test_moe.c it reuses the program itself: nothing of the trainer is copied here.

Tolerances. FP32 builds are held to the CPU test's: logits max|diff| <= 1e-4, loss terms <= 1e-5,
chosen experts identical, every gradient ||g - g_ref|| / ||g_ref|| <= 1e-4, the 10-step AdamW
trajectory within 1e-4. BF16 builds (bf16 weights and activations; fp32 router, statistics, losses,
master weights) are held to the looser ones below, and a chosen expert may differ from the
reference only on a near-tie: each mismatch's router margin |z[chosen] - z[reference's]| (GPU logits)
is measured, and the largest must be <= BF16_MARGIN. Gradients and aux are compared where the
routing agrees (a flipped expert legitimately moves them), and the number of flips is reported.
*/
#define TESTING
#include "train_moe.cu"
namespace cpu {
#include "dev/moe/testing.h" // the readers of the reference states, and the file and process helpers
}
#include <sys/wait.h>
#include <float.h>

static int n_pass = 0, n_fail = 0;
#define CHECK(cond, ...) do { if (cond) n_pass++; else { n_fail++; printf("  FAIL: "); printf(__VA_ARGS__); printf("\n"); } } while (0)

#ifdef PRECISION_BF16
#define BF16_LOGITS 3e-2f  // ||logits - ref|| / ||ref||
#define BF16_CE 1e-2f      // |ce - ref|, |loss - ref|
#define BF16_ROUTER 1e-2f  // |aux_l - ref| / ref, |zl_l - ref| / ref (layers whose routing agrees)
#define BF16_MARGIN 5e-3f  // largest router margin of a flipped expert
#define BF16_GRAD 5e-2f    // per-tensor relative gradient error (when the routing agrees)
#define BF16_TRAJ 3e-2f    // 10-step loss trajectory max|diff|
#define BF16_NORM 1e-1f    // 10-step grad norms max relative diff
#define DEFAULT_TRAINER "./train_moe_cu"
#else
#define DEFAULT_TRAINER "./train_moe_cu_fp32"
#endif

using cpu::DebugState; using cpu::debug_read; using cpu::debug_free;
using cpu::files_equal; using cpu::run_cmd;

// one optimizer step on one batch, the way main() takes it (without accumulation); returns the norm
static float train_step(Model* model, const int* x, const int* y, int B, int T, int step, int steps, int warmup,
                        float lr, float min_lr, float b1, float b2, float eps, float wd, float clip) {
    model_zero_grad(model);
    model_forward(model, x, y, B, T);
    model_backward(model, 1.0f);
    float norm = global_grad_norm(model);
    float scale = (clip > 0 && norm > clip) ? clip / norm : 1.0f;
    model_update(model, lr_schedule(step, steps, warmup, lr, min_lr), b1, b2, eps, wd, step + 1, scale);
    cudaCheck(cudaDeviceSynchronize());
    return norm;
}
// the same step on the CPU model of train_moe.c
static float cpu_train_step(cpu::Model* model, const int* x, const int* y, int B, int T, int step, int steps, int warmup,
                            float lr, float min_lr, float b1, float b2, float eps, float wd, float clip) {
    cpu::model_zero_grad(model);
    cpu::model_forward(model, x, y, B, T);
    cpu::model_backward(model, 1.0f);
    float norm = cpu::global_grad_norm(model);
    float scale = (clip > 0 && norm > clip) ? clip / norm : 1.0f;
    cpu::model_update(model, lr_schedule(step, steps, warmup, lr, min_lr), b1, b2, eps, wd, step + 1, scale);
    return norm;
}

static float* download_grads(const Model* model) {
    float* g = (float*)mallocCheck(model->num_params * sizeof(float));
    cudaCheck(cudaMemcpy(g, model->grads_memory, model->num_params * sizeof(float), cudaMemcpyDeviceToHost));
    return g;
}

// ----------------------------------------------------------------------------
// 0. kernels alone: top-k on non-finite logits, decoding attention over a long cache

// train_moe.c's test_topk_nonfinite on the GPU: NaN ranks as -inf, so every index is a real expert; the
// choices, gates and the count of tokens with non-finite logits are the CPU's
static void test_topk_nonfinite(void) {
    const int N = 5, E = 4, K = 2;
    const float z[N * E] = {NAN, NAN, NAN, NAN,   1, NAN, 2, 0,   INFINITY, 0, -1, 3,   -INFINITY, 1, 1, -INFINITY,
                            0.5f, -2.0f, 1e30f, 3.0f};
    int ti[N * K], cti[N * K], bad = -1;
    float g[N * K], cg[N * K];
    int cbad = cpu::topk_forward(cti, cg, z, N, E, K);
    float* z_d = (float*)cudaMallocCheck(sizeof(z));
    float* g_d = (float*)cudaMallocCheck(sizeof(g));
    int* ti_d = (int*)cudaMallocCheck(sizeof(ti));
    int* bad_d = (int*)cudaMallocCheck(sizeof(int));
    cudaCheck(cudaMemcpy(z_d, z, sizeof(z), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemset(bad_d, 0, sizeof(int)));
    topk_forward(ti_d, g_d, bad_d, z_d, N, E, K);
    cudaCheck(cudaMemcpy(ti, ti_d, sizeof(ti), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(g, g_d, sizeof(g), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(&bad, bad_d, sizeof(int), cudaMemcpyDeviceToHost));
    int same_topi = memcmp(ti, cti, sizeof(ti)) == 0, same_gate = 1;
    for (int i = 0; i < N * K; i++) same_gate &= (isnan(g[i]) && isnan(cg[i])) || fabsf(g[i] - cg[i]) <= 1e-6f;
    CHECK(bad == cbad && cbad == 4, "top-k on non-finite logits: the GPU flags %d tokens, the CPU %d (want 4)", bad, cbad);
    CHECK(same_topi && same_gate, "top-k on non-finite logits: GPU indices or gates differ from the CPU's "
          "(GPU %d %d | %d %d | %d %d | %d %d)", ti[0], ti[1], ti[2], ti[3], ti[4], ti[5], ti[6], ti[7]);
    printf("[topk] NaN/Inf router logits on the GPU: %d of %d tokens flagged (CPU %d), indices and gates as the CPU's: %s\n",
           bad, N, cbad, same_topi && same_gate ? "yes" : "NO");
    cuda_free(z_d); cuda_free(g_d); cuda_free(ti_d); cuda_free(bad_d);
}

// attention_decode_kernel over a cache of 16384 positions (64 KiB of scores in shared memory, above
// the 48 KiB default) against the softmax-weighted average computed here from the same values
static void test_decode_long(void) {
    const int maxT = 16384, H = 2, Hkv = 1, D = 64, pos = maxT - 1;
    size_t nq = (size_t)H * D, nc = (size_t)maxT * Hkv * D;
    float* host = (float*)mallocCheck((nq + 2 * nc) * sizeof(float));
    uint64_t rng = 5;
    for (size_t i = 0; i < nq + 2 * nc; i++) host[i] = 2.0f * rng_f32(&rng) - 1.0f;
    float* f_d = (float*)cudaMallocCheck((nq + 2 * nc) * sizeof(float));
    floatX* x_d = (floatX*)cudaMallocCheck((nq + 2 * nc) * sizeof(floatX));
    floatX* out_d = (floatX*)cudaMallocCheck(nq * sizeof(floatX));
    cudaCheck(cudaMemcpy(f_d, host, (nq + 2 * nc) * sizeof(float), cudaMemcpyHostToDevice));
    cast_to_floatX(x_d, f_d, nq + 2 * nc); // q[H*D], then the k and v caches [maxT][Hkv*D] of one row
    const floatX* q = x_d;
    attention_decode_setup(maxT);
    attention_decode_kernel<<<H, ATT_DEC_THREADS, maxT * sizeof(float)>>>(out_d, q, q + nq, q + nq + nc, pos, maxT, H, Hkv, D);
    cudaCheck(cudaGetLastError());
    float* x = (float*)mallocCheck((nq + 2 * nc) * sizeof(float));
    float* out = (float*)mallocCheck(nq * sizeof(float));
    copy_floatX_to_host(x, q, nq + 2 * nc); // the values the kernel read
    copy_floatX_to_host(out, out_d, nq);
    const float *qh = x, *kh = x + nq, *vh = x + nq + nc;
    double worst = 0.0;
    double* att = (double*)mallocCheck((size_t)maxT * sizeof(double));
    for (int h = 0; h < H; h++) {
        double mx = -INFINITY, sum = 0.0;
        for (int t = 0; t <= pos; t++) {
            double s = 0.0;
            for (int i = 0; i < D; i++) s += (double)qh[h * D + i] * kh[(size_t)t * Hkv * D + i];
            att[t] = s / sqrt((double)D);
            if (att[t] > mx) mx = att[t];
        }
        for (int t = 0; t <= pos; t++) { att[t] = exp(att[t] - mx); sum += att[t]; }
        for (int i = 0; i < D; i++) {
            double o = 0.0;
            for (int t = 0; t <= pos; t++) o += att[t] * vh[(size_t)t * Hkv * D + i];
            worst = fmax(worst, fabs(o / sum - out[h * D + i]));
        }
    }
#ifdef PRECISION_BF16
    double tol = 2e-4; // the output is rounded to bf16 (|o| ~ 0.01 here: an average of 16k values in [-1, 1])
#else
    double tol = 1e-5;
#endif
    CHECK(worst <= tol, "decoding attention over %d cached positions: max|diff| %.3e > %.0e", maxT, worst, tol);
    printf("[decode] attention over %d cached positions (%zu KiB of shared memory): max|diff| %.2e\n", maxT,
           maxT * sizeof(float) / 1024, worst);
    free(host); free(x); free(out); free(att);
    cuda_free(f_d); cuda_free(x_d); cuda_free(out_d);
}

// random values in [-1, 1) as floatX on the device; host gets the very values the kernels read
static floatX* random_floatX(float* host, size_t n, uint64_t seed) {
    uint64_t rng = seed;
    for (size_t i = 0; i < n; i++) host[i] = 2.0f * rng_f32(&rng) - 1.0f;
    float* f_d = (float*)cudaMallocCheck(n * sizeof(float));
    floatX* x_d = (floatX*)cudaMallocCheck(n * sizeof(floatX));
    cudaCheck(cudaMemcpy(f_d, host, n * sizeof(float), cudaMemcpyHostToDevice));
    cast_to_floatX(x_d, f_d, n);
    copy_floatX_to_host(host, x_d, n);
    cuda_free(f_d);
    return x_d;
}

// the classifier's matmuls in chunks of rows (classifier_max_elems lowered so that 37 rows go in
// chunks of 7) and in one call, both against a double sum on the host; and the chunk sizes at the
// size that needs them (B=8, T=4096, V=100k: every chunk's N x V operand within INT_MAX elements)
static void test_classifier_chunks(void) {
    const int N = 37, C = 64, V = 200;
    size_t nx = (size_t)N * C, nw = (size_t)V * C, nl = (size_t)N * V;
    float* x = (float*)mallocCheck(nx * sizeof(float));
    float* w = (float*)mallocCheck(nw * sizeof(float));
    float* dl = (float*)mallocCheck(nl * sizeof(float));
    floatX* x_d = random_floatX(x, nx, 11);
    floatX* w_d = random_floatX(w, nw, 12);
    floatX* dl_d = random_floatX(dl, nl, 13);
    floatX* l_d[2];
    floatX* dx_d[2];
    float* dw_d[2];
    int rows_used[2];
    for (int k = 0; k < 2; k++) { // k = 0: one call; k = 1: chunks of 7 rows
        l_d[k] = (floatX*)cudaMallocCheck(nl * sizeof(floatX));
        dx_d[k] = (floatX*)cudaMallocCheck(nx * sizeof(floatX));
        dw_d[k] = (float*)cudaMallocCheck(nw * sizeof(float));
        cudaCheck(cudaMemset(dx_d[k], 0, nx * sizeof(floatX)));
        cudaCheck(cudaMemset(dw_d[k], 0, nw * sizeof(float)));
        classifier_max_elems = k ? (size_t)7 * V + 5 : (size_t)INT_MAX;
        rows_used[k] = classifier_chunk_rows(N, V);
        classifier_forward(l_d[k], x_d, w_d, N, C, V);
        classifier_backward(dx_d[k], dw_d[k], dl_d, x_d, w_d, N, C, V);
    }
    classifier_max_elems = INT_MAX;
    float* got = (float*)mallocCheck(nl * sizeof(float));
    double err[2][3] = {{0}}, scale[3] = {0}, between = 0.0; // logits, dx, dw
    float* first = (float*)mallocCheck(nl * sizeof(float));
    for (int k = 0; k < 2; k++) {
        copy_floatX_to_host(got, l_d[k], nl);
        if (k == 0) memcpy(first, got, nl * sizeof(float));
        for (int n = 0; n < N; n++)
            for (int v = 0; v < V; v++) {
                double r = 0.0;
                for (int c = 0; c < C; c++) r += (double)x[(size_t)n * C + c] * w[(size_t)v * C + c];
                size_t i = (size_t)n * V + v;
                err[k][0] = fmax(err[k][0], fabs(got[i] - r));
                scale[0] = fmax(scale[0], fabs(r));
                if (k) between = fmax(between, fabs(got[i] - first[i]));
            }
        copy_floatX_to_host(got, dx_d[k], nx);
        for (int n = 0; n < N; n++)
            for (int c = 0; c < C; c++) {
                double r = 0.0;
                for (int v = 0; v < V; v++) r += (double)dl[(size_t)n * V + v] * w[(size_t)v * C + c];
                err[k][1] = fmax(err[k][1], fabs(got[(size_t)n * C + c] - r));
                scale[1] = fmax(scale[1], fabs(r));
            }
        cudaCheck(cudaMemcpy(got, dw_d[k], nw * sizeof(float), cudaMemcpyDeviceToHost));
        for (int v = 0; v < V; v++)
            for (int c = 0; c < C; c++) {
                double r = 0.0;
                for (int n = 0; n < N; n++) r += (double)dl[(size_t)n * V + v] * x[(size_t)n * C + c];
                err[k][2] = fmax(err[k][2], fabs(got[(size_t)v * C + c] - r));
                scale[2] = fmax(scale[2], fabs(r));
            }
    }
#ifdef PRECISION_BF16
    const double tol_x = 1e-2; // logits and dx are rounded to bf16 (dw is fp32, from exact bf16 products)
#else
    const double tol_x = 1e-5;
#endif
    const char* what[3] = {"logits", "dxf", "dlm_head"};
    for (int k = 0; k < 2; k++)
        for (int j = 0; j < 3; j++) {
            double rel = err[k][j] / scale[j], tol = j == 2 ? 1e-5 : tol_x;
            CHECK(rel <= tol, "classifier %s (%s): max|diff| / max|ref| %.3e > %.0e", what[j], k ? "chunks of 7 rows" : "one call",
                  rel, tol);
        }
    CHECK(rows_used[0] == N && rows_used[1] == 7, "classifier chunk rows: %d at the default limit (want %d), %d at 7V+5 (want 7)",
          rows_used[0], N, rows_used[1]);
    // the size of the review: B=8, T=4096, V=100k (3.3e9 logits): chunks under INT_MAX elements that cover N
    int bigN = 8 * 4096, bigV = 100000, r = classifier_chunk_rows(bigN, bigV);
    int big_ok = r >= 1 && r < bigN && (size_t)r * bigV <= (size_t)INT_MAX &&
                 (size_t)(r + 1) * bigV > (size_t)INT_MAX; // as many rows as fit
    CHECK(big_ok, "classifier chunks at N=%d V=%d: %d rows per chunk (%zu elements)", bigN, bigV, r, (size_t)r * bigV);
    printf("[classifier] in chunks of 7 rows and in one call vs a double sum: logits %.1e %.1e, dxf %.1e %.1e, dlm_head "
           "%.1e %.1e (relative); chunked vs one call max|diff| %.1e; at N=%d V=%d: %d chunks of %d rows\n",
           err[1][0] / scale[0], err[0][0] / scale[0], err[1][1] / scale[1], err[0][1] / scale[1], err[1][2] / scale[2],
           err[0][2] / scale[2], between, bigN, bigV, (bigN + r - 1) / r, r);
    for (int k = 0; k < 2; k++) { cuda_free(l_d[k]); cuda_free(dx_d[k]); cuda_free(dw_d[k]); }
    cuda_free(x_d); cuda_free(w_d); cuda_free(dl_d);
    free(x); free(w); free(dl); free(got); free(first);
}

#ifdef USE_CUDNN
// cuDNN's graph cache, least recently used out (lowered to 2 graphs, for few graph builds): more
// attention shapes than it holds, then the first again, and every call runs on cuDNN (a full first-come cache sent new shapes to the built-in kernels
// unseen); the outputs agree with the built-in kernels'. Then decoding: a prefill adds no graph and no
// execution, and a training forward after it still runs on cuDNN.
static void test_cudnn_cache(const char* dir) {
    const size_t keep = att_max_graphs;
    att_max_graphs = 2;
    const int H = 4, Hkv = 2, D = 64, B = 1, nshapes = (int)att_max_graphs + 1, maxT = 8 * nshapes;
    size_t nq = (size_t)B * maxT * H * D, nk = (size_t)B * maxT * Hkv * D;
    float* host = (float*)mallocCheck(nq * sizeof(float));
    floatX* q = random_floatX(host, nq, 21);
    floatX* k = random_floatX(host, nk, 22);
    floatX* v = random_floatX(host, nk, 23);
    floatX* out = (floatX*)cudaMallocCheck(nq * sizeof(floatX));
    floatX* out2 = (floatX*)cudaMallocCheck(nq * sizeof(floatX));
    float* lse = (float*)cudaMallocCheck((size_t)B * H * maxT * sizeof(float));
    long runs0 = cudnn_att_runs, falls0 = cudnn_att_fallbacks;
    for (int i = 0; i <= nshapes; i++) // T = 8, 16, ..., 8 * nshapes, then 8 again (evicted by then)
        attention_forward(out, lse, q, k, v, B, 8 * (i % nshapes + 1), H, Hkv, D, 1);
    long runs = cudnn_att_runs - runs0, falls = cudnn_att_fallbacks - falls0;
    size_t held = att_graphs.size();
    CHECK(runs == nshapes + 1 && falls == 0 && held <= att_max_graphs,
          "cuDNN graph cache: %ld of %d attention calls of %d shapes ran on cuDNN (%ld fell back; %zu graphs held, at most %zu)",
          runs, nshapes + 1, nshapes, falls, held, att_max_graphs);
    att_max_graphs = keep;
    // the last call (T = 8) against the built-in kernels
    attention_forward(out2, lse, q, k, v, B, 8, H, Hkv, D, 0);
    size_t n8 = (size_t)B * 8 * H * D;
    float* a = (float*)mallocCheck(n8 * sizeof(float));
    float* b = (float*)mallocCheck(n8 * sizeof(float));
    copy_floatX_to_host(a, out, n8);
    copy_floatX_to_host(b, out2, n8);
    float worst = 0.0f;
    for (size_t i = 0; i < n8; i++) worst = fmaxf(worst, fabsf(a[i] - b[i]));
    CHECK(worst <= 2e-2f, "cuDNN attention vs the built-in kernels: max|diff| %.3e > 2e-2", worst);
    // decoding keeps out of the cache
    char path[1024];
    Model g;
    TrainState st;
    snprintf(path, sizeof path, "%s/gqa_model.bin", dir);
    if (checkpoint_load(&g, path, &st, 0) != 0) exit(EXIT_FAILURE);
    int T = g.config.T, V = g.config.V, L = g.config.L, outt[4 * 16], lens[4];
    model_alloc_acts(&g, 4, T);
    size_t graphs0 = att_graphs.size();
    runs0 = cudnn_att_runs;
    const int prompt[4] = {1, 2, 3, 4};
    Tokenizer none;
    memset(&none, 0, sizeof none);
    for (int plen = 1; plen <= 3; plen++) generate_answers(&g, prompt, plen, 2, 3, -1, 0, &none, outt, lens, 0.0f, NULL);
    long dec_runs = cudnn_att_runs - runs0;
    int* x = (int*)mallocCheck(4 * (size_t)T * sizeof(int));
    int* y = (int*)mallocCheck(4 * (size_t)T * sizeof(int));
    for (int i = 0; i < 4 * T; i++) { x[i] = (i * 7 + 1) % V; y[i] = (i * 5 + 2) % V; }
    runs0 = cudnn_att_runs;
    model_forward(&g, x, y, 4, T);
    long train_runs = cudnn_att_runs - runs0;
    CHECK(dec_runs == 0 && att_graphs.size() <= graphs0 + 1 && train_runs == L,
          "cuDNN and decoding: prefills ran %ld cuDNN graphs (want 0), graphs %zu -> %zu, the training forward after them %ld of %d",
          dec_runs, graphs0, att_graphs.size(), train_runs, L);
    printf("[cudnn] %d shapes through a cache of %d: %ld of %d calls on cuDNN, max|diff| vs built-in %.1e; prefills on cuDNN: "
           "%ld, training forward after them: %ld of %d layers\n", nshapes, 2, runs, nshapes + 1, worst, dec_runs,
           train_runs, L);
    model_free(&g);
    cuda_free(q); cuda_free(k); cuda_free(v); cuda_free(out); cuda_free(out2); cuda_free(lse);
    free(host); free(a); free(b); free(x); free(y);
}
#endif

// ----------------------------------------------------------------------------
// 1. one configuration against its PyTorch debug state

static void test_reference(const char* dir, const char* name) {
    char path[1024];
    Model model;
    TrainState st;
    snprintf(path, sizeof path, "%s/%s_model.bin", dir, name);
    checkpoint_load(&model, path, &st, 0);
    const MoEConfig* c = &model.config;
    DebugState d;
    snprintf(path, sizeof path, "%s/%s_debug.bin", dir, name);
    debug_read(&d, path, c, model.num_params);
    int N = d.B * d.T, L = c->L, K = c->K, E = c->E, V = c->V;
    printf("[%s] V=%d L=%d C=%d H=%d Hkv=%d E=%d K=%d F=%d B=%d T=%d (%s)\n", name, V, L, c->C, c->H, c->Hkv, E, K, c->F,
           d.B, d.T, PRECISION_NAME);

    model_zero_grad(&model);
#ifdef USE_CUDNN
    long runs0 = cudnn_att_runs, falls0 = cudnn_att_fallbacks;
#endif
    model_forward(&model, d.x, d.y, d.B, d.T);
#ifdef USE_CUDNN
    // the cuDNN build must run attention on cuDNN, not fall back to the built-in kernels unseen
    long runs_fwd = cudnn_att_runs - runs0;
    CHECK(runs_fwd == L, "[%s] cuDNN ran %ld of the forward's %d attention calls (%ld fell back to the built-in kernels)",
          name, runs_fwd, L, cudnn_att_fallbacks - falls0);
#endif
    // logits
    float* logits = (float*)mallocCheck((size_t)N * V * sizeof(float));
    model_logits_to_host(&model, logits, 0, N);
    float maxdiff = 0.0f;
    double dd = 0.0, rr = 0.0;
    for (size_t i = 0; i < (size_t)N * V; i++) {
        float df = logits[i] - d.logits[i];
        maxdiff = fmaxf(maxdiff, fabsf(df));
        dd += (double)df * df;
        rr += (double)d.logits[i] * d.logits[i];
    }
    float logit_rel = (float)sqrt(dd / (rr > 0 ? rr : 1.0));
    // chosen experts, and the router margin of every one that differs
    int* topi = (int*)mallocCheck((size_t)L * N * K * sizeof(int));
    float* z = (float*)mallocCheck((size_t)L * N * E * sizeof(float));
    cudaCheck(cudaMemcpy(topi, model.topi, (size_t)L * N * K * sizeof(int), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(z, model.acts.z, (size_t)L * N * E * sizeof(float), cudaMemcpyDeviceToHost));
    int expert_mismatch = 0;
    int* layer_flips = (int*)callocCheck(L, sizeof(int));
    float worst_margin = 0.0f;
    for (int l = 0; l < L; l++)
        for (int s = 0; s < N * K; s++) {
            size_t i = (size_t)l * N * K + s;
            if (topi[i] == d.experts[i]) continue;
            expert_mismatch++;
            layer_flips[l]++;
            const float* zn = z + ((size_t)l * N + s / K) * E;
            worst_margin = fmaxf(worst_margin, fabsf(zn[topi[i]] - zn[d.experts[i]]));
        }
    // loss terms
    float lossdiff = fmaxf(fabsf(model.ce - d.ce), fabsf(model.loss - d.loss));
    float routerdiff = 0.0f; // FP32: absolute; BF16: relative, over layers whose routing agrees
    for (int l = 0; l < L; l++) {
#ifdef PRECISION_BF16
        if (layer_flips[l]) continue;
        routerdiff = fmaxf(routerdiff, fabsf(model.aux[l] - d.aux[l]) / fmaxf(fabsf(d.aux[l]), 1e-6f));
        routerdiff = fmaxf(routerdiff, fabsf(model.zl[l] - d.zl[l]) / fmaxf(fabsf(d.zl[l]), 1e-6f));
#else
        routerdiff = fmaxf(routerdiff, fmaxf(fabsf(model.aux[l] - d.aux[l]), fabsf(model.zl[l] - d.zl[l])));
#endif
    }
#ifdef PRECISION_BF16
    CHECK(logit_rel <= BF16_LOGITS, "[%s] logits relative error %.3e > %.0e", name, logit_rel, BF16_LOGITS);
    CHECK(lossdiff <= BF16_CE, "[%s] ce/loss max|diff| %.3e > %.0e", name, lossdiff, BF16_CE);
    CHECK(routerdiff <= BF16_ROUTER, "[%s] aux_l/zl_l max relative diff %.3e > %.0e", name, routerdiff, BF16_ROUTER);
    CHECK(worst_margin <= BF16_MARGIN, "[%s] %d chosen experts differ, one with router margin %.3e > %.0e (not a near-tie)",
          name, expert_mismatch, worst_margin, BF16_MARGIN);
#else
    CHECK(maxdiff <= 1e-4f, "[%s] logits max|diff| %.3e > 1e-4", name, maxdiff);
    lossdiff = fmaxf(lossdiff, routerdiff);
    CHECK(lossdiff <= 1e-5f, "[%s] loss terms (ce, aux_l, zl_l, loss) max|diff| %.3e > 1e-5", name, lossdiff);
    CHECK(expert_mismatch == 0, "[%s] %d chosen experts differ (largest router margin %.3e)", name, expert_mismatch, worst_margin);
#endif
    printf("  logits max|diff| %.2e rel %.2e | ce/loss max|diff| %.2e, aux/z %.2e (ce %.6f loss %.6f) | experts differing %d (largest margin %.2e)\n",
           maxdiff, logit_rel, lossdiff, routerdiff, model.ce, model.loss, expert_mismatch, worst_margin);

    // every gradient
#ifdef USE_CUDNN
    runs0 = cudnn_att_runs; falls0 = cudnn_att_fallbacks;
#endif
    model_backward(&model, 1.0f);
#ifdef USE_CUDNN
    long runs_bwd = cudnn_att_runs - runs0;
    CHECK(runs_bwd == L, "[%s] cuDNN ran %ld of the backward's %d attention calls (%ld fell back to the built-in kernels)",
          name, runs_bwd, L, cudnn_att_fallbacks - falls0);
    printf("  cuDNN attention: %ld of %d forward and %ld of %d backward calls\n", runs_fwd, L, runs_bwd, L);
#endif
    float* grads = download_grads(&model);
    size_t off = 0;
    float worst = 0.0f;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        size_t n = model.param_sizes[t];
        double gd = 0.0, gr = 0.0;
        for (size_t i = 0; i < n; i++) {
            double gv = grads[off + i], r = d.grads[off + i];
            gd += (gv - r) * (gv - r);
            gr += r * r;
        }
        float rel = gr > 0 ? (float)sqrt(gd / gr) : (float)sqrt(gd);
        worst = fmaxf(worst, rel);
#ifdef PRECISION_BF16
        if (expert_mismatch == 0)
            CHECK(rel <= BF16_GRAD, "[%s] grad %s relative error %.3e > %.0e", name, param_names[t], rel, BF16_GRAD);
#else
        CHECK(rel <= 1e-4f, "[%s] grad %s relative error %.3e > 1e-4", name, param_names[t], rel);
#endif
        off += n;
    }
    // an expert that received no token gets exactly zero gradient
    int empty_experts = 0;
    ParamTensorsT<float> gh;
    point_params(&gh, grads, model.param_sizes);
    for (int l = 0; l < L; l++)
        for (int e = 0; e < E; e++) {
            const int* offs = model.offs_h + (size_t)l * (E + 1);
            if (offs[e + 1] != offs[e]) continue;
            empty_experts++;
            size_t o1 = ((size_t)l * E + e) * c->F * c->C;
            int nonzero = 0;
            for (size_t i = 0; i < (size_t)c->F * c->C; i++)
                nonzero += gh.w1[o1 + i] != 0.0f || gh.w3[o1 + i] != 0.0f || gh.w2[o1 + i] != 0.0f;
            CHECK(nonzero == 0, "[%s] layer %d expert %d got no token but %d nonzero gradients", name, l, e, nonzero);
        }
    printf("  worst gradient relative error %.2e over %d tensors%s | experts with no token: %d\n", worst, NUM_PARAM_TENSORS,
           expert_mismatch ? " (routing differs: not checked)" : "", empty_experts);

    // the AdamW trajectory on this batch
    float worst_loss = 0.0f, worst_norm = 0.0f;
    for (int s = 0; s < d.nsteps; s++) {
        float norm = train_step(&model, d.x, d.y, d.B, d.T, s, d.nsteps, d.warmup, d.lr, d.min_lr, d.beta1, d.beta2,
                                d.eps, d.weight_decay, d.grad_clip);
        worst_loss = fmaxf(worst_loss, fabsf(model.loss - d.losses[s]));
        worst_norm = fmaxf(worst_norm, fabsf(norm - d.norms[s]) / fmaxf(d.norms[s], 1e-12f));
    }
#ifdef PRECISION_BF16
    float tl = BF16_TRAJ, tn = BF16_NORM;
#else
    float tl = 1e-4f, tn = 1e-4f;
#endif
    CHECK(worst_loss <= tl, "[%s] %d-step AdamW loss trajectory max|diff| %.3e > %.0e", name, d.nsteps, worst_loss, tl);
    CHECK(worst_norm <= tn, "[%s] %d-step grad norms max relative diff %.3e > %.0e", name, d.nsteps, worst_norm, tn);
    printf("  %d AdamW steps: loss %.6f -> %.6f (ref %.6f), loss max|diff| %.2e, norm max rel diff %.2e\n",
           d.nsteps, d.losses[0], model.loss, d.losses[d.nsteps - 1], worst_loss, worst_norm);
    free(logits); free(topi); free(z); free(layer_flips); free(grads);
    debug_free(&d);
    model_free(&model);
}

// ----------------------------------------------------------------------------
// 2. checkpoints: GPU <-> CPU interchange, and save -> load -> the same next steps, bit for bit

static int same_bits(const float* a, const float* b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

#ifdef PRECISION_BF16
#define XFER_TOL BF16_CE
#else
#define XFER_TOL 1e-4f
#endif

static void test_checkpoint_interchange(const char* dir, const char* name, const char* tmpdir) {
    char path[1024], gck[1024], cck[1024], gck2[1024];
    Model g;
    TrainState st;
    snprintf(path, sizeof path, "%s/%s_model.bin", dir, name);
    checkpoint_load(&g, path, &st, 0);
    DebugState d;
    snprintf(path, sizeof path, "%s/%s_debug.bin", dir, name);
    debug_read(&d, path, &g.config, g.num_params);
    size_t n = g.num_params;
    TrainState now = {3, {1, 2, 3}, 0x123456789abcdefull, 42};
    // GPU -> CPU: 3 GPU steps, saved; the CPU reads the very bits and computes the same loss
    for (int s = 0; s < 3; s++) train_step(&g, d.x, d.y, d.B, d.T, s, 10, 2, 1e-3f, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f);
    snprintf(gck, sizeof gck, "%s/from_gpu.bin", tmpdir);
    checkpoint_save(&g, gck, 1, &now);
    float* gp = (float*)mallocCheck(n * sizeof(float));
    float* gm = (float*)mallocCheck(n * sizeof(float));
    float* gv = (float*)mallocCheck(n * sizeof(float));
    model_download(&g, gp, gm, gv);
    cpu::Model cm;
    TrainState back;
    cpu::checkpoint_load(&cm, gck, &back, 1);
    int bits = same_bits(cm.params_memory, gp, n) && same_bits(cm.m_memory, gm, n) && same_bits(cm.v_memory, gv, n) &&
               back.step == 3 && back.pos.epoch == 1 && back.pos.shard == 2 && back.pos.sample == 3 &&
               back.rng == now.rng && back.seed == 42;
    CHECK(bits, "[%s] the CPU did not read back the GPU's weights, AdamW state and train state exactly", name);
    model_forward(&g, d.x, d.y, d.B, d.T);
    cpu::model_forward(&cm, d.x, d.y, d.B, d.T);
    float diff1 = fabsf(g.loss - cm.loss);
    CHECK(diff1 <= XFER_TOL, "[%s] GPU checkpoint: CPU loss %.6f vs GPU %.6f", name, cm.loss, g.loss);
    printf("[%s] GPU checkpoint -> CPU: exact bits %s, loss CPU %.6f GPU %.6f\n", name, bits ? "yes" : "NO", cm.loss, g.loss);
    cpu::model_free(&cm);
    model_free(&g);
    // CPU -> GPU: 3 CPU steps, saved; the GPU reads the very bits, computes the same loss, and writes
    // the same file back
    snprintf(path, sizeof path, "%s/%s_model.bin", dir, name);
    cpu::checkpoint_load(&cm, path, &st, 0);
    for (int s = 0; s < 3; s++) cpu_train_step(&cm, d.x, d.y, d.B, d.T, s, 10, 2, 1e-3f, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f);
    snprintf(cck, sizeof cck, "%s/from_cpu.bin", tmpdir);
    cpu::checkpoint_save(&cm, cck, 1, &now);
    checkpoint_load(&g, cck, &back, 1);
    model_download(&g, gp, gm, gv);
    bits = same_bits(cm.params_memory, gp, n) && same_bits(cm.m_memory, gm, n) && same_bits(cm.v_memory, gv, n) &&
           back.step == 3 && back.rng == now.rng;
    CHECK(bits, "[%s] the GPU did not read back the CPU's weights, AdamW state and train state exactly", name);
    snprintf(gck2, sizeof gck2, "%s/from_cpu_resaved.bin", tmpdir);
    checkpoint_save(&g, gck2, 1, &back);
    int same_file = files_equal(cck, gck2);
    CHECK(same_file, "[%s] the GPU re-saving a CPU checkpoint changed its bytes", name);
    cpu::model_forward(&cm, d.x, d.y, d.B, d.T);
    model_forward(&g, d.x, d.y, d.B, d.T);
    float diff2 = fabsf(g.loss - cm.loss);
    CHECK(diff2 <= XFER_TOL, "[%s] CPU checkpoint: GPU loss %.6f vs CPU %.6f", name, g.loss, cm.loss);
    printf("[%s] CPU checkpoint -> GPU: exact bits %s, re-saved file identical %s, loss GPU %.6f CPU %.6f\n", name,
           bits ? "yes" : "NO", same_file ? "yes" : "NO", g.loss, cm.loss);
    remove(gck); remove(cck); remove(gck2);
    free(gp); free(gm); free(gv);
    cpu::model_free(&cm);
    model_free(&g);
    debug_free(&d);
}

// the same steps twice (determinism), and save -> load -> the same next steps (resume), bit for bit
static void test_determinism_and_resume(const char* dir, const char* name, const char* tmpdir) {
    char path[1024], ck[1024];
    Model a, b;
    TrainState st;
    snprintf(path, sizeof path, "%s/%s_model.bin", dir, name);
    checkpoint_load(&a, path, &st, 0);
    checkpoint_load(&b, path, &st, 0);
    DebugState d;
    snprintf(path, sizeof path, "%s/%s_debug.bin", dir, name);
    debug_read(&d, path, &a.config, a.num_params);
    size_t n = a.num_params;
    float* pa = (float*)mallocCheck(n * sizeof(float));
    float* pb = (float*)mallocCheck(n * sizeof(float));
    int same = 1;
    for (int s = 0; s < 3; s++) {
        float na = train_step(&a, d.x, d.y, d.B, d.T, s, 10, 2, 1e-3f, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f);
        float nb = train_step(&b, d.x, d.y, d.B, d.T, s, 10, 2, 1e-3f, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f);
        float* ga = download_grads(&a);
        float* gb = download_grads(&b);
        same = same && na == nb && a.loss == b.loss && same_bits(ga, gb, n);
        free(ga); free(gb);
    }
    model_download(&a, pa, NULL, NULL);
    model_download(&b, pb, NULL, NULL);
    same = same && same_bits(pa, pb, n);
    CHECK(same, "[%s] two runs of the same 3 steps differ (losses, norms, gradients or weights)", name);
    printf("[%s] two runs of 3 steps: identical losses, norms, gradients and weights: %s\n", name, same ? "yes" : "NO");
    model_free(&b);
    // resume: a saves after 3 steps and goes on; b loads the file and goes on
    TrainState now = {3, {0, 0, 0}, 7, 1337};
    snprintf(ck, sizeof ck, "%s/resume.bin", tmpdir);
    checkpoint_save(&a, ck, 1, &now);
    TrainState back;
    checkpoint_load(&b, ck, &back, 1);
    for (int s = 3; s < 5; s++) {
        train_step(&a, d.x, d.y, d.B, d.T, s, 10, 2, 1e-3f, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f);
        train_step(&b, d.x, d.y, d.B, d.T, s, 10, 2, 1e-3f, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f);
    }
    float* ma = (float*)mallocCheck(n * sizeof(float));
    float* mb = (float*)mallocCheck(n * sizeof(float));
    float* va = (float*)mallocCheck(n * sizeof(float));
    float* vb = (float*)mallocCheck(n * sizeof(float));
    model_download(&a, pa, ma, va);
    model_download(&b, pb, mb, vb);
    same = same_bits(pa, pb, n) && same_bits(ma, mb, n) && same_bits(va, vb, n) && a.loss == b.loss;
    CHECK(same, "[%s] save -> load -> 2 steps differs from the uninterrupted steps", name);
    printf("[%s] checkpoint save -> load -> next 2 steps identical: %s\n", name, same ? "yes" : "NO");
    remove(ck);
    free(pa); free(pb); free(ma); free(mb); free(va); free(vb);
    debug_free(&d);
    model_free(&a);
    model_free(&b);
}

// ----------------------------------------------------------------------------
// 2c. task eval on the GPU against train_moe.c's: task loss, KV-cached greedy decoding (R = 1 and a
// batch of rows), the accuracy and test-time-compute plumbing

#ifdef PRECISION_BF16
#define DECODE_MARGIN 5e-2f // a GPU token may differ from the CPU's argmax only where the CPU's logits
#else                       // of the two are this close (a near-tie)
#define DECODE_MARGIN 1e-4f
#endif

// the GPU decoded out[0..n) after prompt[0..plen): at every position the CPU model, run over the same
// prefix, must pick the same token or one whose logit is within DECODE_MARGIN of it. Returns the
// number of near-tie disagreements, or -1 on a real one (*worst gets the largest margin seen).
static int check_decode(cpu::Model* cm, const int* prompt, int plen, const int* out, int n, float* worst) {
    int V = cm->config.V, seq[256], ties = 0;
    memcpy(seq, prompt, plen * sizeof(int));
    memcpy(seq + plen, out, n * sizeof(int));
    for (int t = 0; t < n; t++) {
        cpu::model_forward(cm, seq, NULL, 1, plen + t);
        const float* l = cm->logits + (size_t)(plen + t - 1) * V;
        int best = 0;
        for (int i = 1; i < V; i++) if (l[i] > l[best]) best = i;
        if (out[t] < 0 || out[t] >= V) return -1;
        if (best == out[t]) continue;
        float margin = l[best] - l[out[t]];
        if (margin > *worst) *worst = margin;
        if (margin > DECODE_MARGIN) return -1;
        ties++;
    }
    return ties;
}

static void test_task_eval(const char* dir, const char* name) {
    char path[1024];
    Model g;
    cpu::Model cm;
    TrainState st;
    snprintf(path, sizeof path, "%s/%s_model.bin", dir, name);
    checkpoint_load(&g, path, &st, 0);
    cpu::checkpoint_load(&cm, path, &st, 0);
    int V = g.config.V, T = g.config.T, B = 4, nitems = 6, alen = 3;
    model_alloc_acts(&g, B, T);
    cpu::model_alloc_acts(&cm, B, T);
    // a tokenizer whose token i reads "<i>", and items cut from a fixed token stream
    Tokenizer tk = {V, -1, (char**)mallocCheck(V * sizeof(char*)), 1};
    for (int i = 0; i < V; i++) { tk.tokens[i] = (char*)mallocCheck(16); snprintf(tk.tokens[i], 16, "<%d>", i); }
    EvalSet es;
    memset(&es, 0, sizeof es);
    strcpy(es.name, "synthetic");
    es.n = nitems; es.kind = TASK_MEMORIZATION; es.max_prompt = 4; es.max_answer = alen;
    es.plen = (int*)mallocCheck(nitems * sizeof(int));
    es.alen = (int*)mallocCheck(nitems * sizeof(int));
    es.toks = (int**)mallocCheck(nitems * sizeof(int*));
    es.ref = (char**)mallocCheck(nitems * sizeof(char*));
    uint64_t rng = 42;
    for (int i = 0; i < nitems; i++) {
        es.plen[i] = 2 + i % 3; es.alen[i] = alen;
        es.toks[i] = (int*)mallocCheck((es.plen[i] + alen) * sizeof(int));
        for (int j = 0; j < es.plen[i] + alen; j++) es.toks[i][j] = (int)(rng_f32(&rng) * V) % V;
    }
    // task loss
    double gbpt, gbpb, cbpt, cbpb;
    int gtr, ctr;
    eval_task_loss(&g, &es, &tk, B, T, -1 + V, &gbpt, &gbpb, &gtr);
    cpu::eval_task_loss(&cm, &es, &tk, B, T, -1 + V, &cbpt, &cbpb, &ctr);
    float rel = (float)fabs(gbpt - cbpt) / (float)cbpt, relb = (float)fabs(gbpb - cbpb) / (float)cbpb;
    float tol = XFER_TOL / 2.0f;
    CHECK(rel <= tol && relb <= tol && gtr == ctr, "[%s] task loss: GPU %.6f bits/token %.6f bits/byte, CPU %.6f %.6f",
          name, gbpt, gbpb, cbpt, cbpb);
    printf("[%s] task loss GPU %.6f vs CPU %.6f bits/token (relative %.1e), %.6f vs %.6f bits/byte\n", name, gbpt, cbpt,
           rel, gbpb, cbpb);
    // greedy decoding, one row: against the CPU, position by position; the CPU's own answers become
    // the references, so the GPU's accuracy must be the share of items it decodes exactly alike
    int gout[64], cout_[64], lens[8], exact = 0, ties = 0, bad = 0;
    float worst = 0.0f;
    size_t cap = 256;
    char* text = (char*)mallocCheck(cap);
    for (int i = 0; i < nitems; i++) {
        int max_new = alen + 8, plen = es.plen[i], want = max_new < T - plen ? max_new : T - plen;
        generate_answers(&g, es.toks[i], plen, 1, max_new, -1, 1, &tk, gout, lens, 0.0f, NULL);
        int cn = cpu::generate_answer(&cm, es.toks[i], plen, max_new, -1, 1, &tk, cout_, 0.0f, NULL);
        int t = check_decode(&cm, es.toks[i], plen, gout, lens[0], &worst);
        if (t < 0 || lens[0] != want || cn != want) bad++; else ties += t;
        exact += lens[0] == cn && memcmp(gout, cout_, cn * sizeof(int)) == 0;
        cpu::tokens_text(&tk, cout_, cn, &text, &cap);
        es.ref[i] = (char*)mallocCheck(strlen(text) + 1);
        strcpy(es.ref[i], text);
    }
    CHECK(bad == 0, "[%s] GPU greedy decoding disagrees with the CPU beyond near-ties (or stops early) on %d items "
          "(largest margin %.2e)", name, bad, worst);
    int scored;
    double gacc = eval_task_accuracy(&g, &es, &tk, -1, 0, &scored, NULL);
    double cacc = cpu::eval_task_accuracy(&cm, &es, &tk, -1, 0, &scored, NULL);
    CHECK(cacc == 1.0 && gacc == (double)exact / nitems, "[%s] accuracy: CPU %.3f (expected 1), GPU %.3f (expected %.3f)",
          name, cacc, gacc, (double)exact / nitems);
    printf("[%s] greedy KV-cached decoding: %d/%d items identical to the CPU, %d near-tie tokens (largest margin %.1e), "
           "accuracy GPU %.3f CPU %.3f\n", name, exact, nitems, ties, worst, gacc, cacc);
    // a batch of rows: greedy rows all follow the CPU; sampled rows are reproducible from the seed
    int R = B, rows[4 * 64], rows2[4 * 64], lens2[8], max_new = alen + 8;
    bad = 0;
    for (int i = 0; i < nitems; i++) {
        generate_answers(&g, es.toks[i], es.plen[i], R, max_new, -1, 1, &tk, rows, lens, 0.0f, NULL);
        for (int r = 0; r < R; r++) bad += check_decode(&cm, es.toks[i], es.plen[i], rows + r * max_new, lens[r], &worst) < 0;
    }
    CHECK(bad == 0, "[%s] batched greedy decoding (%d rows): %d rows disagree with the CPU", name, R, bad);
    uint64_t r1 = 7, r2 = 7;
    uint64_t* s1[4] = {&r1, &r1, &r1, &r1}; // every row drawing from one stream, row by row
    uint64_t* s2[4] = {&r2, &r2, &r2, &r2};
    generate_answers(&g, es.toks[0], es.plen[0], R, max_new, -1, 1, &tk, rows, lens, 1.0f, s1);
    generate_answers(&g, es.toks[0], es.plen[0], R, max_new, -1, 1, &tk, rows2, lens2, 1.0f, s2);
    int same = r1 == r2;
    for (int r = 0; r < R; r++)
        same &= lens[r] == lens2[r] && memcmp(rows + r * max_new, rows2 + r * max_new, lens[r] * sizeof(int)) == 0;
    CHECK(same, "[%s] sampled batch decoding is not reproducible from its seed", name);
    // test-time compute: 8 samples per item, decoded B = 4 rows at a time
    int ns[16];
    double maj[16], pass[16];
    uint64_t rt = 99;
    int nn = eval_test_time_compute(&g, &es, &tk, -1, 0, 8, 0.8f, &rt, ns, maj, pass, &scored);
    int sane = nn == 4 && scored == nitems && fabs(maj[0] - pass[0]) < 1e-12;
    for (int j = 0; j < nn; j++) sane &= maj[j] >= 0 && maj[j] <= pass[j] + 1e-12 && pass[j] <= 1 && (j == 0 || pass[j] >= pass[j - 1]);
    CHECK(sane, "[%s] test-time compute: maj/pass@n out of order", name);
#ifndef PRECISION_BF16
    // at a vanishing temperature every sample is the greedy answer, so maj@n = pass@n = the greedy
    // accuracy for every n (bf16 logits can tie exactly, so only the fp32 build asserts this)
    double maj0[16], pass0[16];
    nn = eval_test_time_compute(&g, &es, &tk, -1, 0, 8, 1e-6f, &rt, ns, maj0, pass0, &scored);
    int greedy_like = 1;
    for (int j = 0; j < nn; j++) greedy_like &= maj0[j] == gacc && pass0[j] == gacc;
    CHECK(greedy_like, "[%s] test-time compute at temperature 1e-6: maj@8 %.3f pass@8 %.3f, greedy accuracy %.3f",
          name, maj0[nn - 1], pass0[nn - 1], gacc);
#endif
    printf("[%s] batched decoding (%d rows) follows the CPU: %s; sampled rows reproducible: %s; maj@8 %.3f pass@8 %.3f\n",
           name, R, bad ? "NO" : "yes", same ? "yes" : "NO", maj[nn - 1], pass[nn - 1]);
    free(text);
    for (int i = 0; i < V; i++) free(tk.tokens[i]);
    free(tk.tokens);
    cpu::evalset_free(&es);
    cpu::model_free(&cm);
    model_free(&g);
}

// ----------------------------------------------------------------------------
// 3. the trainer binary: exact resume, run-to-run determinism, and CPU <-> GPU checkpoints

static void test_trainer_binary(const char* tmp, const char* trainer, const char* cpu_trainer) {
    char cmd[8192], a8[1024], b8[1024], c8[1024], b4[1024], train[1024], val[1024], path[1024];
    char* out;
    if (access(trainer, X_OK) != 0) {
        CHECK(0, "trainer binary '%s' not found (build it first)", trainer);
        return;
    }
    int n = 12000;
    int* toks = (int*)mallocCheck(n * sizeof(int));
    uint64_t rng = 7;
    for (int i = 0; i < n; i++) toks[i] = (i % 41 == 0) ? (int)(cpu::rng_u64(&rng) % 200) : (toks[i ? i - 1 : 0] * 7 + 3) % 200;
    snprintf(train, sizeof train, "%s/tr_000.bin", tmp);
    snprintf(val, sizeof val, "%s/va_000.bin", tmp);
    cpu::write_shard(train, toks, n, 0);
    cpu::write_shard(val, toks, 3000, 0);
    const char* common = "-nv 200 -nl 2 -nc 32 -nh 4 -nkv 2 -ne 4 -nk 2 -nf 48 -b 4 -t 32 -x 8 -u 2 -l 3e-3 -v 4 -m 2 -s 4 -g 8 -k none";
    // straight 8 steps, twice (two processes), and 4 + resume + 4
    snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s' %s -o %s/straight", trainer, train, val, common, tmp);
    int rc1 = run_cmd(cmd, &out);
    int has_mfu = strstr(out, "MFU") != NULL && strstr(out, "tok/s") != NULL && strstr(out, "MiB") != NULL;
    if (rc1 != 0) printf("%s\n", out);
    free(out);
    snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s' %s -o %s/again", trainer, train, val, common, tmp);
    int rc2 = run_cmd(cmd, &out); free(out);
    snprintf(a8, sizeof a8, "%s/straight/model_00000008.bin", tmp);
    snprintf(c8, sizeof c8, "%s/again/model_00000008.bin", tmp);
    int same = rc1 == 0 && rc2 == 0 && files_equal(a8, c8);
    CHECK(same, "two runs of the trainer differ (exit codes %d %d)", rc1, rc2);
    CHECK(has_mfu, "the step line lacks tok/s, MFU or peak memory");
    printf("[trainer] two runs of 8 steps give identical checkpoints: %s\n", same ? "yes" : "NO");
    snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s' %s -n 4 -o %s/resumed", trainer, train, val, common, tmp);
    int rc3 = run_cmd(cmd, &out); free(out);
    snprintf(b8, sizeof b8, "%s/resumed/model_00000008.bin", tmp);
    snprintf(b4, sizeof b4, "%s/resumed/model_00000004.bin", tmp);
    remove(b8); // as if the run had died after step 4
    snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s' %s -n 4 -o %s/resumed -y 1", trainer, train, val, common, tmp);
    int rc4 = run_cmd(cmd, &out);
    int resumed_from_4 = strstr(out, "model_00000004.bin") != NULL;
    free(out);
    same = rc3 == 0 && rc4 == 0 && resumed_from_4 && files_equal(a8, b8);
    CHECK(same, "8 steps straight != 4 + resume + 4 (exit codes %d %d, resumed from step 4: %d)", rc3, rc4, resumed_from_4);
    printf("[trainer] 8 steps straight == 4 + resume + 4, bit for bit (weights, AdamW, data position, RNG): %s\n", same ? "yes" : "NO");
    // the CPU trainer resumes the GPU's step-4 checkpoint, and the GPU trainer the CPU's
    if (access(cpu_trainer, X_OK) == 0) {
        snprintf(cmd, sizeof cmd, "mkdir -p %s/cpu_from_gpu && cp %s %s/cpu_from_gpu/ && %s -i '%s' -j '%s' %s -o %s/cpu_from_gpu -y 1",
                 tmp, b4, tmp, cpu_trainer, train, val, common, tmp);
        int rc5 = run_cmd(cmd, &out);
        int ok5 = rc5 == 0 && strstr(out, "model_00000004.bin with optimizer state") != NULL;
        free(out);
        snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s' %s -n 4 -x 4 -o %s/gpu_from_cpu && %s -i '%s' -j '%s' %s -o %s/gpu_from_cpu -y 1",
                 cpu_trainer, train, val, common, tmp, trainer, train, val, common, tmp);
        int rc6 = run_cmd(cmd, &out);
        int ok6 = rc6 == 0 && strstr(out, "model_00000004.bin with optimizer state") != NULL;
        free(out);
        snprintf(path, sizeof path, "%s/gpu_from_cpu/model_00000008.bin", tmp);
        ok6 = ok6 && access(path, R_OK) == 0;
        CHECK(ok5, "the CPU trainer could not resume the GPU trainer's checkpoint (exit %d)", rc5);
        CHECK(ok6, "the GPU trainer could not resume the CPU trainer's checkpoint (exit %d)", rc6);
        printf("[trainer] CPU resumes a GPU checkpoint: %s; GPU resumes a CPU checkpoint: %s\n", ok5 ? "yes" : "NO", ok6 ? "yes" : "NO");
        // task eval through both binaries on the same checkpoint: the same task loss, and the GPU
        // trainer's eval-only path prints its test-time compute
        EvalSet es;
        memset(&es, 0, sizeof es);
        strcpy(es.name, "synth");
        es.n = 10; es.kind = TASK_MEMORIZATION;
        es.plen = (int*)mallocCheck(es.n * sizeof(int)); es.alen = (int*)mallocCheck(es.n * sizeof(int));
        es.toks = (int**)mallocCheck(es.n * sizeof(int*)); es.ref = (char**)mallocCheck(es.n * sizeof(char*));
        for (int i = 0; i < es.n; i++) {
            es.plen[i] = 3 + i; es.alen[i] = 2 + i % 3;
            es.toks[i] = toks + 100 * i;
            es.ref[i] = (char*)"x";
        }
        snprintf(path, sizeof path, "%s/synth_eval.bin", tmp);
        cpu::write_eval(path, &es, 200);
        free(es.plen); free(es.alen); free(es.toks); free(es.ref);
        double loss[2] = {-1, -1};
        int ttc_line = 0, rc[2];
        for (int side = 0; side < 2; side++) {
            snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s' %s -e %s -ex 1 -ev %s -ea 4 -tn 4", side ? trainer : cpu_trainer,
                     train, val, common, a8, path);
            rc[side] = run_cmd(cmd, &out);
            const char* at = strstr(out, "task synth      | loss ");
            if (at) loss[side] = atof(at + strlen("task synth      | loss "));
            if (side) ttc_line = strstr(out, "task synth      | test-time compute, 4 items") != NULL;
            if (rc[side] != 0 || !at) printf("%s\n", out);
            free(out);
        }
        int ok7 = rc[0] == 0 && rc[1] == 0 && loss[0] > 0 && fabs(loss[1] - loss[0]) <= XFER_TOL * loss[0] + 1e-4 && ttc_line;
        CHECK(ok7, "-ex 1 -ev: task loss CPU %.4f GPU %.4f (exit codes %d %d, test-time compute line %d)", loss[0], loss[1],
              rc[0], rc[1], ttc_line);
        printf("[trainer] -ex 1 -ev on the step-8 checkpoint: task loss CPU %.4f GPU %.4f bits/token, GPU test-time compute: %s\n",
               loss[0], loss[1], ttc_line ? "yes" : "NO");
        // GRPO (-rl, with a KL reference: the GPU's is forward-only) from the same checkpoint and seed on both
        // trainers: the sampler's RNG state and the prompt position in their step-2 checkpoints are the same
        // (one draw per RL step, as train_moe.c); fp32, the first step's rollouts too (its reward and length)
        TrainState rl_st[2];
        double rl_len[2] = {-1, -2}, rl_reward[2] = {-1, -2};
        int rl_ok[2];
        for (int side = 0; side < 2; side++) {
            snprintf(cmd, sizeof cmd, "%s -e %s -rl %s -j '%s' -k none -t 32 -rp 2 -rg 3 -rm 1 -rr 6 -rt 1.0 -rk 0.05 -l 1e-3 "
                     "-x 2 -v 0 -s 0 -o %s/rl_%s", side ? trainer : cpu_trainer, a8, path, val, tmp, side ? "gpu" : "cpu");
            int r = run_cmd(cmd, &out);
            const char* at = strstr(out, "rl step    1/2 |");
            const char* lp = at ? strstr(at, "| len ") : NULL;
            const char* rp = at ? strstr(at, "| reward ") : NULL;
            if (lp) rl_len[side] = atof(lp + strlen("| len "));
            if (rp) rl_reward[side] = atof(rp + strlen("| reward "));
            char ck[1100];
            snprintf(ck, sizeof ck, "%s/rl_%s/model_00000002.bin", tmp, side ? "gpu" : "cpu");
            MoEConfig cc;
            int has_opt = 0;
            FILE* fp = r == 0 ? cpu::checkpoint_open(ck, &cc, &rl_st[side], &has_opt) : NULL;
            rl_ok[side] = fp != NULL && lp != NULL && rp != NULL;
            if (fp) fclose(fp);
            if (!rl_ok[side]) printf("%s\n", out);
            free(out);
        }
        int same_rng = rl_ok[0] && rl_ok[1] && rl_st[0].rng == rl_st[1].rng && rl_st[0].step == 2 && rl_st[1].step == 2 &&
                       memcmp(&rl_st[0].pos, &rl_st[1].pos, sizeof(DataPos)) == 0;
        CHECK(same_rng, "GRPO: the CPU and GPU trainers' step-2 checkpoints hold different RNG states or prompt positions "
              "(runs ok: CPU %d GPU %d)", rl_ok[0], rl_ok[1]);
#ifndef PRECISION_BF16
        CHECK(rl_len[0] == rl_len[1] && rl_reward[0] == rl_reward[1], "GRPO step 1 from the same checkpoint and seed: CPU "
              "rollouts' length %.1f reward %.3f, GPU %.1f %.3f", rl_len[0], rl_reward[0], rl_len[1], rl_reward[1]);
#endif
        printf("[trainer] GRPO from one checkpoint and seed: RNG state and prompt position after 2 RL steps CPU == GPU: %s; "
               "step 1 rollouts: length %.1f vs %.1f, reward %.3f vs %.3f\n", same_rng ? "yes" : "NO", rl_len[0], rl_len[1],
               rl_reward[0], rl_reward[1]);
        // non-finite router logits: the step-8 checkpoint with huge (finite, so it loads) router weights
        // and norm in layer 1, whose logits then all overflow: both trainers stop at step 1, same message
        cpu::Model bm;
        TrainState bst;
        char bad[1024];
        snprintf(bad, sizeof bad, "%s/router_overflow.bin", tmp);
        int made = cpu::checkpoint_load(&bm, a8, &bst, 0) == 0;
        if (made) {
            int E = bm.config.E, C = bm.config.C;
            for (size_t i = 0; i < (size_t)E * C; i++) bm.params.wr[(size_t)E * C + i] = FLT_MAX;
            for (int i = 0; i < C; i++) bm.params.moe_norm[C + i] = 1e4f;
            cpu::checkpoint_save(&bm, bad, 0, &bst);
            cpu::model_free(&bm);
        }
        const char* want = "Error: step 1, layer 1: non-finite router logits (NaN or Inf) for 128 of 128 tokens";
        int stopped[2];
        for (int side = 0; side < 2; side++) {
            snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s' %s -e %s -x 1", side ? trainer : cpu_trainer, train, val, common, bad);
            int r = run_cmd(cmd, &out);
            stopped[side] = made && r != 0 && strstr(out, want) != NULL;
            if (!stopped[side]) printf("%s\n", out);
            free(out);
        }
        CHECK(stopped[0] && stopped[1], "non-finite router logits: the trainers did not both stop with '%s' (CPU %d, GPU %d)",
              want, stopped[0], stopped[1]);
        printf("[trainer] non-finite router logits in layer 1: both trainers stop at step 1 with the same message: %s\n",
               stopped[0] && stopped[1] ? "yes" : "NO");
    } else {
        printf("[trainer] %s not built: CPU <-> GPU trainer interchange, task eval and the router check skipped\n", cpu_trainer);
    }
    free(toks);
}

// ----------------------------------------------------------------------------
// GRPO: one update on the GPU against train_moe.c's on the same fixed rollouts (dev/ref NAME_grpo.bin,
// made by dev/moe_ref.py): the first mini-batch's loss, clipped-token count and every gradient, then
// the parameters after its AdamW step. BF16: gradients where the routing agrees with the CPU's, and
// the clipped count may move by a token whose ratio sits within bf16 rounding of 1 +- eps.

static void test_grpo_update(const char* dir, const char* name) {
    char path[1024];
    Model g;
    cpu::Model cm;
    TrainState st;
    snprintf(path, sizeof path, "%s/%s_model.bin", dir, name);
    if (checkpoint_load(&g, path, &st, 0) != 0 || cpu::checkpoint_load(&cm, path, &st, 0) != 0) exit(EXIT_FAILURE);
    snprintf(path, sizeof path, "%s/%s_grpo.bin", dir, name);
    cpu::GrpoRef ref;
    if (cpu::grpo_ref_read(&ref, path, g.config.T, g.num_params) != 0) {
        printf("  FAIL: [%s grpo] cannot read its GRPO reference (above)\n", name);
        n_fail++;
        model_free(&g);
        cpu::model_free(&cm);
        return;
    }
    GrpoConfig gc = ref.gc;
    Rollouts ro = ref.ro;
    memcpy(ro.adv, ref.adv_ref, ro.rows * sizeof(float)); // the reference's advantages
    int rows = ro.rows, T = ro.T, M = gc.M, mb = rows / M;
    const float* opt = ref.opt;
    size_t N = (size_t)rows * T, np = g.num_params;
    float* w = (float*)mallocCheck(N * sizeof(float));
    model_alloc_acts(&g, mb, T);
    cpu::model_alloc_acts(&cm, mb, T);
    GrpoStats gs = {0}, cs = {0};
    model_zero_grad(&g);
    cpu::model_zero_grad(&cm);
    float gl = grpo_backward(&g, ro.x, ro.y, ro.adv, ro.old_logp, ro.ref_logp, mb, T, &gc, w, &gs);
    float cl = cpu::grpo_backward(&cm, ro.x, ro.y, ro.adv, ro.old_logp, ro.ref_logp, mb, T, &gc, w, &cs);
    const MoEConfig* c = &g.config;
    size_t NK = (size_t)mb * T * c->K;
    int* topi = (int*)mallocCheck((size_t)c->L * NK * sizeof(int));
    cudaCheck(cudaMemcpy(topi, g.topi, (size_t)c->L * NK * sizeof(int), cudaMemcpyDeviceToHost));
    int flips = 0;
    for (size_t i = 0; i < (size_t)c->L * NK; i++) flips += topi[i] != cm.topi[i];
    float* gg = download_grads(&g);
    float worst = 0.0f;
    size_t off = 0;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        double gd = 0.0, gr = 0.0;
        for (size_t i = off; i < off + g.param_sizes[t]; i++) {
            double d = (double)gg[i] - cm.grads_memory[i];
            gd += d * d;
            gr += (double)cm.grads_memory[i] * cm.grads_memory[i];
        }
        float rel = gr > 0 ? (float)sqrt(gd / gr) : (float)sqrt(gd);
        worst = fmaxf(worst, rel);
#ifdef PRECISION_BF16
        if (flips == 0) CHECK(rel <= BF16_GRAD, "[%s grpo] grad %s GPU vs CPU relative error %.3e > %.0e", name, param_names[t], rel, BF16_GRAD);
#else
        CHECK(rel <= 1e-4f, "[%s grpo] grad %s GPU vs CPU relative error %.3e > 1e-4", name, param_names[t], rel);
#endif
        off += g.param_sizes[t];
    }
    float gn = global_grad_norm(&g), cn = cpu::global_grad_norm(&cm);
    grpo_adamw(&g, opt[0], opt[1], opt[2], opt[4], gc.decay_matrices_only, 1, opt[5] > 0 && gn > opt[5] ? opt[5] / gn : 1.0f);
    cpu::grpo_adamw(&cm, opt[0], opt[1], opt[2], opt[4], gc.decay_matrices_only, 1,
                    opt[5] > 0 && cn > opt[5] ? opt[5] / cn : 1.0f);
    float* gp = (float*)mallocCheck(np * sizeof(float));
    model_download(&g, gp, NULL, NULL);
    float pmax = 0.0f;
    for (size_t i = 0; i < np; i++) pmax = fmaxf(pmax, fabsf(gp[i] - cm.params_memory[i]));
#ifdef PRECISION_BF16
    CHECK(fabsf(gl - cl) <= BF16_CE, "[%s grpo] loss GPU %.6f vs CPU %.6f", name, gl, cl);
    CHECK(labs(gs.clipped - cs.clipped) <= 1 + cs.tokens / 10, "[%s grpo] clipped tokens GPU %ld vs CPU %ld", name, gs.clipped, cs.clipped);
    CHECK(pmax <= 2.0f * opt[0], "[%s grpo] parameters after the AdamW step: max|diff| %.3e > 2 lr", name, pmax);
#else
    CHECK(fabsf(gl - cl) <= 1e-5f * fmaxf(1.0f, fabsf(cl)), "[%s grpo] loss GPU %.7f vs CPU %.7f", name, gl, cl);
    CHECK(gs.clipped == cs.clipped, "[%s grpo] clipped tokens GPU %ld vs CPU %ld", name, gs.clipped, cs.clipped);
    CHECK(pmax <= 1e-5f, "[%s grpo] parameters after the AdamW step: max|diff| %.3e > 1e-5", name, pmax);
#endif
    printf("[%s grpo] update 1/%d on the GPU vs the CPU: loss %.6f vs %.6f | clipped %ld vs %ld of %ld | worst gradient "
           "relative error %.2e (experts flipped %d) | params after AdamW max|diff| %.2e\n", name, M, gl, cl, gs.clipped,
           cs.clipped, cs.tokens, worst, flips, pmax);
    free(topi); free(gg); free(gp); free(w);
    cpu::grpo_ref_free(&ref);
    model_free(&g);
    cpu::model_free(&cm);
}

// GRPO's frozen reference, forward-only: no gradients, AdamW state or backward scratch (bf16 builds:
// no fp32 master either), at least 3 x 4 bytes per parameter less than a trainable copy, and the very
// logits and losses of one
static void test_forward_only(const char* dir, const char* name) {
    char path[1024];
    Model full, ref;
    TrainState st;
    DebugState d;
    snprintf(path, sizeof path, "%s/%s_model.bin", dir, name);
    size_t at = gpu_bytes_allocated;
    if (checkpoint_load(&full, path, &st, 0) != 0) exit(EXIT_FAILURE);
    snprintf(path, sizeof path, "%s/%s_debug.bin", dir, name);
    debug_read(&d, path, &full.config, full.num_params);
    model_alloc_acts(&full, d.B, d.T);
    size_t full_bytes = gpu_bytes_allocated - at;
    at = gpu_bytes_allocated;
    snprintf(path, sizeof path, "%s/%s_model.bin", dir, name);
    if (checkpoint_load_frozen(&ref, path, &st) != 0) exit(EXIT_FAILURE);
    model_alloc_acts(&ref, d.B, d.T);
    size_t ref_bytes = gpu_bytes_allocated - at; // (bf16: with the upload's staging buffer, freed since)
    size_t n = full.num_params, N = (size_t)d.B * d.T, V = full.config.V;
    int bare = ref.forward_only && !ref.grads_memory && !ref.m_memory && !ref.v_memory && !ref.dres && !ref.dbuf &&
               !ref.dxe && !ref.dh1 && !ref.dact && !ref.token_weights_d && !ref.enc_work;
#ifdef PRECISION_BF16
    bare = bare && !ref.master_memory;
#endif
    CHECK(bare, "[%s] the forward-only reference holds gradients, AdamW state, a master copy or backward scratch", name);
    CHECK(full_bytes >= ref_bytes + 3 * n * sizeof(float), "[%s] forward-only reference: %zu bytes on the GPU, a trainable "
          "copy %zu (want at least %zu less)", name, ref_bytes, full_bytes, 3 * n * sizeof(float));
    model_forward(&full, d.x, d.y, d.B, d.T);
    model_forward(&ref, d.x, d.y, d.B, d.T);
    float* a = (float*)mallocCheck(N * V * sizeof(float));
    float* b = (float*)mallocCheck(N * V * sizeof(float));
    model_logits_to_host(&full, a, 0, N);
    model_logits_to_host(&ref, b, 0, N);
    int same = memcmp(a, b, N * V * sizeof(float)) == 0 && full.loss == ref.loss;
    cudaCheck(cudaMemcpy(a, full.losses, N * sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(b, ref.losses, N * sizeof(float), cudaMemcpyDeviceToHost));
    same = same && memcmp(a, b, N * sizeof(float)) == 0;
    CHECK(same, "[%s] the forward-only reference's logits or losses differ from a trainable copy's", name);
    printf("[%s] forward-only reference: %.2f MiB on the GPU vs %.2f MiB trainable, the same logits and losses: %s\n", name,
           ref_bytes / 1048576.0, full_bytes / 1048576.0, same ? "yes" : "NO");
    free(a); free(b);
    debug_free(&d);
    model_free(&ref);
    model_free(&full);
}

// after pi_old was recomputed (grpo_old_logp): the first mini-batch's update, and its ratios
// pi / pi_old read back from its forward's per-token losses; returns the largest |ratio - 1|, and
// the clipped tokens in *clipped
static float first_update_ratios(Model* g, const Rollouts* ro, const GrpoConfig* gc, float* w, long* clipped) {
    int mb = ro->rows / gc->M, T = ro->T;
    size_t n = (size_t)mb * T;
    GrpoStats gs = {0};
    model_zero_grad(g);
    grpo_backward(g, ro->x, ro->y, ro->adv, ro->old_logp, ro->ref_logp, mb, T, gc, w, &gs);
    float* ce = (float*)mallocCheck(n * sizeof(float));
    cudaCheck(cudaMemcpy(ce, g->losses, n * sizeof(float), cudaMemcpyDeviceToHost));
    float worst = 0.0f;
    for (size_t i = 0; i < n; i++)
        if (ro->y[i] >= 0) worst = fmaxf(worst, fabsf(expf(-ce[i] - ro->old_logp[i]) - 1.0f));
    free(ce);
    *clipped = gs.clipped;
    return worst;
}
#define RATIO_TOL 1e-6f // pi_old comes from the very forward the update runs: its ratios are 1 up to exp's rounding

// pi_old recomputed through the training forward, on the fixed rollouts of dev/ref: the first
// mini-batch's ratios are 1 and nothing is clipped (its advantages made +-1, so a ratio off by more
// than the clip range would be)
static void test_grpo_old_logp(const char* dir, const char* name) {
    char path[1024];
    Model g;
    TrainState st;
    snprintf(path, sizeof path, "%s/%s_model.bin", dir, name);
    if (checkpoint_load(&g, path, &st, 0) != 0) exit(EXIT_FAILURE);
    snprintf(path, sizeof path, "%s/%s_grpo.bin", dir, name);
    cpu::GrpoRef ref;
    if (cpu::grpo_ref_read(&ref, path, g.config.T, g.num_params) != 0) {
        CHECK(0, "[%s grpo] cannot read its GRPO reference (above)", name);
        model_free(&g);
        return;
    }
    GrpoConfig gc = ref.gc;
    Rollouts ro = ref.ro;
    for (int r = 0; r < ro.rows; r++) ro.adv[r] = r % 2 ? 1.0f : -1.0f;
    int mb = ro.rows / gc.M;
    float* w = (float*)mallocCheck((size_t)mb * ro.T * sizeof(float));
    model_alloc_acts(&g, mb, ro.T);
    grpo_old_logp(&g, &ro, gc.M, gc.temp);
    long clipped;
    float worst = first_update_ratios(&g, &ro, &gc, w, &clipped);
    CHECK(worst <= RATIO_TOL && clipped == 0, "[%s grpo] first mini-batch after pi_old's recompute: max|ratio - 1| %.3e > %.0e "
          "or %ld tokens clipped", name, worst, RATIO_TOL, clipped);
    printf("[%s grpo] pi_old through the training forward: first mini-batch max|ratio - 1| %.1e, clipped %ld\n", name, worst,
           clipped);
    free(w);
    cpu::grpo_ref_free(&ref);
    model_free(&g);
}

// rollouts on the GPU against train_moe.c's from the same checkpoint and seed (row r samples from
// hash3(seed, r, 0x7011) on both): fp32, every row the same; bf16, at least half (rounding of the
// logits may move a sample; with one stream drawn row by row, as before, almost none would match).
// Then pi_old through the training forward: the decoder's log-probs are within 1e-4 of it in fp32
// (in bf16 the gap is printed: it is what the recompute removes), and the first ratios are 1.
static void test_grpo_rollouts(const char* dir, const char* name) {
    char path[1024];
    Model g;
    cpu::Model cm;
    TrainState st;
    snprintf(path, sizeof path, "%s/%s_model.bin", dir, name);
    if (checkpoint_load(&g, path, &st, 0) != 0 || cpu::checkpoint_load(&cm, path, &st, 0) != 0) exit(EXIT_FAILURE);
    int T = g.config.T, V = g.config.V, eot = V - 1, plen = 2;
    GrpoConfig gc = {2, 4, T - plen, 2, 0, 1.0f, 0.2f, 0.0f, 0, 0}; // P G R M agg temp clip kl ..
    int rows = gc.P * gc.G, mb = rows / gc.M, items[2] = {0, 1};
    int p0[2] = {1 % V, 5 % V}, p1[2] = {9 % V, 2 % V};
    EvalSet es; // two prompts; a reasoning task (no stop at newlines)
    memset(&es, 0, sizeof es);
    strcpy(es.name, "rollouts");
    int pl[2] = {plen, plen}, al[2] = {1, 1};
    int* toks[2] = {p0, p1};
    char* refs[2] = {(char*)"1", (char*)"2"};
    es.n = 2; es.kind = cpu::TASK_REASONING; es.max_prompt = plen; es.max_answer = gc.R;
    es.plen = pl; es.alen = al; es.toks = toks; es.ref = refs;
    Tokenizer tk;
    memset(&tk, 0, sizeof tk);
    const uint64_t seed = 0xC0FFEE;
    Rollouts cro, gro;
    cpu::rollouts_alloc(&cro, rows, T);
    cpu::rollouts_alloc(&gro, rows, T);
    cpu::Decoders dec = cpu::decoders_make(&cm, T);
    cpu::grpo_rollouts(&dec, &es, items, &gc, &tk, eot, seed, &cro);
    cpu::decoders_free(&dec);
    model_alloc_acts(&g, gc.G > mb ? gc.G : mb, T);
    grpo_rollouts(&g, &es, items, &gc, &tk, eot, seed, &gro);
    int same = 0, tokens = 0;
    for (int r = 0; r < rows; r++) {
        size_t o = (size_t)r * T;
        same += gro.rlen[r] == cro.rlen[r] && memcmp(gro.x + o, cro.x + o, T * sizeof(int)) == 0 &&
                memcmp(gro.y + o, cro.y + o, T * sizeof(int)) == 0;
        tokens += gro.rlen[r];
    }
#ifdef PRECISION_BF16
    CHECK(2 * same >= rows, "[%s] GPU rollouts: %d of %d rows as the CPU's from the same seed (want at least half)", name, same, rows);
#else
    CHECK(same == rows, "[%s] GPU rollouts: %d of %d rows as the CPU's from the same seed", name, same, rows);
#endif
    // pi_old: the decoder's log-probs, then the training forward's
    size_t N = (size_t)rows * T;
    float* dec_logp = (float*)mallocCheck(N * sizeof(float));
    memcpy(dec_logp, gro.old_logp, N * sizeof(float));
    grpo_old_logp(&g, &gro, gc.M, gc.temp);
    float gap = 0.0f, dec_ratio = 0.0f;
    for (size_t i = 0; i < N; i++)
        if (gro.y[i] >= 0) {
            gap = fmaxf(gap, fabsf(dec_logp[i] - gro.old_logp[i]));
            if (i < (size_t)mb * T) dec_ratio = fmaxf(dec_ratio, fabsf(expf(gro.old_logp[i] - dec_logp[i]) - 1.0f));
        }
#ifndef PRECISION_BF16
    CHECK(gap <= 1e-4f, "[%s] the decoder's log-probs vs the training forward's: max|diff| %.3e > 1e-4", name, gap);
#endif
    for (int r = 0; r < rows; r++) gro.adv[r] = r % 2 ? 1.0f : -1.0f;
    float* w = (float*)mallocCheck((size_t)mb * T * sizeof(float));
    long clipped;
    float worst = first_update_ratios(&g, &gro, &gc, w, &clipped);
    CHECK(worst <= RATIO_TOL && clipped == 0, "[%s] first mini-batch of GPU rollouts: max|ratio - 1| %.3e > %.0e or %ld clipped",
          name, worst, RATIO_TOL, clipped);
    printf("[%s] GPU rollouts (%d rows, %d tokens) == the CPU's from the same seed: %d rows; decoder log-probs vs the training "
           "forward's max|diff| %.1e (as pi_old they would put the first ratios off 1 by %.1e); recomputed: %.1e, clipped %ld\n",
           name, rows, tokens, same, gap, dec_ratio, worst, clipped);
    free(dec_logp); free(w);
    cpu::rollouts_free(&cro);
    cpu::rollouts_free(&gro);
    cpu::model_free(&cm);
    model_free(&g);
}

// the cuDNN build must have run attention on cuDNN: a run where every call fell back fails
static void check_cudnn_used(void) {
#ifdef USE_CUDNN
    CHECK(cudnn_att_runs > 0, "USE_CUDNN build: cuDNN attention never executed (%ld calls fell back to the built-in kernels)",
          cudnn_att_fallbacks);
#endif
}

// every GRPO check: each dev/ref case's update against the CPU's, pi_old recomputed (first ratios 1),
// rollouts against the CPU's from one seed, the forward-only reference
static void test_grpo_all(const char* dir) {
    char path[1024], name[256];
    snprintf(path, sizeof path, "%s/grpo_manifest.txt", dir);
    FILE* mf = fopenCheck(path, "r");
    int ngrpo = 0;
    while (fscanf(mf, "%255s", name) == 1) { test_grpo_update(dir, name); test_grpo_old_logp(dir, name); ngrpo++; }
    fclose(mf);
    CHECK(ngrpo >= 4, "only %d GRPO reference cases in %s", ngrpo, path);
    test_grpo_rollouts(dir, "e6");
    test_grpo_rollouts(dir, "gqa");
    test_forward_only(dir, "gqa");
}

int main(int argc, char** argv) {
    int quick = argc > 1 && strcmp(argv[1], "-q") == 0, grpo = argc > 1 && strcmp(argv[1], "-g") == 0;
    if (quick || grpo) { argc--; argv++; }
    const char* dir = argc > 1 ? argv[1] : "dev/ref";
    const char* trainer = argc > 2 ? argv[2] : DEFAULT_TRAINER;
    const char* cpu_trainer = argc > 3 ? argv[3] : "./train_moe";
    gpu_init();
    test_topk_nonfinite();
    test_decode_long();
    test_classifier_chunks();
#ifdef USE_CUDNN
    test_cudnn_cache(dir);
#endif
    if (quick) { // the subset for compute-sanitizer: every kernel of the forward, backward and update, small
        char tmp[] = "/tmp/test_moe_cu_XXXXXX";
        if (!mkdtemp(tmp)) { perror("mkdtemp"); return 1; }
        test_reference(dir, "gqa");
        test_determinism_and_resume(dir, "gqa", tmp);
        rmdir(tmp);
        check_cudnn_used();
        gpu_free();
        printf("quick subset (-q): %d passed, %d failed\n", n_pass, n_fail);
        return n_fail ? 1 : 0;
    }
    if (grpo) { // GRPO on the GPU against the CPU, nothing else
        test_grpo_all(dir);
        check_cudnn_used();
        gpu_free();
        printf("GRPO subset (-g): %d passed, %d failed\n", n_pass, n_fail);
        return n_fail ? 1 : 0;
    }
    char path[1024], name[256];
    snprintf(path, sizeof path, "%s/manifest.txt", dir);
    FILE* mf = fopenCheck(path, "r");
    int nconf = 0;
    char first[256] = "";
    while (fscanf(mf, "%255s", name) == 1) {
        test_reference(dir, name);
        if (!nconf) strcpy(first, name);
        nconf++;
    }
    fclose(mf);
    CHECK(nconf >= 6, "only %d reference configurations in %s", nconf, path);
    char tmp[] = "/tmp/test_moe_cu_XXXXXX";
    if (!mkdtemp(tmp)) { perror("mkdtemp"); return 1; }
    test_checkpoint_interchange(dir, first, tmp);
    test_determinism_and_resume(dir, first, tmp);
    test_task_eval(dir, "gqa");
    test_task_eval(dir, "mqa");
    test_grpo_all(dir);
    test_trainer_binary(tmp, trainer, cpu_trainer);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    if (system(cmd) != 0) printf("(could not remove %s)\n", tmp);
    check_cudnn_used();
    gpu_free();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
