/*
SwiGLU, the elementwise middle of an expert: act = silu(h1) * h3, silu(g) = g * sigmoid(g), and its
backward: dh3 = dact * silu(h1), dh1 = dact * h3 * sig(h1) * (1 + h1 * (1 - sig(h1))).
h1, h3, act, dact, dh1, dh3 are [NK, F] (one row per token slot, F = the expert's hidden size).

CPU reference: the SwiGLU loops inside experts_forward / experts_backward of train_moe.c, reached
through those functions themselves with identity weights (no copy of the math lives here):
  forward:  one expert, C = 2F, xe = [h1 | h3], w1 = [I 0], w3 = [0 I]  =>  h1, h3 pass through
            exactly and experts_forward's act is the reference
  backward: one expert, C = F, w2 = I, dye = dact  =>  experts_backward's dh1, dh3 are the reference
(multiplying by 1 and adding 0 is exact in floating point, so nothing but SwiGLU is measured).

Build: make swiglu      (nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fopenmp -DOMP swiglu.cu -lcublas -lcublasLt -o swiglu)
Run:   ./swiglu [version]

version 1: fp32, one thread per element
version 2: fp32, float4: four elements per thread, 128-bit loads and stores
version 3: bf16 storage (fp32 math), eight elements per thread, 128-bit loads and stores: half the bytes

Validated at NK = 2048 rows, F = 512 (the identity-weight references are GEMMs on the CPU);
benchmarked at the trainer's shapes (NK = N*K = 16384 and 65536 rows, F = 2048) against HBM
bandwidth; bytes: forward 3 tensors, backward 5 tensors, times 4 (fp32) or 2 (bf16) bytes.
Tolerances: fp32 1e-5 (expf differs from the CPU's in the last bit); bf16 1e-2 on inputs rounded
to bf16 (the output is rounded to bf16: relative 2^-8 = 0.4%).
*/
#define TESTING
#define MOE_LAYERS_ONLY // the layers, the model and AdamW of train_moe.c: nothing after them
#include "../../train_moe.c"
#include "common.h"

// ----------------------------------------------------------------------------
// the math, once, in fp32

__device__ __forceinline__ float swiglu_fwd(float g, float u) {
    return g / (1.0f + expf(-g)) * u;
}
__device__ __forceinline__ void swiglu_bwd(float* d1, float* d3, float da, float g, float u) {
    float sg = 1.0f / (1.0f + expf(-g));
    *d3 = da * (g * sg); // the CPU's order: dact * silu
    *d1 = da * u * sg * (1.0f + g * (1.0f - sg));
}

// ----------------------------------------------------------------------------
// version 1: one thread per element

__global__ void swiglu_forward_kernel1(float* act, const float* h1, const float* h3, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) act[i] = swiglu_fwd(h1[i], h3[i]);
}
__global__ void swiglu_backward_kernel1(float* dh1, float* dh3, const float* dact, const float* h1, const float* h3, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) swiglu_bwd(&dh1[i], &dh3[i], dact[i], h1[i], h3[i]);
}

// ----------------------------------------------------------------------------
// version 2: float4 (n % 4 == 0)

__global__ void swiglu_forward_kernel2(float4* act, const float4* h1, const float4* h3, size_t n4) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    float4 g = h1[i], u = h3[i], a;
    a.x = swiglu_fwd(g.x, u.x); a.y = swiglu_fwd(g.y, u.y);
    a.z = swiglu_fwd(g.z, u.z); a.w = swiglu_fwd(g.w, u.w);
    act[i] = a;
}
__global__ void swiglu_backward_kernel2(float4* dh1, float4* dh3, const float4* dact, const float4* h1,
                                        const float4* h3, size_t n4) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    float4 da = dact[i], g = h1[i], u = h3[i], d1, d3;
    swiglu_bwd(&d1.x, &d3.x, da.x, g.x, u.x); swiglu_bwd(&d1.y, &d3.y, da.y, g.y, u.y);
    swiglu_bwd(&d1.z, &d3.z, da.z, g.z, u.z); swiglu_bwd(&d1.w, &d3.w, da.w, g.w, u.w);
    dh1[i] = d1;
    dh3[i] = d3;
}

// ----------------------------------------------------------------------------
// version 3: bf16 storage, 8 per thread through one 128-bit word (n % 8 == 0)

union Pack8 { uint4 u; bf16 h[8]; };

__global__ void swiglu_forward_kernel3(bf16* act, const bf16* h1, const bf16* h3, size_t n8) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    Pack8 g, u, a;
    g.u = ((const uint4*)h1)[i];
    u.u = ((const uint4*)h3)[i];
    #pragma unroll
    for (int k = 0; k < 8; k++) a.h[k] = __float2bfloat16(swiglu_fwd(__bfloat162float(g.h[k]), __bfloat162float(u.h[k])));
    ((uint4*)act)[i] = a.u;
}
__global__ void swiglu_backward_kernel3(bf16* dh1, bf16* dh3, const bf16* dact, const bf16* h1, const bf16* h3, size_t n8) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    Pack8 da, g, u, d1, d3;
    da.u = ((const uint4*)dact)[i];
    g.u = ((const uint4*)h1)[i];
    u.u = ((const uint4*)h3)[i];
    #pragma unroll
    for (int k = 0; k < 8; k++) {
        float a, b;
        swiglu_bwd(&a, &b, __bfloat162float(da.h[k]), __bfloat162float(g.h[k]), __bfloat162float(u.h[k]));
        d1.h[k] = __float2bfloat16(a);
        d3.h[k] = __float2bfloat16(b);
    }
    ((uint4*)dh1)[i] = d1.u;
    ((uint4*)dh3)[i] = d3.u;
}

// ----------------------------------------------------------------------------
// dispatchers (version 3 takes bf16 buffers; the void* keeps one signature for all)

#define NUM_VERSIONS 3

void swiglu_forward_gpu(int version, void* act, const void* h1, const void* h3, size_t n) {
    int block = 256;
    switch (version) {
        case 1: swiglu_forward_kernel1<<<ceil_div(n, block), block>>>((float*)act, (const float*)h1, (const float*)h3, n); break;
        case 2: swiglu_forward_kernel2<<<ceil_div(n / 4, block), block>>>((float4*)act, (const float4*)h1, (const float4*)h3, n / 4); break;
        case 3: swiglu_forward_kernel3<<<ceil_div(n / 8, block), block>>>((bf16*)act, (const bf16*)h1, (const bf16*)h3, n / 8); break;
        default: fprintf(stderr, "swiglu: no version %d\n", version); exit(EXIT_FAILURE);
    }
    cudaCheckLast();
}
void swiglu_backward_gpu(int version, void* dh1, void* dh3, const void* dact, const void* h1, const void* h3, size_t n) {
    int block = 256;
    switch (version) {
        case 1: swiglu_backward_kernel1<<<ceil_div(n, block), block>>>((float*)dh1, (float*)dh3, (const float*)dact, (const float*)h1, (const float*)h3, n); break;
        case 2: swiglu_backward_kernel2<<<ceil_div(n / 4, block), block>>>((float4*)dh1, (float4*)dh3, (const float4*)dact, (const float4*)h1, (const float4*)h3, n / 4); break;
        case 3: swiglu_backward_kernel3<<<ceil_div(n / 8, block), block>>>((bf16*)dh1, (bf16*)dh3, (const bf16*)dact, (const bf16*)h1, (const bf16*)h3, n / 8); break;
        default: fprintf(stderr, "swiglu: no version %d\n", version); exit(EXIT_FAILURE);
    }
    cudaCheckLast();
}

// ----------------------------------------------------------------------------
// the CPU references, through train_moe.c's experts_forward / experts_backward (see the header)

void swiglu_forward_ref(float* act, const float* h1, const float* h3, int rows, int F) {
    int C = 2 * F;
    float* xe = (float*)mallocCheck((size_t)rows * C * sizeof(float));
    for (int r = 0; r < rows; r++) {
        memcpy(xe + (size_t)r * C, h1 + (size_t)r * F, F * sizeof(float));
        memcpy(xe + (size_t)r * C + F, h3 + (size_t)r * F, F * sizeof(float));
    }
    float* w1 = (float*)callocCheck((size_t)F * C, sizeof(float));
    float* w3 = (float*)callocCheck((size_t)F * C, sizeof(float));
    float* w2 = (float*)callocCheck((size_t)C * F, sizeof(float));
    for (int f = 0; f < F; f++) { w1[(size_t)f * C + f] = 1.0f; w3[(size_t)f * C + F + f] = 1.0f; }
    float* ye = (float*)mallocCheck((size_t)rows * C * sizeof(float));
    float* a1 = (float*)mallocCheck((size_t)rows * F * sizeof(float));
    float* a3 = (float*)mallocCheck((size_t)rows * F * sizeof(float));
    int offs[2] = {0, rows};
    experts_forward(ye, a1, a3, act, xe, w1, w3, w2, offs, 1, C, F);
    if (memcmp(a1, h1, (size_t)rows * F * sizeof(float)) || memcmp(a3, h3, (size_t)rows * F * sizeof(float))) {
        fprintf(stderr, "swiglu_forward_ref: the identity trick did not pass h1/h3 through exactly\n");
        exit(EXIT_FAILURE);
    }
    free(xe); free(w1); free(w3); free(w2); free(ye); free(a1); free(a3);
}

void swiglu_backward_ref(float* dh1, float* dh3, const float* dact, const float* h1, const float* h3, int rows, int F) {
    int C = F;
    size_t nw = (size_t)F * C, nr = (size_t)rows * F;
    float* w2 = (float*)callocCheck(nw, sizeof(float));
    for (int f = 0; f < F; f++) w2[(size_t)f * F + f] = 1.0f;
    float* w1 = (float*)callocCheck(nw, sizeof(float));
    float* w3 = (float*)callocCheck(nw, sizeof(float));
    float* dw1 = (float*)callocCheck(nw, sizeof(float));
    float* dw3 = (float*)callocCheck(nw, sizeof(float));
    float* dw2 = (float*)callocCheck(nw, sizeof(float));
    float* xe = (float*)callocCheck(nr, sizeof(float));
    float* dxe = (float*)mallocCheck(nr * sizeof(float));
    float* da = (float*)mallocCheck(nr * sizeof(float));
    int offs[2] = {0, rows};
    experts_backward(dxe, dw1, dw3, dw2, da, dh1, dh3, dact, xe, h1, h3, h1 /* act: only feeds dw2 */,
                     w1, w3, w2, offs, 1, C, F);
    if (memcmp(da, dact, nr * sizeof(float))) {
        fprintf(stderr, "swiglu_backward_ref: the identity trick did not pass dact through exactly\n");
        exit(EXIT_FAILURE);
    }
    free(w2); free(w1); free(w3); free(dw1); free(dw3); free(dw2); free(xe); free(dxe); free(da);
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

    // validation, at a small shape
    const int VR = 2048, VF = 512;
    size_t vn = (size_t)VR * VF;
    float* h1 = make_random_normal(vn, 2.0f);
    float* h3 = make_random_float(vn);
    float* dact = make_random_float(vn);
    int ok_v[NUM_VERSIONS + 1];
    for (int v = 1; v <= NUM_VERSIONS; v++) {
        if (want && v != want) continue;
        printf("\n== swiglu version %d: validation at %d rows x F=%d\n", v, VR, VF);
        // a bf16 version reads bf16 inputs, so its reference is fed the same rounded values
        float* g = (float*)mallocCheck(vn * sizeof(float));
        float* u = (float*)mallocCheck(vn * sizeof(float));
        float* da = (float*)mallocCheck(vn * sizeof(float));
        memcpy(g, h1, vn * sizeof(float)); memcpy(u, h3, vn * sizeof(float)); memcpy(da, dact, vn * sizeof(float));
        if (v == 3) { round_to_bf16(g, vn); round_to_bf16(u, vn); round_to_bf16(da, vn); }
        float* act = (float*)mallocCheck(vn * sizeof(float));
        float* dh1 = (float*)mallocCheck(vn * sizeof(float));
        float* dh3 = (float*)mallocCheck(vn * sizeof(float));
        swiglu_forward_ref(act, g, u, VR, VF);
        swiglu_backward_ref(dh1, dh3, da, g, u, VR, VF);
        void* d_g = device_copy(v, g, vn);
        void* d_u = device_copy(v, u, vn);
        void* d_da = device_copy(v, da, vn);
        void* d_act = device_copy(v, act, vn); // overwritten
        void* d_dh1 = device_copy(v, dh1, vn);
        void* d_dh3 = device_copy(v, dh3, vn);
        size_t es = v == 3 ? 2 : 4;
        cudaCheck(cudaMemset(d_act, 0xff, vn * es)); cudaCheck(cudaMemset(d_dh1, 0xff, vn * es)); cudaCheck(cudaMemset(d_dh3, 0xff, vn * es));
        swiglu_forward_gpu(v, d_act, d_g, d_u, vn);
        swiglu_backward_gpu(v, d_dh1, d_dh3, d_da, d_g, d_u, vn);
        int ok = validate_any(v, d_act, act, "act", vn);
        ok &= validate_any(v, d_dh1, dh1, "dh1", vn);
        ok &= validate_any(v, d_dh3, dh3, "dh3", vn);
        ok_v[v] = ok;
        cudaCheck(cudaFree(d_g)); cudaCheck(cudaFree(d_u)); cudaCheck(cudaFree(d_da));
        cudaCheck(cudaFree(d_act)); cudaCheck(cudaFree(d_dh1)); cudaCheck(cudaFree(d_dh3));
        free(g); free(u); free(da); free(act); free(dh1); free(dh3);
    }
    free(h1); free(h3); free(dact);

    // benchmarks, at the trainer's shapes: N = 8192 tokens, K = 2 or 8, F = 2C = 2048
    struct { int NK, F; } shapes[] = {{8192 * 2, 2048}, {8192 * 8, 2048}};
    for (const auto& sh : shapes) {
        size_t n = (size_t)sh.NK * sh.F;
        char fwd[64], bwd[64];
        snprintf(fwd, sizeof(fwd), "fwd_NK%d_F%d", sh.NK, sh.F);
        snprintf(bwd, sizeof(bwd), "bwd_NK%d_F%d", sh.NK, sh.F);
        printf("\n== swiglu benchmarks NK=%d F=%d\n", sh.NK, sh.F);
        float* x = make_random_float(n);
        for (int v = 1; v <= NUM_VERSIONS; v++) {
            if (want && v != want) continue;
            void* b[6];
            for (int i = 0; i < 6; i++) b[i] = device_copy(v, x, n); // act dh1 dh3 | dact h1 h3
            size_t es = v == 3 ? 2 : 4;
            float t = ok_v[v] ? benchmark_kernel(20, swiglu_forward_gpu, v, b[0], (const void*)b[4], (const void*)b[5], n) : 0.0f;
            print_result("swiglu", v, fwd, ok_v[v], t, 3.0 * n * es, 0, PEAK_HBM);
            t = ok_v[v] ? benchmark_kernel(20, swiglu_backward_gpu, v, b[1], b[2], (const void*)b[3], (const void*)b[4], (const void*)b[5], n) : 0.0f;
            print_result("swiglu", v, bwd, ok_v[v], t, 5.0 * n * es, 0, PEAK_HBM);
            for (int i = 0; i < 6; i++) cudaCheck(cudaFree(b[i]));
        }
        free(x);
    }
    return lab_exit_code();
}
