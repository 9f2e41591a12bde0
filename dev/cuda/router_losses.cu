/*
Router losses and the router backward.
Forward:  aux = E * sum_e f_e * P_e   (f_e = counts_e / (N*K), no gradient; P_e = mean_n softmax(z_n)_e)
          zl  = mean_n lse_n^2
Backward: dz[N,E] (=) from the gates (dgate through the softmax over the K chosen logits), the aux loss
          (scaled by daux) and the z-loss (scaled by dzl).
CPU reference: router_losses, router_backward of train_moe.c (lse from router_forward).

Build: make router_losses      (nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fopenmp -DOMP router_losses.cu -lcublas -lcublasLt -o router_losses)
Run:   ./router_losses [version]

version 1: forward: one thread per expert, each summing its column of softmax(z) over all N tokens
           in order (in double, as the CPU does), then one thread finishes aux and zl.
           backward: one thread per token, the CPU's loops as they are
version 2: forward: a deterministic two-stage reduction: each block sums its own chunk of tokens
           (threads split (token, expert), a fixed-order tree in shared memory), one block adds
           the per-block partials in block order. backward: one warp per token, the token's E
           logits in registers, sum_e f_e p_e by warp shuffles, coalesced stores

Validated at the full shapes, benchmarked against HBM bandwidth; bytes: forward N*E*4 + N*4,
backward 2*N*E*4 + N*4 + 3*N*K*4.
Tolerances: aux, zl 1e-5 relative; dz atol 1e-5 * max|dz| plus rtol 1e-4, in two settings: gates
and both losses together (daux 1e-2, dzl 1e-3, random dgate), and the two losses alone
(dgate = 0, daux = dzl = 1) so their small terms are not hidden by the gate term.
*/
#define TESTING
#define MOE_LAYERS_ONLY // the layers, the model and AdamW of train_moe.c: nothing after them
#include "../../train_moe.c"
#include "common.h"

#define RL_MAX_E 256

// ----------------------------------------------------------------------------
// version 1

// loss[0] = aux, loss[1] = zl
__global__ void router_losses_forward_kernel1(float* loss, const float* z, const float* lse, const int* counts,
                                              int N, int E, int K) {
    __shared__ double P[RL_MAX_E];
    int e = threadIdx.x;
    if (e < E) {
        double p = 0.0;
        for (int n = 0; n < N; n++) p += expf(z[(size_t)n * E + e] - lse[n]);
        P[e] = p;
    }
    __syncthreads();
    if (e == 0) {
        double zs = 0.0;
        for (int n = 0; n < N; n++) zs += (double)lse[n] * lse[n];
        double a = 0.0;
        for (int i = 0; i < E; i++) a += ((double)counts[i] / ((double)N * K)) * (P[i] / N);
        loss[0] = (float)(E * a);
        loss[1] = (float)(zs / N);
    }
}

__global__ void router_backward_kernel1(float* dz, const float* dgate, const float* z, const float* lse, const int* topi,
                                        const float* gate, const int* counts, float daux, float dzl, int N, int E, int K) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* zn = z + (size_t)n * E;
    float* d = dz + (size_t)n * E;
    float fp = 0.0f; // sum_e f_e p_e
    for (int e = 0; e < E; e++) fp += ((float)counts[e] / ((float)N * K)) * expf(zn[e] - lse[n]);
    for (int e = 0; e < E; e++) {
        float f = (float)counts[e] / ((float)N * K);
        float p = expf(zn[e] - lse[n]);
        d[e] = daux * E / N * p * (f - fp) + dzl * 2.0f / N * lse[n] * p;
    }
    const float* g = gate + (size_t)n * K;
    const float* dg = dgate + (size_t)n * K;
    float gdg = 0.0f;
    for (int j = 0; j < K; j++) gdg += g[j] * dg[j];
    for (int j = 0; j < K; j++) d[topi[n * K + j]] += g[j] * (dg[j] - gdg);
}

// ----------------------------------------------------------------------------
// version 2

#define RL2_BLOCK 256

// stage 1: block b sums tokens [b*chunk, (b+1)*chunk). Thread t takes expert t % E and every
// R-th token of the chunk (R = blockDim / E), then the R partial sums of each expert meet in a
// fixed-order tree. part[b*(E+1) + e] = sum of p over the chunk, part[b*(E+1) + E] = sum of lse^2.
__global__ void router_losses_partial_kernel2(float* part, const float* z, const float* lse, int N, int E, int chunk) {
    __shared__ float s[RL2_BLOCK];
    __shared__ float sz[RL2_BLOCK];
    int t = threadIdx.x, R = blockDim.x / E;
    int e = t % E, r = t / E;
    int n0 = blockIdx.x * chunk, n1 = min(n0 + chunk, N);
    float acc = 0.0f, accz = 0.0f;
    if (r < R) {
        for (int n = n0 + r; n < n1; n += R) {
            float l = lse[n];
            acc += expf(z[(size_t)n * E + e] - l);
            if (e == 0) accz += l * l;
        }
    }
    s[t] = acc;
    sz[t] = accz;
    __syncthreads();
    if (t < E) { // expert t adds its R partials in order of r
        float p = 0.0f, q = 0.0f;
        for (int i = 0; i < R; i++) { p += s[i * E + t]; q += sz[i * E + t]; }
        part[(size_t)blockIdx.x * (E + 1) + t] = p;
        if (t == 0) part[(size_t)blockIdx.x * (E + 1) + E] = q;
    }
}

// stage 2: one block; thread e adds the G partials of expert e in block order (double)
__global__ void router_losses_final_kernel2(float* loss, const float* part, const int* counts, int G, int N, int E, int K) {
    __shared__ double P[RL_MAX_E + 1];
    int e = threadIdx.x;
    if (e <= E) {
        double p = 0.0;
        for (int b = 0; b < G; b++) p += part[(size_t)b * (E + 1) + e];
        P[e] = p;
    }
    __syncthreads();
    if (e == 0) {
        double a = 0.0;
        for (int i = 0; i < E; i++) a += ((double)counts[i] / ((double)N * K)) * (P[i] / N);
        loss[0] = (float)(E * a);
        loss[1] = (float)(P[E] / N);
    }
}

static float* rl2_part = NULL;
static size_t rl2_part_n = 0;

void router_losses_forward2(float* loss, const float* z, const float* lse, const int* counts, int N, int E, int K) {
    int G = 128;
    int chunk = ceil_div(N, G);
    G = ceil_div(N, chunk);
    size_t need = (size_t)G * (E + 1);
    if (need > rl2_part_n) {
        if (rl2_part) cudaCheck(cudaFree(rl2_part));
        cudaCheck(cudaMalloc(&rl2_part, need * sizeof(float)));
        rl2_part_n = need;
    }
    router_losses_partial_kernel2<<<G, RL2_BLOCK>>>(rl2_part, z, lse, N, E, chunk);
    cudaCheckLast();
    router_losses_final_kernel2<<<1, ceil_div(E + 1, 32) * 32>>>(loss, rl2_part, counts, G, N, E, K);
    cudaCheckLast();
}

__global__ void router_backward_kernel2(float* dz, const float* dgate, const float* z, const float* lse, const int* topi,
                                        const float* gate, const int* counts, float daux, float dzl, int N, int E, int K) {
    constexpr int PER_LANE = RL_MAX_E / 32;
    int n = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const float* zn = z + (size_t)n * E;
    float l = lse[n];
    float p[PER_LANE], f[PER_LANE];
    float fp = 0.0f;
    #pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        int e = lane + 32 * i;
        p[i] = e < E ? expf(zn[e] - l) : 0.0f;
        f[i] = e < E ? (float)counts[e] / ((float)N * K) : 0.0f;
        fp += f[i] * p[i];
    }
    for (int o = 16; o > 0; o >>= 1) fp += __shfl_xor_sync(0xffffffffu, fp, o);
    float d[PER_LANE];
    #pragma unroll
    for (int i = 0; i < PER_LANE; i++) d[i] = daux * E / N * p[i] * (f[i] - fp) + dzl * 2.0f / N * l * p[i];
    // the gates: every lane computes sum_j g_j dg_j itself, in the CPU's order
    const float* g = gate + (size_t)n * K;
    const float* dg = dgate + (size_t)n * K;
    float gdg = 0.0f;
    for (int j = 0; j < K; j++) gdg += g[j] * dg[j];
    for (int j = 0; j < K; j++) {
        int e = topi[n * K + j];
        #pragma unroll
        for (int i = 0; i < PER_LANE; i++)
            if (lane + 32 * i == e) d[i] += g[j] * (dg[j] - gdg);
    }
    #pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        int e = lane + 32 * i;
        if (e < E) dz[(size_t)n * E + e] = d[i];
    }
}

// ----------------------------------------------------------------------------
// dispatchers

#define NUM_VERSIONS 2

void router_losses_gpu(int version, float* loss, const float* z, const float* lse, const int* counts, int N, int E, int K) {
    if (E > RL_MAX_E) { fprintf(stderr, "router_losses: E <= %d\n", RL_MAX_E); exit(EXIT_FAILURE); }
    switch (version) {
        case 1:
            router_losses_forward_kernel1<<<1, ceil_div(E, 32) * 32>>>(loss, z, lse, counts, N, E, K);
            cudaCheckLast();
            break;
        case 2: router_losses_forward2(loss, z, lse, counts, N, E, K); break;
        default: fprintf(stderr, "router_losses: no version %d\n", version); exit(EXIT_FAILURE);
    }
}
void router_backward_gpu(int version, float* dz, const float* dgate, const float* z, const float* lse, const int* topi,
                         const float* gate, const int* counts, float daux, float dzl, int N, int E, int K) {
    switch (version) {
        case 1:
            router_backward_kernel1<<<ceil_div(N, 128), 128>>>(dz, dgate, z, lse, topi, gate, counts, daux, dzl, N, E, K);
            break;
        case 2:
            router_backward_kernel2<<<ceil_div((long long)N * 32, 256), 256>>>(dz, dgate, z, lse, topi, gate, counts, daux, dzl, N, E, K);
            break;
        default: fprintf(stderr, "router_losses: no version %d\n", version); exit(EXIT_FAILURE);
    }
    cudaCheckLast();
}

// ----------------------------------------------------------------------------

int main(int argc, char** argv) {
    lab_seed(42);
    lab_device_init();
    int want = lab_version_arg(argc, argv);
    struct { int E, K, skew; } cases[] = {{16, 2, 0}, {8, 2, 0}, {128, 8, 0}, {128, 8, 1}};
    const int N = 8192;
    for (const auto& cs : cases) {
        int E = cs.E, K = cs.K, NK = N * K;
        char name[64];
        snprintf(name, sizeof(name), "N%d_E%d_K%d_%s", N, E, K, cs.skew ? "skew" : "bal");
        printf("\n== router_losses %s\n", name);
        // logits and lse through router_forward itself (identity router: C = E, wr = I, so z = the logits)
        float* zin = make_router_logits(N, E, K, cs.skew);
        float* eye = (float*)callocCheck((size_t)E * E, sizeof(float));
        for (int e = 0; e < E; e++) eye[(size_t)e * E + e] = 1.0f;
        float* z = (float*)mallocCheck((size_t)N * E * sizeof(float));
        float* lse = (float*)mallocCheck((size_t)N * sizeof(float));
        router_forward(z, lse, zin, eye, N, E, E);
        int* topi = (int*)mallocCheck((size_t)NK * sizeof(int));
        float* gate = (float*)mallocCheck((size_t)NK * sizeof(float));
        topk_forward(topi, gate, z, N, E, K);
        int* counts = (int*)callocCheck(E, sizeof(int));
        for (int s = 0; s < NK; s++) counts[topi[s]]++;
        lab_print_load(counts, E);
        float loss[2];
        router_losses(&loss[0], &loss[1], z, lse, counts, N, N, E, K);
        printf("aux %.6f  zl %.6f\n", loss[0], loss[1]);
        float* dgate = make_random_float(NK);
        float* zeros = make_zeros_float(NK);
        float* dz_full = (float*)mallocCheck((size_t)N * E * sizeof(float));
        float* dz_aux = (float*)mallocCheck((size_t)N * E * sizeof(float));
        router_backward(dz_full, dgate, z, lse, topi, gate, counts, N, 1e-2f, 1e-3f, N, E, K);
        router_backward(dz_aux, zeros, z, lse, topi, gate, counts, N, 1.0f, 1.0f, N, E, K);
        float s_full = lab_max_abs(dz_full, (size_t)N * E), s_aux = lab_max_abs(dz_aux, (size_t)N * E);

        float* d_z = cuda_malloc_copy(z, (size_t)N * E);
        float* d_lse = cuda_malloc_copy(lse, N);
        int* d_topi = cuda_malloc_copy(topi, NK);
        float* d_gate = cuda_malloc_copy(gate, NK);
        int* d_counts = cuda_malloc_copy(counts, E);
        float* d_dgate = cuda_malloc_copy(dgate, NK);
        float* d_zeros = cuda_malloc_copy(zeros, NK);
        float* d_dz = cuda_calloc<float>((size_t)N * E);
        float* d_loss = cuda_calloc<float>(2);
        for (int v = 1; v <= NUM_VERSIONS; v++) {
            if (want && v != want) continue;
            printf("version %d\n", v);
            char cname[96];
            cudaCheck(cudaMemset(d_loss, 0xff, 2 * sizeof(float))); // NaN until written
            router_losses_gpu(v, d_loss, d_z, d_lse, d_counts, N, E, K);
            int ok = validate_result(d_loss, loss, "aux,zl", 2, 1e-5);
            float t = ok ? benchmark_kernel(20, router_losses_gpu, v, d_loss, (const float*)d_z, (const float*)d_lse,
                                            (const int*)d_counts, N, E, K) : 0.0f;
            snprintf(cname, sizeof(cname), "fwd_%s", name);
            print_result("router_losses", v, cname, ok, t, (double)N * E * 4 + N * 4.0, 0, PEAK_HBM);

            cudaCheck(cudaMemset(d_dz, 0xff, (size_t)N * E * sizeof(float)));
            router_backward_gpu(v, d_dz, d_dgate, d_z, d_lse, d_topi, d_gate, d_counts, 1e-2f, 1e-3f, N, E, K);
            ok = validate_result_tol(d_dz, dz_full, "dz", (size_t)N * E, 1e-5 * s_full, 1e-4);
            cudaCheck(cudaMemset(d_dz, 0xff, (size_t)N * E * sizeof(float)));
            router_backward_gpu(v, d_dz, d_zeros, d_z, d_lse, d_topi, d_gate, d_counts, 1.0f, 1.0f, N, E, K);
            ok &= validate_result_tol(d_dz, dz_aux, "dz(aux,z)", (size_t)N * E, 1e-5 * s_aux, 1e-4);
            t = ok ? benchmark_kernel(20, router_backward_gpu, v, d_dz, (const float*)d_dgate, (const float*)d_z,
                                      (const float*)d_lse, (const int*)d_topi, (const float*)d_gate, (const int*)d_counts,
                                      1e-2f, 1e-3f, N, E, K) : 0.0f;
            snprintf(cname, sizeof(cname), "bwd_%s", name);
            print_result("router_losses", v, cname, ok, t, 2.0 * N * E * 4 + N * 4.0 + 3.0 * NK * 4, 0, PEAK_HBM);
        }
        cudaCheck(cudaFree(d_z)); cudaCheck(cudaFree(d_lse)); cudaCheck(cudaFree(d_topi)); cudaCheck(cudaFree(d_gate));
        cudaCheck(cudaFree(d_counts)); cudaCheck(cudaFree(d_dgate)); cudaCheck(cudaFree(d_zeros));
        cudaCheck(cudaFree(d_dz)); cudaCheck(cudaFree(d_loss));
        free(zin); free(eye); free(z); free(lse); free(topi); free(gate); free(counts); free(dgate); free(zeros);
        free(dz_full); free(dz_aux);
    }
    return lab_exit_code();
}
