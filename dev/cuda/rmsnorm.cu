/*
RMSNorm forward and backward.
    out[N,C] = inp / sqrt(mean(inp^2) + eps) * w        rstd[N] = 1 / sqrt(mean(inp^2) + eps) saved
    dinp[N,C] += dout*w*rstd - inp * rstd^3 * mean(dout*w*inp)        dw[C] += sum_n dout*inp*rstd
The CPU references are train_moe.c's rmsnorm_forward / rmsnorm_backward.

Build: nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fopenmp -DOMP rmsnorm.cu -o rmsnorm -lcublas -lcublasLt
Run:   ./rmsnorm [version]          (no version: every version; version k runs forward vk and backward vk)

forward  version 1: one thread per row (each thread walks its row: uncoalesced, the plain loop)
forward  version 2: one warp per row, float4 loads; the second pass re-reads the row (from L1)
forward  version 3: one block of C/4 threads per row, each thread's float4 kept in registers, block reduction
backward version 1: one thread per row for dinp; one thread per column for dw, adding the rows in order
backward version 2: one warp per row, float4 loads; each block accumulates dw over its 32 rows in shared
                    memory (one slice per warp, summed in warp order) and writes a partial; a second kernel
                    adds the partials in block order. Deterministic: no atomics, fixed order.
C must be a multiple of 4 (versions 2, 3) and of 32*4 = 128 for version 3's block size.

Validated and benchmarked at the full shape, N = 8192 tokens, C in {512, 1024} (the CPU is quick here); the
backward also reruns and must give the same bits. Tolerances: out, rstd, dinp |err| <= 1e-5 max(1, |ref|);
dw |err| <= 2e-3 + 1e-4 |ref| (N rows of O(1) terms summed into values ~90: the CPU's serial float sum is
itself off by up to ~1e-3). Bytes: forward reads inp, writes out; backward reads dout, inp, dinp, writes dinp.
LAB_VALIDATE_ONLY=1 in the environment skips the benchmarks (for compute-sanitizer runs).
*/
#pragma GCC diagnostic ignored "-Wunused-function" // train_moe.c's static helpers that this file does not call
#define TESTING
#define MOE_LAYERS_ONLY // the layers, the model and AdamW of train_moe.c: nothing after them
#include "../../train_moe.c"
#include "common.h"

__device__ inline float rms_warp_sum(float v) {
    for (int off = 16; off >= 1; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// ----------------------------------------------------------------------------
// forward

// version 1: one thread per row
__global__ void rmsnorm_forward_v1_kernel(float* out, float* rstd, const float* inp, const float* w, int N, int C,
                                          float eps) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* x = inp + (size_t)n * C; // seek to inp[n,:]
    float ss = 0.0f;
    for (int c = 0; c < C; c++) ss += x[c] * x[c];
    float r = 1.0f / sqrtf(ss / C + eps);
    float* o = out + (size_t)n * C;
    for (int c = 0; c < C; c++) o[c] = x[c] * r * w[c];
    rstd[n] = r;
}

// version 2: one warp per row, float4
__global__ void rmsnorm_forward_v2_kernel(float* out, float* rstd, const float* inp, const float* w, int N, int C,
                                          float eps) {
    int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const float* x = inp + (size_t)n * C;
    float ss = 0.0f;
    for (int c = lane * 4; c < C; c += 128) {
        float4 v = *(const float4*)&x[c];
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    ss = rms_warp_sum(ss);
    float r = 1.0f / sqrtf(ss / C + eps);
    float* o = out + (size_t)n * C;
    for (int c = lane * 4; c < C; c += 128) {
        float4 v = *(const float4*)&x[c], g = *(const float4*)&w[c];
        *(float4*)&o[c] = make_float4(v.x * r * g.x, v.y * r * g.y, v.z * r * g.z, v.w * r * g.w);
    }
    if (lane == 0) rstd[n] = r;
}

// version 3: one block of C/4 threads per row; the thread's float4 stays in registers
__global__ void rmsnorm_forward_v3_kernel(float* out, float* rstd, const float* inp, const float* w, int N, int C,
                                          float eps) {
    __shared__ float warp_ss[32];
    int n = blockIdx.x, c = threadIdx.x * 4;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
    float4 v = *(const float4*)&inp[(size_t)n * C + c];
    float ss = rms_warp_sum(v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w);
    if (lane == 0) warp_ss[warp] = ss;
    __syncthreads();
    ss = 0.0f;
    for (int i = 0; i < nwarps; i++) ss += warp_ss[i]; // every thread adds the same values in the same order
    float r = 1.0f / sqrtf(ss / C + eps);
    float4 g = *(const float4*)&w[c];
    *(float4*)&out[(size_t)n * C + c] = make_float4(v.x * r * g.x, v.y * r * g.y, v.z * r * g.z, v.w * r * g.w);
    if (threadIdx.x == 0) rstd[n] = r;
}

void rmsnorm_forward_gpu(int version, float* out, float* rstd, const float* inp, const float* w, int N, int C,
                         float eps) {
    if ((version == 2 && C % 4) || (version == 3 && (C % 128 || C > 4096))) {
        fprintf(stderr, "Error: rmsnorm forward v%d does not take C=%d\n", version, C);
        exit(EXIT_FAILURE);
    }
    switch (version) {
        case 1: rmsnorm_forward_v1_kernel<<<ceil_div(N, 128), 128>>>(out, rstd, inp, w, N, C, eps); break;
        case 2: rmsnorm_forward_v2_kernel<<<ceil_div(N, 8), 256>>>(out, rstd, inp, w, N, C, eps); break;
        case 3: rmsnorm_forward_v3_kernel<<<N, C / 4>>>(out, rstd, inp, w, N, C, eps); break;
        default: fprintf(stderr, "Error: rmsnorm forward has no version %d\n", version); exit(EXIT_FAILURE);
    }
    cudaCheckLast();
}

// ----------------------------------------------------------------------------
// backward

// version 1: one thread per row for dinp
__global__ void rmsnorm_backward_dinp_v1_kernel(float* dinp, const float* dout, const float* inp, const float* w,
                                                const float* rstd, int N, int C) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* x = inp + (size_t)n * C;
    const float* dy = dout + (size_t)n * C;
    float r = rstd[n];
    float dot = 0.0f; // sum_c dy*w*x
    for (int c = 0; c < C; c++) dot += dy[c] * w[c] * x[c];
    float k = dot * r * r * r / C;
    float* dx = dinp + (size_t)n * C;
    for (int c = 0; c < C; c++) dx[c] += dy[c] * w[c] * r - x[c] * k;
}
// version 1: one thread per column for dw, the rows in order (the CPU's order)
__global__ void rmsnorm_backward_dw_v1_kernel(float* dw, const float* dout, const float* inp, const float* rstd,
                                              int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = dw[c];
    for (int n = 0; n < N; n++) acc += dout[(size_t)n * C + c] * inp[(size_t)n * C + c] * rstd[n];
    dw[c] = acc;
}

// version 2: one warp per row; dw partials per block of RMS_BWD_ROWS rows
#define RMS_BWD_ROWS 32
#define RMS_BWD_THREADS 256
__global__ void rmsnorm_backward_v2_kernel(float* dinp, float* dw_partial, const float* dout, const float* inp,
                                           const float* w, const float* rstd, int N, int C) {
    extern __shared__ float rms_dw_smem[]; // [warps][C]: each warp's dw over its rows
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
    float* acc = rms_dw_smem + (size_t)warp * C;
    for (int c = lane * 4; c < C; c += 128) *(float4*)&acc[c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    int n_end = min(N, ((int)blockIdx.x + 1) * RMS_BWD_ROWS);
    for (int n = blockIdx.x * RMS_BWD_ROWS + warp; n < n_end; n += nwarps) {
        const float* x = inp + (size_t)n * C;
        const float* dy = dout + (size_t)n * C;
        float r = rstd[n];
        float dot = 0.0f;
        for (int c = lane * 4; c < C; c += 128) {
            float4 a = *(const float4*)&dy[c], b = *(const float4*)&w[c], e = *(const float4*)&x[c];
            dot += a.x * b.x * e.x + a.y * b.y * e.y + a.z * b.z * e.z + a.w * b.w * e.w;
        }
        dot = rms_warp_sum(dot);
        float k = dot * r * r * r / C;
        float* dx = dinp + (size_t)n * C;
        for (int c = lane * 4; c < C; c += 128) {
            float4 a = *(const float4*)&dy[c], b = *(const float4*)&w[c], e = *(const float4*)&x[c];
            float4 d = *(float4*)&dx[c];
            d.x += a.x * b.x * r - e.x * k;
            d.y += a.y * b.y * r - e.y * k;
            d.z += a.z * b.z * r - e.z * k;
            d.w += a.w * b.w * r - e.w * k;
            *(float4*)&dx[c] = d;
            float4 s = *(float4*)&acc[c]; // this lane's own columns: no other thread touches them
            s.x += a.x * e.x * r;
            s.y += a.y * e.y * r;
            s.z += a.z * e.z * r;
            s.w += a.w * e.w * r;
            *(float4*)&acc[c] = s;
        }
    }
    __syncthreads();
    // the block's partial: the warps' sums in warp order
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float s = 0.0f;
        for (int i = 0; i < nwarps; i++) s += rms_dw_smem[(size_t)i * C + c];
        dw_partial[(size_t)blockIdx.x * C + c] = s;
    }
}
// dw[c] += sum of the partials, in block order
__global__ void rmsnorm_dw_reduce_v2_kernel(float* dw, const float* dw_partial, int nblocks, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.0f;
    for (int b = 0; b < nblocks; b++) s += dw_partial[(size_t)b * C + c];
    dw[c] += s;
}

// dw_partial: scratch of ceil(N / RMS_BWD_ROWS) * C floats (version 2)
void rmsnorm_backward_gpu(int version, float* dinp, float* dw, float* dw_partial, const float* dout,
                          const float* inp, const float* w, const float* rstd, int N, int C) {
    if (version == 2 && C % 4) {
        fprintf(stderr, "Error: rmsnorm backward v2 needs C %% 4 == 0 (C=%d)\n", C);
        exit(EXIT_FAILURE);
    }
    switch (version) {
        case 1:
            rmsnorm_backward_dinp_v1_kernel<<<ceil_div(N, 128), 128>>>(dinp, dout, inp, w, rstd, N, C);
            rmsnorm_backward_dw_v1_kernel<<<ceil_div(C, 128), 128>>>(dw, dout, inp, rstd, N, C);
            break;
        case 2: {
            int nblocks = ceil_div(N, RMS_BWD_ROWS);
            size_t smem = (size_t)(RMS_BWD_THREADS / 32) * C * sizeof(float);
            if (smem > 48 * 1024)
                cudaCheck(cudaFuncSetAttribute(rmsnorm_backward_v2_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               (int)smem));
            rmsnorm_backward_v2_kernel<<<nblocks, RMS_BWD_THREADS, smem>>>(dinp, dw_partial, dout, inp, w, rstd, N, C);
            rmsnorm_dw_reduce_v2_kernel<<<ceil_div(C, 256), 256>>>(dw, dw_partial, nblocks, C);
            break;
        }
        default: fprintf(stderr, "Error: rmsnorm backward has no version %d\n", version); exit(EXIT_FAILURE);
    }
    cudaCheckLast();
}

// ----------------------------------------------------------------------------
// main: validate every version against the CPU, then benchmark (the full shapes: the CPU is quick here)

#define FWD_VERSIONS 3
#define BWD_VERSIONS 2

// LAB_VALIDATE_ONLY=1 skips the timed runs (validation still runs; RESULT lines then carry no time)
static int rms_benchmarks_on() {
    const char* s = getenv("LAB_VALIDATE_ONLY");
    return s == NULL || s[0] == '\0' || strcmp(s, "0") == 0;
}

int main(int argc, char** argv) {
    lab_seed(42);
    lab_device_init();
    int want = lab_version_arg(argc, argv);
    const float eps = 1e-5f;
    const int N = 8192;               // B*T tokens
    const int Cs[] = {512, 1024};     // the paper's widths
    for (int ci = 0; ci < 2; ci++) {
        int C = Cs[ci];
        size_t NC = (size_t)N * C;
        char shape[64];
        snprintf(shape, sizeof(shape), "N%d_C%d", N, C);
        float* inp = make_random_normal(NC, 1.0f);
        float* w = make_random_normal(C, 0.1f);
        for (int c = 0; c < C; c++) w[c] += 1.0f;
        float* dout = make_random_normal(NC, 1.0f);
        float* dinp0 = make_random_normal(NC, 1.0f); // backward adds into these
        float* dw0 = make_random_normal(C, 1.0f);
        // CPU reference
        float* out = make_zeros_float(NC);
        float* rstd = make_zeros_float(N);
        float* dinp = (float*)mallocCheck(NC * sizeof(float));
        float* dw = (float*)mallocCheck(C * sizeof(float));
        memcpy(dinp, dinp0, NC * sizeof(float));
        memcpy(dw, dw0, C * sizeof(float));
        rmsnorm_forward(out, rstd, inp, w, N, C, eps);
        rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, C);
        // GPU
        float* d_inp = cuda_malloc_copy(inp, NC);
        float* d_w = cuda_malloc_copy(w, C);
        float* d_dout = cuda_malloc_copy(dout, NC);
        float* d_out = cuda_calloc<float>(NC);
        float* d_rstd = cuda_calloc<float>(N);
        float* d_rstd_ref = cuda_malloc_copy(rstd, N); // the backward is validated on the CPU's rstd
        float* d_dinp = cuda_calloc<float>(NC);
        float* d_dw = cuda_calloc<float>(C);
        float* d_partial = cuda_calloc<float>((size_t)ceil_div(N, RMS_BWD_ROWS) * C);
        double fwd_bytes = (2.0 * NC + C + N) * sizeof(float);
        double bwd_bytes = (4.0 * NC + 2.0 * C + N) * sizeof(float);

        // tolerances: out, rstd, dinp are per-row sums of C terms, |err| <= 1e-5 * max(1, |ref|). dw sums N = 8192
        // rows of O(1) terms into values of size ~sqrt(N) ~ 90: the CPU's own serial float sum is off by up to
        // ~1e-3 there, so dw passes with |err| <= 2e-3 + 1e-4 |ref|
        for (int version = 1; version <= FWD_VERSIONS; version++) {
            if (want && version != want) continue;
            printf("rmsnorm forward v%d, %s:\n", version, shape);
            rmsnorm_forward_gpu(version, d_out, d_rstd, d_inp, d_w, N, C, eps);
            cudaCheck(cudaDeviceSynchronize());
            int ok = validate_result(d_out, out, "out", NC, 1e-5);
            ok &= validate_result(d_rstd, rstd, "rstd", N, 1e-5);
            float ms = 0.0f;
            if (ok && rms_benchmarks_on())
                ms = benchmark_kernel(20, rmsnorm_forward_gpu, version, d_out, d_rstd, d_inp, d_w, N, C, eps);
            print_result("rmsnorm_forward", version, shape, ok, ms, fwd_bytes, 0, PEAK_HBM);
        }
        for (int version = 1; version <= BWD_VERSIONS; version++) {
            if (want && version != want) continue;
            printf("rmsnorm backward v%d, %s:\n", version, shape);
            cudaCheck(cudaMemcpy(d_dinp, dinp0, NC * sizeof(float), cudaMemcpyHostToDevice));
            cudaCheck(cudaMemcpy(d_dw, dw0, C * sizeof(float), cudaMemcpyHostToDevice));
            rmsnorm_backward_gpu(version, d_dinp, d_dw, d_partial, d_dout, d_inp, d_w, d_rstd_ref, N, C);
            cudaCheck(cudaDeviceSynchronize());
            int ok = validate_result(d_dinp, dinp, "dinp", NC, 1e-5);
            ok &= validate_result_tol(d_dw, dw, "dw", C, 2e-3, 1e-4);
            // determinism: the same inputs give the same bits
            float* dw1 = make_zeros_float(C);
            cuda_to_host(dw1, d_dw, C);
            cudaCheck(cudaMemcpy(d_dw, dw0, C * sizeof(float), cudaMemcpyHostToDevice));
            rmsnorm_backward_gpu(version, d_dinp, d_dw, d_partial, d_dout, d_inp, d_w, d_rstd_ref, N, C);
            ok &= validate_result(d_dw, dw1, "dw (rerun)", C, 0.0);
            free(dw1);
            float ms = 0.0f; // timed on the accumulating buffers: the values drift, the work does not
            if (ok && rms_benchmarks_on())
                ms = benchmark_kernel(20, rmsnorm_backward_gpu, version, d_dinp, d_dw, d_partial, d_dout, d_inp, d_w,
                                      d_rstd_ref, N, C);
            print_result("rmsnorm_backward", version, shape, ok, ms, bwd_bytes, 0, PEAK_HBM);
        }
        float* hp[] = {inp, w, dout, dinp0, dw0, out, rstd, dinp, dw};
        for (size_t i = 0; i < sizeof(hp) / sizeof(hp[0]); i++) free(hp[i]);
        float* dp[] = {d_inp, d_w, d_dout, d_out, d_rstd, d_rstd_ref, d_dinp, d_dw, d_partial};
        for (size_t i = 0; i < sizeof(dp) / sizeof(dp[0]); i++) cudaCheck(cudaFree(dp[i]));
    }
    return lab_exit_code();
}
