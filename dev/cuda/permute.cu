/*
Permute (dispatch): group the N*K token slots by expert. The plan: counts[E], offs[E+1] (the row
range of each expert), row_of[N*K] (row of slot j of token n), tok_of[N*K] (token of a row), with
tokens in token order inside each expert, so the plan is deterministic. Forward: xe[row,:] =
m[tok_of[row],:]. Backward: dm[n,:] += sum_j dxe[row_of[n,j],:], the K slots added in slot order.
CPU reference: permute_plan, permute_forward, permute_backward of train_moe.c.

Build: make permute      (nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fopenmp -DOMP permute.cu -lcublas -lcublasLt -o permute)
Run:   ./permute [version]

version 1: plan: one block, one thread per expert, each scanning all N*K slots in order (twice: count,
           then place). forward/backward: one thread per element
version 2: plan: one block of 1024 threads, a counting sort: shared-memory histogram, scan, then the
           slots ranked chunk by chunk (__match_any_sync inside a warp, per-warp counts across warps).
           forward/backward: one warp per row / token, float4 loads and stores
version 3: plan: many blocks: each block's histogram of its own chunk of slots, one scan over
           (expert, block), then each block places its chunk from its base offsets.
           forward/backward as version 2

All three give the same plan bit for bit (it is a deterministic function of topi).
Benchmarks are against HBM bandwidth; bytes: plan 3*NK*4 (topi read, row_of and tok_of written),
forward 2*NK*C*4, backward (2N + NK)*C*4.
Tolerances: the plan and xe exact; dm 1e-6 (the same additions in the same order as the CPU).
*/
#define TESTING
#define MOE_LAYERS_ONLY // the layers, the model and AdamW of train_moe.c: nothing after them
#include "../../train_moe.c"
#include "common.h"

#define PLAN_MAX_E 256

// ----------------------------------------------------------------------------
// version 1

// one thread per expert: thread e walks every slot in order and takes those routed to e
__global__ void permute_plan_kernel1(int* counts, int* offs, int* row_of, int* tok_of, const int* topi,
                                     int N, int E, int K) {
    int e = threadIdx.x;
    int NK = N * K;
    if (e < E) {
        int c = 0;
        for (int s = 0; s < NK; s++) c += topi[s] == e;
        counts[e] = c;
    }
    __syncthreads();
    if (e == 0) { // prefix sum over the experts
        offs[0] = 0;
        for (int i = 0; i < E; i++) offs[i + 1] = offs[i] + counts[i];
    }
    __syncthreads();
    if (e < E) {
        int row = offs[e];
        for (int s = 0; s < NK; s++) {
            if (topi[s] != e) continue;
            row_of[s] = row;
            tok_of[row] = s / K;
            row++;
        }
    }
}

// xe[r,c] = m[tok_of[r],c], one thread per element
__global__ void permute_forward_kernel1(float* xe, const float* m, const int* tok_of, int NK, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)NK * C) return;
    int r = (int)(i / C), c = (int)(i % C);
    xe[i] = m[(size_t)tok_of[r] * C + c];
}

// dm[n,c] += sum_j dxe[row_of[n,j],c], one thread per element
__global__ void permute_backward_kernel1(float* dm, const float* dxe, const int* row_of, int N, int K, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * C) return;
    int n = (int)(i / C), c = (int)(i % C);
    float acc = dm[i];
    for (int j = 0; j < K; j++) acc += dxe[(size_t)row_of[n * K + j] * C + c];
    dm[i] = acc;
}

void permute_plan1(int* counts, int* offs, int* row_of, int* tok_of, const int* topi, int N, int E, int K) {
    permute_plan_kernel1<<<1, ceil_div(E, 32) * 32>>>(counts, offs, row_of, tok_of, topi, N, E, K);
    cudaCheckLast();
}
void permute_forward1(float* xe, const float* m, const int* tok_of, int NK, int C) {
    permute_forward_kernel1<<<ceil_div((long long)NK * C, 256), 256>>>(xe, m, tok_of, NK, C);
    cudaCheckLast();
}
void permute_backward1(float* dm, const float* dxe, const int* row_of, int N, int K, int C) {
    permute_backward_kernel1<<<ceil_div((long long)N * C, 256), 256>>>(dm, dxe, row_of, N, K, C);
    cudaCheckLast();
}

// ----------------------------------------------------------------------------
// shared by versions 2 and 3: rank a block's slots by expert, in slot (= thread) order

// e: this thread's expert (-1: no slot). wcnt: shared [blockDim/32][E], zero on entry.
// Returns the number of earlier slots of the block with the same expert. Afterwards (all threads
// have passed a __syncthreads inside) wcnt[w][e] holds how many slots of warp w went to expert e.
__device__ int block_rank_by_expert(int e, int* wcnt, int E) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    unsigned peers = __match_any_sync(0xffffffffu, e); // lanes of this warp with the same expert
    int rank = __popc(peers & ((1u << lane) - 1u));
    if (e >= 0 && lane == __ffs(peers) - 1) wcnt[warp * E + e] = __popc(peers);
    __syncthreads();
    if (e >= 0)
        for (int w = 0; w < warp; w++) rank += wcnt[w * E + e];
    return rank;
}

// ----------------------------------------------------------------------------
// version 2: one block, counting sort

__global__ void permute_plan_kernel2(int* counts, int* offs, int* row_of, int* tok_of, const int* topi,
                                     int N, int E, int K) {
    extern __shared__ int smem[];
    int* cnt = smem;           // [E]
    int* fill = smem + E;      // [E] next free row of each expert
    int* wcnt = smem + 2 * E;  // [nwarps][E]
    int nwarps = blockDim.x / 32;
    int NK = N * K;
    for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int s = threadIdx.x; s < NK; s += blockDim.x) atomicAdd(&cnt[topi[s]], 1); // integer: order-free
    __syncthreads();
    if (threadIdx.x == 0) {
        int o = 0;
        for (int e = 0; e < E; e++) { offs[e] = o; fill[e] = o; counts[e] = cnt[e]; o += cnt[e]; }
        offs[E] = o;
    }
    for (int base = 0; base < NK; base += blockDim.x) {
        for (int i = threadIdx.x; i < nwarps * E; i += blockDim.x) wcnt[i] = 0;
        __syncthreads(); // also orders the fill[] updates of the previous chunk
        int s = base + threadIdx.x;
        int e = s < NK ? topi[s] : -1;
        int rank = block_rank_by_expert(e, wcnt, E);
        if (e >= 0) {
            int row = fill[e] + rank;
            row_of[s] = row;
            tok_of[row] = s / K;
        }
        __syncthreads();
        for (int ee = threadIdx.x; ee < E; ee += blockDim.x) {
            int t = 0;
            for (int w = 0; w < nwarps; w++) t += wcnt[w * E + ee];
            fill[ee] += t;
        }
        __syncthreads(); // everyone is done with wcnt before the next chunk clears it
    }
}

// one warp per row, float4 (C % 4 == 0)
__global__ void permute_forward_kernel2(float* xe, const float* m, const int* tok_of, int NK, int C) {
    int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (r >= NK) return;
    const float4* src = (const float4*)(m + (size_t)tok_of[r] * C);
    float4* dst = (float4*)(xe + (size_t)r * C);
    for (int c = lane; c < C / 4; c += 32) dst[c] = src[c];
}

// one warp per token, float4: the token's K slots are added in slot order
__global__ void permute_backward_kernel2(float* dm, const float* dxe, const int* row_of, int N, int K, int C) {
    int n = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    float4* out = (float4*)(dm + (size_t)n * C);
    for (int c = lane; c < C / 4; c += 32) {
        float4 acc = out[c];
        for (int j = 0; j < K; j++) {
            float4 d = ((const float4*)(dxe + (size_t)row_of[n * K + j] * C))[c];
            acc.x += d.x; acc.y += d.y; acc.z += d.z; acc.w += d.w;
        }
        out[c] = acc;
    }
}

void permute_plan2(int* counts, int* offs, int* row_of, int* tok_of, const int* topi, int N, int E, int K) {
    int block = 1024;
    size_t smem = (size_t)(2 + block / 32) * E * sizeof(int);
    permute_plan_kernel2<<<1, block, smem>>>(counts, offs, row_of, tok_of, topi, N, E, K);
    cudaCheckLast();
}
void permute_forward2(float* xe, const float* m, const int* tok_of, int NK, int C) {
    permute_forward_kernel2<<<ceil_div((long long)NK * 32, 256), 256>>>(xe, m, tok_of, NK, C);
    cudaCheckLast();
}
void permute_backward2(float* dm, const float* dxe, const int* row_of, int N, int K, int C) {
    permute_backward_kernel2<<<ceil_div((long long)N * 32, 256), 256>>>(dm, dxe, row_of, N, K, C);
    cudaCheckLast();
}

// ----------------------------------------------------------------------------
// version 3: many blocks. Block b owns slots [b*CHUNK, (b+1)*CHUNK).

#define PLAN3_CHUNK 256 // slots per block = threads per block

// hist[e*G + b] = number of block b's slots routed to expert e
__global__ void permute_hist_kernel3(int* hist, const int* topi, int NK, int E) {
    __shared__ int h[PLAN_MAX_E];
    int G = gridDim.x, b = blockIdx.x;
    for (int e = threadIdx.x; e < E; e += blockDim.x) h[e] = 0;
    __syncthreads();
    int s = b * PLAN3_CHUNK + threadIdx.x;
    if (s < NK) atomicAdd(&h[topi[s]], 1);
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e * G + b] = h[e];
}

// one block: exclusive scan of hist in (expert, block) order -> base; then counts and offs
__global__ void permute_scan_kernel3(int* base, int* counts, int* offs, const int* hist, int E, int G, int NK) {
    __shared__ int part[1024];
    int total = E * G, t = threadIdx.x, nt = blockDim.x;
    int per = ceil_div(total, nt);
    int lo = t * per, hi = min(lo + per, total);
    int s = 0;
    for (int i = lo; i < hi; i++) s += hist[i];
    part[t] = s;
    __syncthreads();
    for (int o = 1; o < nt; o <<= 1) { // Hillis-Steele inclusive scan of the per-thread sums
        int v = t >= o ? part[t - o] : 0;
        __syncthreads();
        part[t] += v;
        __syncthreads();
    }
    int run = part[t] - s; // exclusive
    for (int i = lo; i < hi; i++) { base[i] = run; run += hist[i]; }
    __syncthreads(); // base[] written by this block is now visible to all its threads
    for (int e = t; e < E; e += nt) {
        int o = base[e * G];
        int o1 = e + 1 < E ? base[(e + 1) * G] : NK;
        offs[e] = o;
        counts[e] = o1 - o;
    }
    if (t == 0) offs[E] = NK;
}

__global__ void permute_place_kernel3(int* row_of, int* tok_of, const int* topi, const int* base, int NK, int E, int K) {
    __shared__ int wcnt[(PLAN3_CHUNK / 32) * PLAN_MAX_E];
    int G = gridDim.x, b = blockIdx.x;
    for (int i = threadIdx.x; i < (PLAN3_CHUNK / 32) * E; i += blockDim.x) wcnt[i] = 0;
    __syncthreads();
    int s = b * PLAN3_CHUNK + threadIdx.x;
    int e = s < NK ? topi[s] : -1;
    int rank = block_rank_by_expert(e, wcnt, E);
    if (e >= 0) {
        int row = base[e * G + b] + rank;
        row_of[s] = row;
        tok_of[row] = s / K;
    }
}

// scratch for version 3's histogram and bases (2 * E * G ints), grown on demand
static int* plan3_scratch = NULL;
static size_t plan3_scratch_n = 0;

void permute_plan3(int* counts, int* offs, int* row_of, int* tok_of, const int* topi, int N, int E, int K) {
    int NK = N * K;
    int G = ceil_div(NK, PLAN3_CHUNK);
    size_t need = (size_t)2 * E * G;
    if (need > plan3_scratch_n) {
        if (plan3_scratch) cudaCheck(cudaFree(plan3_scratch));
        cudaCheck(cudaMalloc(&plan3_scratch, need * sizeof(int)));
        plan3_scratch_n = need;
    }
    int* hist = plan3_scratch;
    int* base = plan3_scratch + (size_t)E * G;
    permute_hist_kernel3<<<G, PLAN3_CHUNK>>>(hist, topi, NK, E);
    cudaCheckLast();
    permute_scan_kernel3<<<1, 1024>>>(base, counts, offs, hist, E, G, NK);
    cudaCheckLast();
    permute_place_kernel3<<<G, PLAN3_CHUNK>>>(row_of, tok_of, topi, base, NK, E, K);
    cudaCheckLast();
}

// ----------------------------------------------------------------------------
// dispatchers

#define NUM_VERSIONS 3

void permute_plan_gpu(int version, int* counts, int* offs, int* row_of, int* tok_of, const int* topi, int N, int E, int K) {
    if (E > PLAN_MAX_E) { fprintf(stderr, "permute: E <= %d\n", PLAN_MAX_E); exit(EXIT_FAILURE); }
    switch (version) {
        case 1: permute_plan1(counts, offs, row_of, tok_of, topi, N, E, K); break;
        case 2: permute_plan2(counts, offs, row_of, tok_of, topi, N, E, K); break;
        case 3: permute_plan3(counts, offs, row_of, tok_of, topi, N, E, K); break;
        default: fprintf(stderr, "permute: no version %d\n", version); exit(EXIT_FAILURE);
    }
}
void permute_forward_gpu(int version, float* xe, const float* m, const int* tok_of, int NK, int C) {
    if (version == 1) permute_forward1(xe, m, tok_of, NK, C);
    else permute_forward2(xe, m, tok_of, NK, C);
}
void permute_backward_gpu(int version, float* dm, const float* dxe, const int* row_of, int N, int K, int C) {
    if (version == 1) permute_backward1(dm, dxe, row_of, N, K, C);
    else permute_backward2(dm, dxe, row_of, N, K, C);
}

// ----------------------------------------------------------------------------

int main(int argc, char** argv) {
    lab_seed(42);
    lab_device_init();
    int want = lab_version_arg(argc, argv);
    struct { int C, E, K, skew; } cases[] = {{512, 16, 2, 0}, {1024, 8, 2, 0}, {1024, 128, 8, 0}, {1024, 128, 8, 1}};
    const int N = 8192;
    for (const auto& cs : cases) {
        int C = cs.C, E = cs.E, K = cs.K, NK = N * K;
        char name[64];
        snprintf(name, sizeof(name), "N%d_C%d_E%d_K%d_%s", N, C, E, K, cs.skew ? "skew" : "bal");
        printf("\n== permute %s\n", name);
        // routing from random logits, then the CPU reference
        float* z = make_router_logits(N, E, K, cs.skew);
        int* topi = (int*)mallocCheck((size_t)NK * sizeof(int));
        float* gate = (float*)mallocCheck((size_t)NK * sizeof(float));
        topk_forward(topi, gate, z, N, E, K);
        int* counts = (int*)mallocCheck(E * sizeof(int));
        int* offs = (int*)mallocCheck((E + 1) * sizeof(int));
        int* row_of = (int*)mallocCheck((size_t)NK * sizeof(int));
        int* tok_of = (int*)mallocCheck((size_t)NK * sizeof(int));
        permute_plan(counts, offs, row_of, tok_of, topi, N, E, K);
        lab_print_load(counts, E);
        float* m = make_random_float((size_t)N * C);
        float* xe = (float*)mallocCheck((size_t)NK * C * sizeof(float));
        permute_forward(xe, m, tok_of, NK, C);
        float* dxe = make_random_float((size_t)NK * C);
        float* dm0 = make_random_float((size_t)N * C); // dm arrives holding the residual path's gradient
        float* dm = (float*)mallocCheck((size_t)N * C * sizeof(float));
        memcpy(dm, dm0, (size_t)N * C * sizeof(float));
        permute_backward(dm, dxe, row_of, N, K, C);

        int* d_topi = cuda_malloc_copy(topi, NK);
        int* d_counts = cuda_calloc<int>(E);
        int* d_offs = cuda_calloc<int>(E + 1);
        int* d_row_of = cuda_calloc<int>(NK);
        int* d_tok_of = cuda_calloc<int>(NK);
        float* d_m = cuda_malloc_copy(m, (size_t)N * C);
        float* d_xe = cuda_calloc<float>((size_t)NK * C);
        float* d_dxe = cuda_malloc_copy(dxe, (size_t)NK * C);
        float* d_dm = cuda_calloc<float>((size_t)N * C);
        for (int v = 1; v <= NUM_VERSIONS; v++) {
            if (want && v != want) continue;
            printf("version %d\n", v);
            char cname[96];
            // plan
            cudaCheck(cudaMemset(d_counts, 0xff, E * sizeof(int))); // a stale or missing write fails
            cudaCheck(cudaMemset(d_offs, 0xff, (E + 1) * sizeof(int)));
            cudaCheck(cudaMemset(d_row_of, 0xff, NK * sizeof(int)));
            cudaCheck(cudaMemset(d_tok_of, 0xff, NK * sizeof(int)));
            permute_plan_gpu(v, d_counts, d_offs, d_row_of, d_tok_of, d_topi, N, E, K);
            int ok = validate_result(d_counts, counts, "counts", E, 0.0);
            ok &= validate_result(d_offs, offs, "offs", E + 1, 0.0);
            ok &= validate_result(d_row_of, row_of, "row_of", NK, 0.0);
            ok &= validate_result(d_tok_of, tok_of, "tok_of", NK, 0.0);
            float t = ok ? benchmark_kernel(20, permute_plan_gpu, v, d_counts, d_offs, d_row_of, d_tok_of, (const int*)d_topi, N, E, K) : 0.0f;
            snprintf(cname, sizeof(cname), "plan_%s", name);
            print_result("permute", v, cname, ok, t, 3.0 * NK * 4, 0, PEAK_HBM);
            // forward (on the CPU's plan, so a plan failure does not hide a gather bug)
            cudaCheck(cudaMemcpy(d_tok_of, tok_of, NK * sizeof(int), cudaMemcpyHostToDevice));
            cudaCheck(cudaMemcpy(d_row_of, row_of, NK * sizeof(int), cudaMemcpyHostToDevice));
            cudaCheck(cudaMemset(d_xe, 0xff, (size_t)NK * C * sizeof(float)));
            permute_forward_gpu(v, d_xe, d_m, d_tok_of, NK, C);
            ok = validate_result(d_xe, xe, "xe", (size_t)NK * C, 0.0);
            t = ok ? benchmark_kernel(20, permute_forward_gpu, v, d_xe, (const float*)d_m, (const int*)d_tok_of, NK, C) : 0.0f;
            snprintf(cname, sizeof(cname), "fwd_%s", name);
            print_result("permute", v, cname, ok, t, 2.0 * NK * C * 4, 0, PEAK_HBM);
            // backward
            cudaCheck(cudaMemcpy(d_dm, dm0, (size_t)N * C * sizeof(float), cudaMemcpyHostToDevice));
            permute_backward_gpu(v, d_dm, d_dxe, d_row_of, N, K, C);
            ok = validate_result(d_dm, dm, "dm", (size_t)N * C, 1e-6);
            t = ok ? benchmark_kernel(20, permute_backward_gpu, v, d_dm, (const float*)d_dxe, (const int*)d_row_of, N, K, C) : 0.0f;
            snprintf(cname, sizeof(cname), "bwd_%s", name);
            print_result("permute", v, cname, ok, t, (2.0 * N + NK) * C * 4, 0, PEAK_HBM);
        }
        cudaCheck(cudaFree(d_topi)); cudaCheck(cudaFree(d_counts)); cudaCheck(cudaFree(d_offs));
        cudaCheck(cudaFree(d_row_of)); cudaCheck(cudaFree(d_tok_of)); cudaCheck(cudaFree(d_m));
        cudaCheck(cudaFree(d_xe)); cudaCheck(cudaFree(d_dxe)); cudaCheck(cudaFree(d_dm));
        free(z); free(topi); free(gate); free(counts); free(offs); free(row_of); free(tok_of);
        free(m); free(xe); free(dxe); free(dm0); free(dm);
    }
    return lab_exit_code();
}
