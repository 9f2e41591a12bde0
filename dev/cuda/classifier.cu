/*
The classifier's softmax cross-entropy and its gradient, with an ignore index (target -1).
    losses[n]    = logsumexp(logits[n,:V]) - logits[n,target[n]]            (0 where target[n] = -1)
    dlogits[n,:] = dscale * (softmax(logits[n,:V]) - onehot(target[n]))     (a zero row where target[n] = -1)
with dscale = dloss / (number of counted targets). Rows are Vp >= V floats apart; the padded columns V..Vp-1
never enter the softmax and get a zero gradient. The logits come from the lm_head matmul (cuBLAS in the trainer);
this file is the part after it. The CPU references are train_moe.c's crossentropy_forward / crossentropy_backward.

Build: nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fopenmp -DOMP classifier.cu -o classifier -lcublas -lcublasLt
Run:   ./classifier [version]          (no version: every version)

version 1: unfused, as on the CPU: a forward kernel (max pass, sum pass -> loss) and a backward kernel (max pass,
           sum pass, write pass -> dlogits); one block per row. Reads the logits 5 times, writes dlogits once.
version 2: fused: one block per row, one pass for the running max and sum (online softmax), then the loss and
           a pass that writes the gradient (in place of the logits when dlogits == logits): 2 reads, 1 write.
version 3: fused, the row kept in registers (1024 threads x up to 8 float4: Vp <= 32768): 1 read, 1 write.
Versions 2 and 3 need Vp % 4 == 0. Every version may write the gradient in place (dlogits == logits).

Validated on N = 512 rows with V = 32768 (the CPU reference is slow on all 8192 rows) and on N = 64, V = 1001,
Vp = 1024 (padding that holds 1e4 and must be ignored), about 1 target in 8 ignored; benchmarked at
N = 8192, V = 32768. Tolerances: losses 1e-5 + 1e-5 |ref|; dlogits 1e-8 + 1e-4 |ref| (the values are
probabilities divided by the number of counted rows, mostly below 1e-6). Bytes are counted as the floor
every version could reach (read the logits once, write the gradient once), so % of peak says how close each
version gets to it.
LAB_VALIDATE_ONLY=1 in the environment skips the benchmarks (for compute-sanitizer runs).
*/
#pragma GCC diagnostic ignored "-Wunused-function" // train_moe.c's static helpers that this file does not call
#define TESTING
#define MOE_LAYERS_ONLY // the layers, the model and AdamW of train_moe.c: nothing after them
#include "../../train_moe.c"
#include "common.h"

// ----------------------------------------------------------------------------
// block reductions (fixed order: deterministic). sh: 32 floats of shared memory; every thread gets the result

__device__ inline float cls_block_max(float v, float* sh) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    for (int off = 16; off >= 1; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = -INFINITY;
    for (int i = 0; i < nwarps; i++) v = fmaxf(v, sh[i]);
    __syncthreads(); // sh may be reused right after
    return v;
}
__device__ inline float cls_block_sum(float v, float* sh) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    for (int off = 16; off >= 1; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = 0.0f;
    for (int i = 0; i < nwarps; i++) v += sh[i];
    __syncthreads();
    return v;
}

// ----------------------------------------------------------------------------
// version 1: unfused, one block per row

__global__ void crossentropy_forward_v1_kernel(float* losses, const float* logits, const int* targets, int V, int Vp) {
    __shared__ float sh[32];
    int n = blockIdx.x;
    const float* l = logits + (size_t)n * Vp; // seek to logits[n,:]
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, l[i]);
    mx = cls_block_max(mx, sh);
    float s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += expf(l[i] - mx);
    s = cls_block_sum(s, sh);
    if (threadIdx.x == 0) losses[n] = targets[n] < 0 ? 0.0f : mx + logf(s) - l[targets[n]];
}

__global__ void crossentropy_backward_v1_kernel(float* dlogits, const float* logits, const int* targets, int V,
                                                int Vp, float dscale) {
    __shared__ float sh[32];
    int n = blockIdx.x, target = targets[n];
    const float* l = logits + (size_t)n * Vp;
    float* d = dlogits + (size_t)n * Vp;
    if (target < 0) { // an ignored row (the whole block takes this branch)
        for (int i = threadIdx.x; i < Vp; i += blockDim.x) d[i] = 0.0f;
        return;
    }
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, l[i]);
    mx = cls_block_max(mx, sh);
    float s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += expf(l[i] - mx);
    s = cls_block_sum(s, sh);
    float inv = dscale / s;
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        float g = i < V ? expf(l[i] - mx) * inv : 0.0f;
        if (i == target) g -= dscale;
        d[i] = g;
    }
}

// ----------------------------------------------------------------------------
// version 2: fused, online max and sum in one pass, then the gradient pass

// (m, s) <- the running max and sum of exp(x - m) of two sets; m = -inf is the empty set
__device__ inline void cls_online_merge(float& m, float& s, float m2, float s2) {
    if (m2 == -INFINITY) return;
    if (m == -INFINITY) { m = m2; s = s2; return; }
    float mn = fmaxf(m, m2);
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}

// float4 number k of a row, with the columns >= V (padding) set to -inf
__device__ inline float4 cls_load4(const float* l, int k, int V) {
    float4 x = *(const float4*)&l[4 * k];
    if (4 * k + 3 >= V) {
        if (4 * k + 0 >= V) x.x = -INFINITY;
        if (4 * k + 1 >= V) x.y = -INFINITY;
        if (4 * k + 2 >= V) x.z = -INFINITY;
        if (4 * k + 3 >= V) x.w = -INFINITY;
    }
    return x;
}

__global__ void crossentropy_fused_v2_kernel(float* losses, const float* logits, float* dlogits, const int* targets,
                                             int V, int Vp, float dscale) {
    __shared__ float shm[32], shs[32];
    int n = blockIdx.x, target = targets[n];
    const float* l = logits + (size_t)n * Vp;
    float* d = dlogits + (size_t)n * Vp;
    int nv4 = Vp / 4;
    if (target < 0) {
        for (int k = threadIdx.x; k < nv4; k += blockDim.x) *(float4*)&d[4 * k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (threadIdx.x == 0) losses[n] = 0.0f;
        return;
    }
    float lt = l[target]; // read before any thread writes the row (the reductions below are barriers)
    // pass 1: this thread's running (max, sum)
    float m = -INFINITY, s = 0.0f;
    for (int k = threadIdx.x; k < nv4 && 4 * k < V; k += blockDim.x) {
        float4 x = cls_load4(l, k, V);
        float m4 = fmaxf(fmaxf(x.x, x.y), fmaxf(x.z, x.w));
        if (m4 > m) { s *= expf(m - m4); m = m4; } // expf(-inf) = 0 on the first one
        s += expf(x.x - m) + expf(x.y - m) + expf(x.z - m) + expf(x.w - m);
    }
    // merge over the warp, then over the warps in order
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    for (int off = 16; off >= 1; off /= 2) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
        cls_online_merge(m, s, m2, s2);
    }
    if (lane == 0) { shm[warp] = m; shs[warp] = s; }
    __syncthreads();
    m = -INFINITY;
    s = 0.0f;
    for (int i = 0; i < nwarps; i++) cls_online_merge(m, s, shm[i], shs[i]);
    if (threadIdx.x == 0) losses[n] = m + logf(s) - lt;
    // pass 2: the gradient
    float inv = dscale / s;
    for (int k = threadIdx.x; k < nv4; k += blockDim.x) {
        float4 x = cls_load4(l, k, V);
        float4 g = make_float4(expf(x.x - m) * inv, expf(x.y - m) * inv, expf(x.z - m) * inv, expf(x.w - m) * inv);
        int t = target - 4 * k; // the target's place in this float4, if it is here
        if (t == 0) g.x -= dscale;
        if (t == 1) g.y -= dscale;
        if (t == 2) g.z -= dscale;
        if (t == 3) g.w -= dscale;
        *(float4*)&d[4 * k] = g;
    }
}

// ----------------------------------------------------------------------------
// version 3: fused, the row in registers: float4 number threadIdx.x + j*1024 of the row is x[j]

#define CLS_V3_THREADS 1024
template<int VPT>
__global__ void __launch_bounds__(CLS_V3_THREADS)
crossentropy_fused_v3_kernel(float* losses, const float* logits, float* dlogits, const int* targets, int V, int Vp,
                             float dscale) {
    __shared__ float sh[32];
    int n = blockIdx.x, target = targets[n];
    const float* l = logits + (size_t)n * Vp;
    float* d = dlogits + (size_t)n * Vp;
    int nv4 = Vp / 4;
    if (target < 0) {
        #pragma unroll
        for (int j = 0; j < VPT; j++) {
            int k = threadIdx.x + j * CLS_V3_THREADS;
            if (k < nv4) *(float4*)&d[4 * k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
        if (threadIdx.x == 0) losses[n] = 0.0f;
        return;
    }
    float lt = l[target];
    float4 x[VPT];
    float m = -INFINITY;
    #pragma unroll
    for (int j = 0; j < VPT; j++) {
        int k = threadIdx.x + j * CLS_V3_THREADS;
        x[j] = k < nv4 ? cls_load4(l, k, V) : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
        m = fmaxf(m, fmaxf(fmaxf(x[j].x, x[j].y), fmaxf(x[j].z, x[j].w)));
    }
    m = cls_block_max(m, sh); // all reads of the row are done after this barrier
    float s = 0.0f;
    #pragma unroll
    for (int j = 0; j < VPT; j++) {
        x[j] = make_float4(expf(x[j].x - m), expf(x[j].y - m), expf(x[j].z - m), expf(x[j].w - m));
        s += x[j].x + x[j].y + x[j].z + x[j].w;
    }
    s = cls_block_sum(s, sh);
    if (threadIdx.x == 0) losses[n] = m + logf(s) - lt;
    float inv = dscale / s;
    #pragma unroll
    for (int j = 0; j < VPT; j++) {
        int k = threadIdx.x + j * CLS_V3_THREADS;
        if (k >= nv4) continue;
        float4 g = make_float4(x[j].x * inv, x[j].y * inv, x[j].z * inv, x[j].w * inv);
        int t = target - 4 * k;
        if (t == 0) g.x -= dscale;
        if (t == 1) g.y -= dscale;
        if (t == 2) g.z -= dscale;
        if (t == 3) g.w -= dscale;
        *(float4*)&d[4 * k] = g;
    }
}

// ----------------------------------------------------------------------------
// dispatch

#define NUM_VERSIONS 3

template<int VPT>
static void crossentropy_fused_v3(float* losses, const float* logits, float* dlogits, const int* targets, int N,
                                  int V, int Vp, float dscale) {
    crossentropy_fused_v3_kernel<VPT><<<N, CLS_V3_THREADS>>>(losses, logits, dlogits, targets, V, Vp, dscale);
}

void classifier_gpu(int version, float* losses, const float* logits, float* dlogits, const int* targets, int N, int V,
                    int Vp, float dscale) {
    if (version >= 2 && Vp % 4) {
        fprintf(stderr, "Error: classifier v%d needs Vp %% 4 == 0 (Vp=%d)\n", version, Vp);
        exit(EXIT_FAILURE);
    }
    switch (version) {
        case 1:
            crossentropy_forward_v1_kernel<<<N, 512>>>(losses, logits, targets, V, Vp);
            crossentropy_backward_v1_kernel<<<N, 512>>>(dlogits, logits, targets, V, Vp, dscale);
            break;
        case 2: crossentropy_fused_v2_kernel<<<N, 512>>>(losses, logits, dlogits, targets, V, Vp, dscale); break;
        case 3: {
            int vpt = ceil_div(Vp / 4, CLS_V3_THREADS); // float4 per thread
            if (vpt <= 1) crossentropy_fused_v3<1>(losses, logits, dlogits, targets, N, V, Vp, dscale);
            else if (vpt <= 2) crossentropy_fused_v3<2>(losses, logits, dlogits, targets, N, V, Vp, dscale);
            else if (vpt <= 4) crossentropy_fused_v3<4>(losses, logits, dlogits, targets, N, V, Vp, dscale);
            else if (vpt <= 8) crossentropy_fused_v3<8>(losses, logits, dlogits, targets, N, V, Vp, dscale);
            else {
                fprintf(stderr, "Error: classifier v3 keeps at most 32768 logits per row (Vp=%d)\n", Vp);
                exit(EXIT_FAILURE);
            }
            break;
        }
        default: fprintf(stderr, "Error: classifier has no version %d\n", version); exit(EXIT_FAILURE);
    }
    cudaCheckLast();
}

// ----------------------------------------------------------------------------
// main: validate every version against the CPU on reduced row counts, then benchmark the full shape

// LAB_VALIDATE_ONLY=1 skips the timed runs (validation still runs; RESULT lines then carry no time)
static int cls_benchmarks_on() {
    const char* s = getenv("LAB_VALIDATE_ONLY");
    return s == NULL || s[0] == '\0' || strcmp(s, "0") == 0;
}

typedef struct { int N, V, Vp; } ClsShape;

// logits ~ N(0, 2^2) stored with row stride Vp (padding filled with large junk that must be ignored),
// targets uniform in [0, V) with about 1 in 8 set to -1 (ignored)
static void make_inputs(ClsShape c, float** logits_out, int** targets_out) {
    float* logits = make_random_normal((size_t)c.N * c.Vp, 2.0f);
    for (int n = 0; n < c.N; n++)
        for (int i = c.V; i < c.Vp; i++) logits[(size_t)n * c.Vp + i] = 1e4f;
    int* targets = make_random_int(c.N, c.V);
    for (int n = 0; n < c.N; n++) if (lab_rand_u64() % 8 == 0) targets[n] = -1;
    *logits_out = logits;
    *targets_out = targets;
}

static float dscale_of(const int* targets, int N, float dloss) {
    int counted = 0;
    for (int n = 0; n < N; n++) counted += targets[n] >= 0;
    return counted ? dloss / counted : 0.0f;
}

static int validate_case(int version, ClsShape c) {
    size_t NV = (size_t)c.N * c.V, NVp = (size_t)c.N * c.Vp;
    float* logits;
    int* targets;
    make_inputs(c, &logits, &targets);
    float dloss = 1.0f;
    float dscale = dscale_of(targets, c.N, dloss);
    // the CPU reference works on unpadded rows
    float* packed = (float*)mallocCheck(NV * sizeof(float));
    for (int n = 0; n < c.N; n++) memcpy(packed + (size_t)n * c.V, logits + (size_t)n * c.Vp, c.V * sizeof(float));
    float* losses = make_zeros_float(c.N);
    float* dpacked = make_zeros_float(NV);
    crossentropy_forward(losses, dpacked, packed, targets, c.N, c.V, 0.0f); // dpacked: the softmax ...
    crossentropy_backward(dpacked, targets, NULL, dloss, c.N, c.V);       // ... turned into dlogits in place
    float* dlogits = make_zeros_float(NVp); // padded back, zeros in the padding
    for (int n = 0; n < c.N; n++) memcpy(dlogits + (size_t)n * c.Vp, dpacked + (size_t)n * c.V, c.V * sizeof(float));

    printf("classifier v%d, N%d_V%d_Vp%d%s:\n", version, c.N, c.V, c.Vp, version == 1 ? "" : " (in place)");
    float* d_logits = cuda_malloc_copy(logits, NVp);
    float* d_dlogits = version == 1 ? cuda_calloc<float>(NVp) : d_logits;
    int* d_targets = cuda_malloc_copy(targets, c.N);
    float* d_losses = cuda_calloc<float>(c.N);
    classifier_gpu(version, d_losses, d_logits, d_dlogits, d_targets, c.N, c.V, c.Vp, dscale);
    cudaCheck(cudaDeviceSynchronize());
    // losses are O(log V) ~ 10: 1e-5 relative. dlogits: probabilities / counted, tiny; an absolute 1e-8 floor
    // plus 1e-4 relative (expf and the sums differ in the last bits)
    int ok = validate_result_tol(d_losses, losses, "losses", c.N, 1e-5, 1e-5);
    ok &= validate_result_tol(d_dlogits, dlogits, "dlogits", NVp, 1e-8, 1e-4);
    cudaCheck(cudaFree(d_logits));
    if (version == 1) cudaCheck(cudaFree(d_dlogits));
    cudaCheck(cudaFree(d_targets));
    cudaCheck(cudaFree(d_losses));
    free(logits); free(targets); free(packed); free(losses); free(dpacked); free(dlogits);
    return ok;
}

int main(int argc, char** argv) {
    lab_seed(42);
    lab_device_init();
    int want = lab_version_arg(argc, argv);
    // validation: the benchmark's V on fewer rows (the CPU reference is slow on N = 8192 x 32768), and a small
    // odd vocabulary with padded rows
    ClsShape val[] = {{512, 32768, 32768}, {64, 1001, 1024}};
    ClsShape full = {8192, 32768, 32768}; // B*T = 8192 tokens, V = 32768
    for (int version = 1; version <= NUM_VERSIONS; version++) {
        if (want && version != want) continue;
        int ok = 1;
        for (size_t i = 0; i < sizeof(val) / sizeof(val[0]); i++) ok &= validate_case(version, val[i]);
        char shape[64];
        snprintf(shape, sizeof(shape), "N%d_V%d", full.N, full.V);
        float ms = 0.0f;
        if (ok && cls_benchmarks_on()) {
            float* logits;
            int* targets;
            make_inputs(full, &logits, &targets);
            size_t NVp = (size_t)full.N * full.Vp;
            float* d_logits = cuda_malloc_copy(logits, NVp);
            float* d_dlogits = version == 1 ? cuda_calloc<float>(NVp) : d_logits;
            int* d_targets = cuda_malloc_copy(targets, full.N);
            float* d_losses = cuda_calloc<float>(full.N);
            // timed in place for versions 2, 3 (later runs see gradients as logits: the same work)
            ms = benchmark_kernel(20, classifier_gpu, version, d_losses, d_logits, d_dlogits, d_targets, full.N, full.V,
                                  full.Vp, dscale_of(targets, full.N, 1.0f));
            cudaCheck(cudaFree(d_logits));
            if (version == 1) cudaCheck(cudaFree(d_dlogits));
            cudaCheck(cudaFree(d_targets));
            cudaCheck(cudaFree(d_losses));
            free(logits); free(targets);
        }
        // bytes: the least any version must move (read the logits once, write the gradient once), so that the
        // % of peak says how close each version gets to that floor
        double bytes = 2.0 * full.N * (double)full.Vp * sizeof(float);
        print_result("classifier", version, shape, ok, ms, bytes, 0, PEAK_HBM);
    }
    return lab_exit_code();
}
