/*
Router + top-k: logits z = m . wr^T (fp32), their logsumexp, the K largest logits of each token
(ties towards the lower expert index; a NaN logit ranks as -inf, so every pick is a real expert) and
the gates (softmax over the K chosen logits), and the number of tokens whose logits are not all
finite (an integer count, which the trainer turns into an error).
CPU reference: router_forward + topk_forward of train_moe.c.

Build: make router_topk      (nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fopenmp -DOMP router_topk.cu -lcublas -lcublasLt -o router_topk)
Run:   ./router_topk [version]

version 1: cublasSgemm for the logits, then one thread per token: lse, K selection passes over E, gates
version 2: cublasSgemm for the logits, then one warp per token: the token's E logits live in the
           lanes' registers; max, logsumexp and each of the K argmax rounds are warp shuffles

The logits matmul is the same cuBLAS call in both versions and is validated once; the top-k kernels
are then validated on the CPU's own logits (so a near-tie is never decided by matmul rounding) and
benchmarked alone, against HBM bandwidth (bytes: z read, lse, topi, gate written). A last case poisons
a fifth of the tokens' logits with NaN, +Inf and -Inf (one NaN, one +Inf, one -Inf, or all NaN): the
picks and the count of non-finite tokens must be the CPU's exactly.
Tolerances: z 1e-4 (fp32 GEMM, summation order differs), lse and gates 1e-5, topi and the count exact.
*/
#define TESTING
#define MOE_LAYERS_ONLY // the layers, the model and AdamW of train_moe.c: nothing after them
#include "../../train_moe.c"
#include "common.h"

#define TOPK_MAX_K 32      // a token's K picks are held by lanes 0..K-1 in version 2
#define TOPK_MAX_E 256     // version 2 keeps E/32 logits per lane in registers

// ----------------------------------------------------------------------------
// the logits: z[N,E] = m[N,C] . wr[E,C]^T, fp32 (cuBLAS is column-major: z^T = wr . m^T)

void router_logits_gpu(float* z, const float* m, const float* wr, int N, int C, int E) {
    const float one = 1.0f, zero = 0.0f;
    cublasCheck(cublasSgemm(lab_cublas(), CUBLAS_OP_T, CUBLAS_OP_N, E, N, C, &one, wr, C, m, C, &zero, z, E));
}

// ----------------------------------------------------------------------------
// version 1: one thread per token

// (a, ia) ranks above (b, ib): larger logit first, equal logits: lower expert index first
__device__ __forceinline__ bool topk_before(float a, int ia, float b, int ib) {
    return a > b || (a == b && ia < ib);
}
// the value a logit is ranked by: NaN as -inf (as train_moe.c's topk_forward), so the order is total
__device__ __forceinline__ float topk_rank(float z) { return isnan(z) ? -INFINITY : z; }

__global__ void router_topk_kernel1(int* topi, float* gate, float* lse, int* nonfinite, const float* z, int N, int E, int K) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* zn = z + (size_t)n * E; // seek to z[n,:]
    float mx = zn[0];
    int finite = 1;
    for (int e = 1; e < E; e++) if (zn[e] > mx) mx = zn[e];
    for (int e = 0; e < E; e++) finite &= isfinite(zn[e]);
    if (!finite) atomicAdd(nonfinite, 1);
    float s = 0.0f;
    for (int e = 0; e < E; e++) s += expf(zn[e] - mx);
    lse[n] = mx + logf(s);
    // pass j takes the best expert ranked strictly below pick j-1 (so no "taken" list is needed)
    int* ti = topi + (size_t)n * K;
    float* g = gate + (size_t)n * K;
    float prev_v = INFINITY;
    int prev_e = -1;
    for (int j = 0; j < K; j++) {
        int best = -1;
        float bv = 0.0f;
        for (int e = 0; e < E; e++) {
            float ze = topk_rank(zn[e]);
            if (!topk_before(prev_v, prev_e, ze, e)) continue; // already taken
            if (best < 0 || ze > bv) { best = e; bv = ze; }
        }
        ti[j] = best;
        prev_v = bv;
        prev_e = best;
    }
    // gates: softmax over the K chosen logits (the first is the largest)
    float gmax = zn[ti[0]], gs = 0.0f;
    for (int j = 0; j < K; j++) { g[j] = expf(zn[ti[j]] - gmax); gs += g[j]; }
    for (int j = 0; j < K; j++) g[j] /= gs;
}

void router_topk1(int* topi, float* gate, float* lse, int* nonfinite, const float* z, int N, int E, int K) {
    int block = 128;
    router_topk_kernel1<<<ceil_div(N, block), block>>>(topi, gate, lse, nonfinite, z, N, E, K);
    cudaCheckLast();
}

// ----------------------------------------------------------------------------
// version 2: one warp per token, logits in registers, shuffles for every reduction

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__global__ void router_topk_kernel2(int* topi, float* gate, float* lse, int* nonfinite, const float* z, int N, int E, int K) {
    constexpr int PER_LANE = TOPK_MAX_E / 32;
    int lane = threadIdx.x % 32;
    int n = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (n >= N) return; // whole warps leave together
    const float* zn = z + (size_t)n * E;
    float v[PER_LANE]; // lane holds experts lane, lane+32, lane+64, ...
    #pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        int e = lane + 32 * i;
        v[i] = e < E ? zn[e] : -INFINITY;
    }
    float mx = -INFINITY; // (fmaxf passes over a NaN; the sum below still turns it into a NaN lse, as on the CPU)
    int finite = 1;
    #pragma unroll
    for (int i = 0; i < PER_LANE; i++) { mx = fmaxf(mx, v[i]); finite &= isfinite(v[i]) || lane + 32 * i >= E; }
    mx = warp_max(mx);
    if (!__all_sync(0xffffffffu, finite) && lane == 0) atomicAdd(nonfinite, 1);
    float s = 0.0f;
    #pragma unroll
    for (int i = 0; i < PER_LANE; i++) if (lane + 32 * i < E) s += expf(v[i] - mx);
    s = warp_sum(s);
    if (lane == 0) lse[n] = mx + logf(s);

    unsigned taken = 0;     // bit i: expert lane+32i already chosen
    int my_expert = 0;      // lane j < K keeps pick j
    int top_expert = 0;
    for (int j = 0; j < K; j++) {
        // the lane's best expert not yet taken (i ascending = expert ascending, so '>' keeps the lower)
        float bv = -INFINITY;
        int be = -1;
        #pragma unroll
        for (int i = 0; i < PER_LANE; i++) {
            int e = lane + 32 * i;
            float r = topk_rank(v[i]);
            if (e < E && !((taken >> i) & 1u) && (be < 0 || r > bv)) { bv = r; be = e; }
        }
        // warp argmax, ties to the lower expert index
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oe = __shfl_xor_sync(0xffffffffu, be, o);
            if (oe >= 0 && (be < 0 || topk_before(ov, oe, bv, be))) { bv = ov; be = oe; }
        }
        if (be % 32 == lane) taken |= 1u << (be / 32);
        if (lane == j) my_expert = be;
        if (j == 0) top_expert = be;
    }
    float g = lane < K ? expf(zn[my_expert] - zn[top_expert]) : 0.0f; // the logits themselves, NaN included
    float gs = warp_sum(g);
    if (lane < K) {
        topi[(size_t)n * K + lane] = my_expert;
        gate[(size_t)n * K + lane] = g / gs;
    }
}

void router_topk2(int* topi, float* gate, float* lse, int* nonfinite, const float* z, int N, int E, int K) {
    if (E > TOPK_MAX_E || K > TOPK_MAX_K) { fprintf(stderr, "router_topk2: E <= %d, K <= %d\n", TOPK_MAX_E, TOPK_MAX_K); exit(EXIT_FAILURE); }
    int block = 256;
    router_topk_kernel2<<<ceil_div((long long)N * 32, block), block>>>(topi, gate, lse, nonfinite, z, N, E, K);
    cudaCheckLast();
}

// ----------------------------------------------------------------------------
// dispatcher

// *nonfinite (device) += the tokens whose logits are not all finite
void router_topk_gpu(int version, int* topi, float* gate, float* lse, int* nonfinite, const float* z, int N, int E, int K) {
    switch (version) {
        case 1: router_topk1(topi, gate, lse, nonfinite, z, N, E, K); break;
        case 2: router_topk2(topi, gate, lse, nonfinite, z, N, E, K); break;
        default: fprintf(stderr, "router_topk: no version %d\n", version); exit(EXIT_FAILURE);
    }
}
#define NUM_VERSIONS 2

// ----------------------------------------------------------------------------
// inputs: m[N,C] ~ N(0,1) and wr[E,C] ~ N(0,0.02) (Megatron init). Skewed routing: column 0 of m
// is 1 and wr[e,0] a bias that falls with e, so low experts take most tokens; the upper half of
// the experts (beyond max(2K, E/2)) get a bias of -30 and receive no token at all.

void make_router_inputs(float* m, float* wr, int N, int C, int E, int K, int skew) {
    for (size_t i = 0; i < (size_t)N * C; i++) m[i] = lab_rand_normal();
    for (size_t i = 0; i < (size_t)E * C; i++) wr[i] = 0.02f * lab_rand_normal();
    if (!skew) return;
    int live = 2 * K > E / 2 ? 2 * K : E / 2;
    if (live > E) live = E;
    for (int n = 0; n < N; n++) m[(size_t)n * C] = 1.0f;
    for (int e = 0; e < E; e++) wr[(size_t)e * C] = e < live ? -0.25f * e : -30.0f;
}

int main(int argc, char** argv) {
    lab_seed(42);
    lab_device_init();
    int want = lab_version_arg(argc, argv);
    struct { int C, E, K, skew; } cases[] = {{512, 16, 2, 0}, {1024, 8, 2, 0}, {1024, 128, 8, 0}, {1024, 128, 8, 1}};
    const int N = 8192; // B*T tokens
    for (const auto& cs : cases) {
        int C = cs.C, E = cs.E, K = cs.K;
        char name[64];
        snprintf(name, sizeof(name), "N%d_C%d_E%d_K%d_%s", N, C, E, K, cs.skew ? "skew" : "bal");
        printf("\n== router_topk %s\n", name);
        float* m = (float*)mallocCheck((size_t)N * C * sizeof(float));
        float* wr = (float*)mallocCheck((size_t)E * C * sizeof(float));
        make_router_inputs(m, wr, N, C, E, K, cs.skew);
        // CPU reference
        float* z = (float*)mallocCheck((size_t)N * E * sizeof(float));
        float* lse = (float*)mallocCheck((size_t)N * sizeof(float));
        int* topi = (int*)mallocCheck((size_t)N * K * sizeof(int));
        float* gate = (float*)mallocCheck((size_t)N * K * sizeof(float));
        router_forward(z, lse, m, wr, N, C, E);
        int bad = topk_forward(topi, gate, z, N, E, K);
        int* counts = (int*)callocCheck(E, sizeof(int));
        for (int s = 0; s < N * K; s++) counts[topi[s]]++;
        int cmax = 0, empty = 0;
        for (int e = 0; e < E; e++) { if (counts[e] > cmax) cmax = counts[e]; if (counts[e] == 0) empty++; }
        printf("load: busiest expert %d slots (mean %d), %d experts empty\n", cmax, N * K / E, empty);

        float* d_m = cuda_malloc_copy(m, (size_t)N * C);
        float* d_wr = cuda_malloc_copy(wr, (size_t)E * C);
        float* d_z = cuda_calloc<float>((size_t)N * E);
        float* d_lse = cuda_calloc<float>(N);
        int* d_topi = cuda_calloc<int>((size_t)N * K);
        float* d_gate = cuda_calloc<float>((size_t)N * K);
        int* d_bad = cuda_calloc<int>(1);
        // the logits (shared by every version)
        router_logits_gpu(d_z, d_m, d_wr, N, C, E);
        validate_result(d_z, z, "z", (size_t)N * E, 1e-4);
        float ms = benchmark_kernel(20, router_logits_gpu, d_z, d_m, d_wr, N, C, E);
        printf("router logits (cublasSgemm): %.4f ms\n", ms);
        cudaCheck(cudaMemcpy(d_z, z, (size_t)N * E * sizeof(float), cudaMemcpyHostToDevice)); // CPU logits in

        for (int v = 1; v <= NUM_VERSIONS; v++) {
            if (want && v != want) continue;
            printf("version %d\n", v);
            cudaCheck(cudaMemset(d_topi, 0xff, (size_t)N * K * sizeof(int))); // a stale or missing write fails
            cudaCheck(cudaMemset(d_gate, 0xff, (size_t)N * K * sizeof(float))); // (0xffffffff is a NaN)
            cudaCheck(cudaMemset(d_lse, 0xff, (size_t)N * sizeof(float)));
            cudaCheck(cudaMemset(d_bad, 0, sizeof(int)));
            router_topk_gpu(v, d_topi, d_gate, d_lse, d_bad, d_z, N, E, K);
            int ok = validate_result(d_lse, lse, "lse", N, 1e-5);
            ok &= validate_result(d_topi, topi, "topi", (size_t)N * K, 0.0);
            ok &= validate_result(d_gate, gate, "gate", (size_t)N * K, 1e-5);
            ok &= validate_result(d_bad, &bad, "nonfinite", 1, 0.0);
            float t = ok ? benchmark_kernel(50, router_topk_gpu, v, d_topi, d_gate, d_lse, d_bad, (const float*)d_z, N, E, K) : 0.0f;
            double bytes = (double)N * E * 4 + (double)N * 4 + (double)N * K * 8;
            print_result("router_topk", v, name, ok, t, bytes, 0, PEAK_HBM);
        }
        cudaCheck(cudaFree(d_m)); cudaCheck(cudaFree(d_wr)); cudaCheck(cudaFree(d_z)); cudaCheck(cudaFree(d_lse));
        cudaCheck(cudaFree(d_topi)); cudaCheck(cudaFree(d_gate)); cudaCheck(cudaFree(d_bad));
        free(m); free(wr); free(z); free(lse); free(topi); free(gate); free(counts);
    }
    // non-finite logits: the picks (NaN ranks as -inf) and the count, exactly as the CPU's
    struct { int E, K; } poisoned[] = {{8, 2}, {128, 8}};
    for (const auto& cs : poisoned) {
        int E = cs.E, K = cs.K;
        char name[64];
        snprintf(name, sizeof(name), "N%d_E%d_K%d_nonfinite", N, E, K);
        printf("\n== router_topk %s\n", name);
        float* z = make_router_logits(N, E, K, 0);
        for (int n = 0; n < N; n++) { // a fifth of the tokens: one NaN, one +Inf, one -Inf, or every logit NaN
            float* zn = z + (size_t)n * E;
            int e = (n / 5) % E;
            if (n % 20 == 0) zn[e] = NAN;
            else if (n % 20 == 5) zn[e] = INFINITY;
            else if (n % 20 == 10) zn[e] = -INFINITY;
            else if (n % 20 == 15) for (int i = 0; i < E; i++) zn[i] = NAN;
        }
        int* topi = (int*)mallocCheck((size_t)N * K * sizeof(int));
        float* gate = (float*)mallocCheck((size_t)N * K * sizeof(float));
        int bad = topk_forward(topi, gate, z, N, E, K);
        printf("CPU: %d of %d tokens with non-finite logits\n", bad, N);
        float* d_z = cuda_malloc_copy(z, (size_t)N * E);
        float* d_lse = cuda_calloc<float>(N);
        int* d_topi = cuda_calloc<int>((size_t)N * K);
        float* d_gate = cuda_calloc<float>((size_t)N * K);
        int* d_bad = cuda_calloc<int>(1);
        for (int v = 1; v <= NUM_VERSIONS; v++) {
            if (want && v != want) continue;
            printf("version %d\n", v);
            cudaCheck(cudaMemset(d_topi, 0xff, (size_t)N * K * sizeof(int)));
            cudaCheck(cudaMemset(d_bad, 0, sizeof(int)));
            router_topk_gpu(v, d_topi, d_gate, d_lse, d_bad, d_z, N, E, K);
            int ok = validate_result(d_topi, topi, "topi", (size_t)N * K, 0.0);
            ok &= validate_result(d_bad, &bad, "nonfinite", 1, 0.0);
            float t = ok ? benchmark_kernel(50, router_topk_gpu, v, d_topi, d_gate, d_lse, d_bad, (const float*)d_z, N, E, K) : 0.0f;
            double bytes = (double)N * E * 4 + (double)N * 4 + (double)N * K * 8;
            print_result("router_topk", v, name, ok, t, bytes, 0, PEAK_HBM);
        }
        cudaCheck(cudaFree(d_z)); cudaCheck(cudaFree(d_lse)); cudaCheck(cudaFree(d_topi)); cudaCheck(cudaFree(d_gate));
        cudaCheck(cudaFree(d_bad));
        free(z); free(topi); free(gate);
    }
    return lab_exit_code();
}
