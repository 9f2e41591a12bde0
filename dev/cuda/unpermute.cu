/*
Unpermute (combine): out[n,:] = res[n,:] + sum_j gate[n,j] * ye[row_of[n,j],:], the K slots of a
token added in slot order (deterministic: no atomics, each token is summed by one thread / warp).
Backward: dye[row_of[n,j],:] = gate[n,j] * dout[n,:] and dgate[n,j] = <dout[n,:], ye[row_of[n,j],:]>.
CPU reference: unpermute_forward, unpermute_backward of train_moe.c.

Build: make unpermute      (nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fopenmp -DOMP unpermute.cu -lcublas -lcublasLt -o unpermute)
Run:   ./unpermute [version]

version 1: fp32. forward: one thread per (token, channel). backward: one thread per (token, channel)
           for dye, then one thread per (token, slot) for dgate, each a sequential dot product over C
version 2: fp32, one warp per token, float4: forward sums the K rows; backward writes the K rows of
           dye and reduces the K dot products with warp shuffles
version 3: version 2 with bf16 storage for res, ye, out, dout, dye (fp32 math, fp32 gates and dgate),
           eight channels per 128-bit load: half the bytes

Validated at the full shapes, benchmarked against HBM bandwidth; bytes: forward (2N + NK)*C,
backward (N + 2NK)*C, times 4 (fp32) or 2 (bf16).
Tolerances: fp32 out, dye 1e-5 (the GPU fuses multiply-adds); dgate 1e-4 (a dot product over C in a
different order). bf16 (on inputs rounded to bf16): out, dye 1e-2 (bf16 output), dgate 1e-4.
*/
#define TESTING
#define MOE_LAYERS_ONLY // the layers, the model and AdamW of train_moe.c: nothing after them
#include "../../train_moe.c"
#include "common.h"

// ----------------------------------------------------------------------------
// version 1

__global__ void unpermute_forward_kernel1(float* out, const float* res, const float* ye, const float* gate,
                                          const int* row_of, int N, int K, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * C) return;
    int n = (int)(i / C), c = (int)(i % C);
    float acc = res[i];
    for (int j = 0; j < K; j++) acc += gate[n * K + j] * ye[(size_t)row_of[n * K + j] * C + c];
    out[i] = acc;
}
__global__ void unpermute_backward_dye_kernel1(float* dye, const float* dout, const float* gate, const int* row_of,
                                               int N, int K, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * C) return;
    int n = (int)(i / C), c = (int)(i % C);
    for (int j = 0; j < K; j++) dye[(size_t)row_of[n * K + j] * C + c] = gate[n * K + j] * dout[i];
}
__global__ void unpermute_backward_dgate_kernel1(float* dgate, const float* dout, const float* ye, const int* row_of,
                                                 int N, int K, int C) {
    int s = blockIdx.x * blockDim.x + threadIdx.x; // slot s = n*K + j
    if (s >= N * K) return;
    const float* d = dout + (size_t)(s / K) * C;
    const float* y = ye + (size_t)row_of[s] * C;
    float dot = 0.0f;
    for (int c = 0; c < C; c++) dot += d[c] * y[c];
    dgate[s] = dot;
}

// ----------------------------------------------------------------------------
// version 2: one warp per token, float4 (C % 4 == 0)

__global__ void unpermute_forward_kernel2(float* out, const float* res, const float* ye, const float* gate,
                                          const int* row_of, int N, int K, int C) {
    int n = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const float4* r4 = (const float4*)(res + (size_t)n * C);
    float4* o4 = (float4*)(out + (size_t)n * C);
    for (int c = lane; c < C / 4; c += 32) {
        float4 acc = r4[c];
        for (int j = 0; j < K; j++) {
            float g = gate[n * K + j];
            float4 y = ((const float4*)(ye + (size_t)row_of[n * K + j] * C))[c];
            acc.x += g * y.x; acc.y += g * y.y; acc.z += g * y.z; acc.w += g * y.w;
        }
        o4[c] = acc;
    }
}

__global__ void unpermute_backward_kernel2(float* dye, float* dgate, const float* dout, const float* ye,
                                           const float* gate, const int* row_of, int N, int K, int C) {
    int n = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const float4* d4 = (const float4*)(dout + (size_t)n * C);
    for (int j = 0; j < K; j++) {
        int row = row_of[n * K + j];
        float g = gate[n * K + j];
        const float4* y4 = (const float4*)(ye + (size_t)row * C);
        float4* dy4 = (float4*)(dye + (size_t)row * C);
        float dot = 0.0f;
        for (int c = lane; c < C / 4; c += 32) {
            float4 d = d4[c], y = y4[c];
            dy4[c] = make_float4(g * d.x, g * d.y, g * d.z, g * d.w);
            dot += d.x * y.x + d.y * y.y + d.z * y.z + d.w * y.w;
        }
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (lane == 0) dgate[n * K + j] = dot;
    }
}

// ----------------------------------------------------------------------------
// version 3: version 2 in bf16 storage, 8 channels per lane per step (C % 8 == 0)

union Pack8 { uint4 u; bf16 h[8]; };

__global__ void unpermute_forward_kernel3(bf16* out, const bf16* res, const bf16* ye, const float* gate,
                                          const int* row_of, int N, int K, int C) {
    int n = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    for (int c = lane; c < C / 8; c += 32) {
        Pack8 r;
        r.u = ((const uint4*)(res + (size_t)n * C))[c];
        float acc[8];
        #pragma unroll
        for (int k = 0; k < 8; k++) acc[k] = __bfloat162float(r.h[k]);
        for (int j = 0; j < K; j++) {
            float g = gate[n * K + j];
            Pack8 y;
            y.u = ((const uint4*)(ye + (size_t)row_of[n * K + j] * C))[c];
            #pragma unroll
            for (int k = 0; k < 8; k++) acc[k] += g * __bfloat162float(y.h[k]);
        }
        Pack8 o;
        #pragma unroll
        for (int k = 0; k < 8; k++) o.h[k] = __float2bfloat16(acc[k]);
        ((uint4*)(out + (size_t)n * C))[c] = o.u;
    }
}

__global__ void unpermute_backward_kernel3(bf16* dye, float* dgate, const bf16* dout, const bf16* ye,
                                           const float* gate, const int* row_of, int N, int K, int C) {
    int n = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    for (int j = 0; j < K; j++) {
        int row = row_of[n * K + j];
        float g = gate[n * K + j];
        float dot = 0.0f;
        for (int c = lane; c < C / 8; c += 32) {
            Pack8 d, y, dy;
            d.u = ((const uint4*)(dout + (size_t)n * C))[c];
            y.u = ((const uint4*)(ye + (size_t)row * C))[c];
            #pragma unroll
            for (int k = 0; k < 8; k++) {
                float dk = __bfloat162float(d.h[k]);
                dy.h[k] = __float2bfloat16(g * dk);
                dot += dk * __bfloat162float(y.h[k]);
            }
            ((uint4*)(dye + (size_t)row * C))[c] = dy.u;
        }
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (lane == 0) dgate[n * K + j] = dot;
    }
}

// ----------------------------------------------------------------------------
// dispatchers (res, ye, out, dout, dye are float* for versions 1-2 and bf16* for version 3)

#define NUM_VERSIONS 3

void unpermute_forward_gpu(int version, void* out, const void* res, const void* ye, const float* gate,
                           const int* row_of, int N, int K, int C) {
    int block = 256;
    switch (version) {
        case 1:
            unpermute_forward_kernel1<<<ceil_div((long long)N * C, block), block>>>((float*)out, (const float*)res,
                (const float*)ye, gate, row_of, N, K, C);
            break;
        case 2:
            unpermute_forward_kernel2<<<ceil_div((long long)N * 32, block), block>>>((float*)out, (const float*)res,
                (const float*)ye, gate, row_of, N, K, C);
            break;
        case 3:
            unpermute_forward_kernel3<<<ceil_div((long long)N * 32, block), block>>>((bf16*)out, (const bf16*)res,
                (const bf16*)ye, gate, row_of, N, K, C);
            break;
        default: fprintf(stderr, "unpermute: no version %d\n", version); exit(EXIT_FAILURE);
    }
    cudaCheckLast();
}
void unpermute_backward_gpu(int version, void* dye, float* dgate, const void* dout, const void* ye, const float* gate,
                            const int* row_of, int N, int K, int C) {
    int block = 256;
    switch (version) {
        case 1:
            unpermute_backward_dye_kernel1<<<ceil_div((long long)N * C, block), block>>>((float*)dye, (const float*)dout,
                gate, row_of, N, K, C);
            cudaCheckLast();
            unpermute_backward_dgate_kernel1<<<ceil_div(N * K, block), block>>>(dgate, (const float*)dout,
                (const float*)ye, row_of, N, K, C);
            break;
        case 2:
            unpermute_backward_kernel2<<<ceil_div((long long)N * 32, block), block>>>((float*)dye, dgate,
                (const float*)dout, (const float*)ye, gate, row_of, N, K, C);
            break;
        case 3:
            unpermute_backward_kernel3<<<ceil_div((long long)N * 32, block), block>>>((bf16*)dye, dgate,
                (const bf16*)dout, (const bf16*)ye, gate, row_of, N, K, C);
            break;
        default: fprintf(stderr, "unpermute: no version %d\n", version); exit(EXIT_FAILURE);
    }
    cudaCheckLast();
}

// ----------------------------------------------------------------------------

void* device_copy(int version, const float* x, size_t n) { // fp32 or bf16 by version
    return version == 3 ? (void*)cuda_malloc_copy_bf16(x, n) : (void*)cuda_malloc_copy(x, n);
}
int validate_any(int version, const void* d, const float* ref, const char* name, size_t n) {
    if (version == 3) return validate_result((const bf16*)d, ref, name, n, 1e-2);
    return validate_result((const float*)d, ref, name, n, 1e-5);
}

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
        printf("\n== unpermute %s\n", name);
        // routing: gates and rows from random logits
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
        float* res0 = make_random_float((size_t)N * C);
        float* ye0 = make_random_float((size_t)NK * C);
        float* dout0 = make_random_float((size_t)N * C);
        float* d_gate = cuda_malloc_copy(gate, NK);
        int* d_row_of = cuda_malloc_copy(row_of, NK);
        float* d_dgate = cuda_calloc<float>(NK);
        for (int v = 1; v <= NUM_VERSIONS; v++) {
            if (want && v != want) continue;
            printf("version %d\n", v);
            // inputs as this version stores them, and the CPU reference on exactly those values
            float* res = (float*)mallocCheck((size_t)N * C * sizeof(float));
            float* ye = (float*)mallocCheck((size_t)NK * C * sizeof(float));
            float* dout = (float*)mallocCheck((size_t)N * C * sizeof(float));
            memcpy(res, res0, (size_t)N * C * sizeof(float));
            memcpy(ye, ye0, (size_t)NK * C * sizeof(float));
            memcpy(dout, dout0, (size_t)N * C * sizeof(float));
            if (v == 3) { round_to_bf16(res, (size_t)N * C); round_to_bf16(ye, (size_t)NK * C); round_to_bf16(dout, (size_t)N * C); }
            float* out = (float*)mallocCheck((size_t)N * C * sizeof(float));
            float* dye = (float*)mallocCheck((size_t)NK * C * sizeof(float));
            float* dgate = (float*)mallocCheck((size_t)NK * sizeof(float));
            unpermute_forward(out, res, ye, gate, row_of, N, K, C);
            unpermute_backward(dye, dgate, dout, ye, gate, row_of, N, K, C);

            size_t es = v == 3 ? 2 : 4;
            void* d_res = device_copy(v, res, (size_t)N * C);
            void* d_ye = device_copy(v, ye, (size_t)NK * C);
            void* d_dout = device_copy(v, dout, (size_t)N * C);
            void* d_out = device_copy(v, out, (size_t)N * C);
            void* d_dye = device_copy(v, dye, (size_t)NK * C);
            cudaCheck(cudaMemset(d_out, 0xff, (size_t)N * C * es)); // NaN until written
            cudaCheck(cudaMemset(d_dye, 0xff, (size_t)NK * C * es));
            cudaCheck(cudaMemset(d_dgate, 0xff, NK * sizeof(float)));
            char cname[96];
            unpermute_forward_gpu(v, d_out, d_res, d_ye, d_gate, d_row_of, N, K, C);
            int ok = validate_any(v, d_out, out, "out", (size_t)N * C);
            float t = ok ? benchmark_kernel(20, unpermute_forward_gpu, v, d_out, (const void*)d_res, (const void*)d_ye,
                                            (const float*)d_gate, (const int*)d_row_of, N, K, C) : 0.0f;
            snprintf(cname, sizeof(cname), "fwd_%s", name);
            print_result("unpermute", v, cname, ok, t, (2.0 * N + NK) * C * es, 0, PEAK_HBM);

            unpermute_backward_gpu(v, d_dye, d_dgate, d_dout, d_ye, d_gate, d_row_of, N, K, C);
            ok = validate_any(v, d_dye, dye, "dye", (size_t)NK * C);
            ok &= validate_result(d_dgate, dgate, "dgate", NK, 1e-4);
            t = ok ? benchmark_kernel(20, unpermute_backward_gpu, v, d_dye, d_dgate, (const void*)d_dout, (const void*)d_ye,
                                      (const float*)d_gate, (const int*)d_row_of, N, K, C) : 0.0f;
            snprintf(cname, sizeof(cname), "bwd_%s", name);
            print_result("unpermute", v, cname, ok, t, (1.0 * N + 2.0 * NK) * C * es, 0, PEAK_HBM);

            cudaCheck(cudaFree(d_res)); cudaCheck(cudaFree(d_ye)); cudaCheck(cudaFree(d_dout));
            cudaCheck(cudaFree(d_out)); cudaCheck(cudaFree(d_dye));
            free(res); free(ye); free(dout); free(out); free(dye); free(dgate);
        }
        cudaCheck(cudaFree(d_gate)); cudaCheck(cudaFree(d_row_of)); cudaCheck(cudaFree(d_dgate));
        free(z); free(topi); free(gate); free(counts); free(offs); free(row_of); free(tok_of);
        free(res0); free(ye0); free(dout0);
    }
    return lab_exit_code();
}
