/*
AdamW, one step t (1-based) on fp32 master weights, per parameter tensor (weight decay on matrices only):
    g = grad * grad_scale                         (grad_scale: the global-norm clipping factor)
    m = beta1 m + (1 - beta1) g        v = beta2 v + (1 - beta2) g^2
    p -= lr * ( (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + wd * p )
optionally writing a bf16 copy of the updated weights (for bf16 forward/backward kernels).
The CPU reference is train_moe.c's model_update, run on a small Model built with model_build.

Build: nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fopenmp -DOMP adamw.cu -o adamw -lcublas -lcublasLt
Run:   ./adamw [version]          (no version: every version)

version 1: one thread per parameter, a grid-stride loop
version 2: one thread per 4 parameters: float4 loads and stores (8-byte bf16x4 stores), scalar tail.
           Needs 16-byte aligned tensors (every tensor of the model is, when C % 4 == 0).

Validated on a small model (4M parameters, all 13 tensors, weight decay on the matrices only) over 3 steps
(step 2 with grad_scale 0.5): params, m, v within 1e-6 relative of model_update (the same float expression,
up to fused multiply-adds); the bf16 copy exactly equal to the round-to-nearest of the GPU's own fp32 weights.
Benchmarked on one tensor of 2^27 parameters; bytes: read p, g, m, v, write p, m, v (+ 2 per bf16 copy).
LAB_VALIDATE_ONLY=1 in the environment skips the benchmarks (for compute-sanitizer runs).
*/
#pragma GCC diagnostic ignored "-Wunused-function" // train_moe.c's static helpers that this file does not call
#define TESTING
#define MOE_LAYERS_ONLY // the layers, the model and AdamW of train_moe.c: nothing after them
#include "../../train_moe.c"
#include "common.h"

// the same expression, in the same order, as model_update
__device__ inline float adamw_one(float p, float g, float* m, float* v, float lr, float beta1, float beta2, float bc1,
                                  float bc2, float eps, float wd, float grad_scale) {
    float gi = g * grad_scale;
    float mi = beta1 * *m + (1.0f - beta1) * gi;
    float vi = beta2 * *v + (1.0f - beta2) * gi * gi;
    *m = mi;
    *v = vi;
    float mhat = mi / bc1, vhat = vi / bc2;
    return p - lr * (mhat / (sqrtf(vhat) + eps) + wd * p);
}

// version 1: one thread per parameter
__global__ void adamw_v1_kernel(float* p, bf16* p_bf16, const float* g, float* m, float* v, size_t n, float lr,
                                float beta1, float beta2, float bc1, float bc2, float eps, float wd, float grad_scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float pi = adamw_one(p[i], g[i], &m[i], &v[i], lr, beta1, beta2, bc1, bc2, eps, wd, grad_scale);
        p[i] = pi;
        if (p_bf16) p_bf16[i] = __float2bfloat16(pi);
    }
}

// version 2: float4, then a scalar tail of n % 4
__global__ void adamw_v2_kernel(float* p, bf16* p_bf16, const float* g, float* m, float* v, size_t n, float lr,
                                float beta1, float beta2, float bc1, float bc2, float eps, float wd, float grad_scale) {
    size_t n4 = n / 4, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n4; k += stride) {
        float4 pp = ((float4*)p)[k], gg = ((const float4*)g)[k], mm = ((float4*)m)[k], vv = ((float4*)v)[k];
        pp.x = adamw_one(pp.x, gg.x, &mm.x, &vv.x, lr, beta1, beta2, bc1, bc2, eps, wd, grad_scale);
        pp.y = adamw_one(pp.y, gg.y, &mm.y, &vv.y, lr, beta1, beta2, bc1, bc2, eps, wd, grad_scale);
        pp.z = adamw_one(pp.z, gg.z, &mm.z, &vv.z, lr, beta1, beta2, bc1, bc2, eps, wd, grad_scale);
        pp.w = adamw_one(pp.w, gg.w, &mm.w, &vv.w, lr, beta1, beta2, bc1, bc2, eps, wd, grad_scale);
        ((float4*)p)[k] = pp;
        ((float4*)m)[k] = mm;
        ((float4*)v)[k] = vv;
        if (p_bf16) {
            __nv_bfloat162 lo = __floats2bfloat162_rn(pp.x, pp.y), hi = __floats2bfloat162_rn(pp.z, pp.w);
            ((__nv_bfloat162*)p_bf16)[2 * k] = lo;
            ((__nv_bfloat162*)p_bf16)[2 * k + 1] = hi;
        }
    }
    for (size_t i = n4 * 4 + (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float pi = adamw_one(p[i], g[i], &m[i], &v[i], lr, beta1, beta2, bc1, bc2, eps, wd, grad_scale);
        p[i] = pi;
        if (p_bf16) p_bf16[i] = __float2bfloat16(pi);
    }
}

// one tensor of n parameters; p_bf16 may be NULL
void adamw_gpu(int version, float* p, bf16* p_bf16, const float* g, float* m, float* v, size_t n, float lr,
               float beta1, float beta2, float eps, float wd, int t, float grad_scale) {
    float bc1 = 1.0f - powf(beta1, (float)t), bc2 = 1.0f - powf(beta2, (float)t); // as in model_update
    const int bs = 256, max_blocks = 132 * 16; // grid-stride: about 16 blocks per H100 SM
    switch (version) {
        case 1: {
            int blocks = (int)std::min<size_t>((n + bs - 1) / bs, max_blocks);
            adamw_v1_kernel<<<blocks, bs>>>(p, p_bf16, g, m, v, n, lr, beta1, beta2, bc1, bc2, eps, wd, grad_scale);
            break;
        }
        case 2: {
            if (((uintptr_t)p | (uintptr_t)g | (uintptr_t)m | (uintptr_t)v) % 16 || (uintptr_t)p_bf16 % 8) {
                fprintf(stderr, "Error: adamw v2 needs 16-byte aligned tensors (8-byte for the bf16 copy)\n");
                exit(EXIT_FAILURE);
            }
            int blocks = (int)std::min<size_t>((n / 4 + bs) / bs, max_blocks);
            adamw_v2_kernel<<<blocks, bs>>>(p, p_bf16, g, m, v, n, lr, beta1, beta2, bc1, bc2, eps, wd, grad_scale);
            break;
        }
        default: fprintf(stderr, "Error: adamw has no version %d\n", version); exit(EXIT_FAILURE);
    }
    cudaCheckLast();
}

// the whole model, tensor by tensor like model_update (the trainer's loop)
void adamw_model_gpu(int version, const Model* model, float* params, bf16* params_bf16, const float* grads, float* m,
                     float* v, float lr, float beta1, float beta2, float eps, float weight_decay, int t,
                     float grad_scale) {
    size_t off = 0;
    for (int ti = 0; ti < NUM_PARAM_TENSORS; ti++) {
        size_t n = model->param_sizes[ti];
        float wd = param_is_matrix[ti] ? weight_decay : 0.0f;
        adamw_gpu(version, params + off, params_bf16 ? params_bf16 + off : NULL, grads + off, m + off, v + off, n, lr,
                  beta1, beta2, eps, wd, t, grad_scale);
        off += n;
    }
}

// ----------------------------------------------------------------------------
// main

#define NUM_VERSIONS 2

// LAB_VALIDATE_ONLY=1 skips the timed runs (validation still runs; RESULT lines then carry no time)
static int adamw_benchmarks_on() {
    const char* s = getenv("LAB_VALIDATE_ONLY");
    return s == NULL || s[0] == '\0' || strcmp(s, "0") == 0;
}

// three AdamW steps of a small model (every tensor kind, decay and no decay) on the CPU and on the GPU
static int validate(int version) {
    MoEConfig cfg = {1000, 64, 2, 256, 2, 1, 4, 2, 512, 10000.0f, 1e-5f, 1e-2f, 1e-3f}; // V T L C H Hkv E K F
    Model model;
    model_build(&model, &cfg);
    model_init_random(&model, 1234, 0.02f);
    size_t n = model.num_params; // m and v start at zero (model_build)
    float* d_p = cuda_malloc_copy(model.params_memory, n);
    float* d_g = cuda_calloc<float>(n);
    float* d_m = cuda_calloc<float>(n);
    float* d_v = cuda_calloc<float>(n);
    bf16* d_pb = cuda_calloc<bf16>(n);
    const float lr = 4e-4f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, wd = 0.1f;
    const float scales[3] = {1.0f, 0.5f, 1.0f}; // step 2 as if clipped
    for (int t = 1; t <= 3; t++) {
        for (size_t i = 0; i < n; i++) model.grads_memory[i] = 0.01f * lab_rand_normal();
        cudaCheck(cudaMemcpy(d_g, model.grads_memory, n * sizeof(float), cudaMemcpyHostToDevice));
        model_update(&model, lr, beta1, beta2, eps, wd, t, scales[t - 1]);
        adamw_model_gpu(version, &model, d_p, t == 3 ? d_pb : NULL, d_g, d_m, d_v, lr, beta1, beta2, eps, wd, t,
                        scales[t - 1]);
    }
    cudaCheck(cudaDeviceSynchronize());
    printf("adamw v%d, %zu parameters in %d tensors, 3 steps:\n", version, n, NUM_PARAM_TENSORS);
    // the same float expression as the CPU, up to fused multiply-adds: 1e-6 relative (params ~ 0.02-1,
    // m ~ 0.01, v ~ 1e-4: an absolute floor of 1e-9)
    int ok = validate_result_tol(d_p, model.params_memory, "params", n, 1e-9, 1e-6);
    ok &= validate_result_tol(d_m, model.m_memory, "m", n, 1e-9, 1e-6);
    ok &= validate_result_tol(d_v, model.v_memory, "v", n, 1e-12, 1e-6);
    // the bf16 copy: exactly the round-to-nearest-even of the GPU's own updated fp32 weights
    float* p_rounded = make_zeros_float(n);
    cuda_to_host(p_rounded, d_p, n);
    round_to_bf16(p_rounded, n);
    ok &= validate_result_tol(d_pb, p_rounded, "params bf16", n, 0.0, 0.0);
    free(p_rounded);
    cudaCheck(cudaFree(d_p)); cudaCheck(cudaFree(d_g)); cudaCheck(cudaFree(d_m)); cudaCheck(cudaFree(d_v));
    cudaCheck(cudaFree(d_pb));
    model_free(&model);
    return ok;
}

int main(int argc, char** argv) {
    lab_seed(42);
    lab_device_init();
    int want = lab_version_arg(argc, argv);
    // benchmark: one tensor of 2^27 parameters (~134M: the experts of a C = 1024 model dominate), zeros (the
    // work does not depend on the values)
    const size_t n = (size_t)1 << 27;
    for (int version = 1; version <= NUM_VERSIONS; version++) {
        if (want && version != want) continue;
        int ok = validate(version);
        for (int with_bf16 = 0; with_bf16 <= 1; with_bf16++) {
            char shape[64];
            snprintf(shape, sizeof(shape), "n%zu%s", n, with_bf16 ? "_bf16copy" : "");
            float ms = 0.0f;
            if (ok && adamw_benchmarks_on()) {
                float* d_p = cuda_calloc<float>(n);
                float* d_g = cuda_calloc<float>(n);
                float* d_m = cuda_calloc<float>(n);
                float* d_v = cuda_calloc<float>(n);
                bf16* d_pb = with_bf16 ? cuda_calloc<bf16>(n) : NULL;
                ms = benchmark_kernel(20, adamw_gpu, version, d_p, d_pb, d_g, d_m, d_v, n, 4e-4f, 0.9f, 0.95f, 1e-8f,
                                      0.1f, 10, 1.0f);
                cudaCheck(cudaFree(d_p)); cudaCheck(cudaFree(d_g)); cudaCheck(cudaFree(d_m)); cudaCheck(cudaFree(d_v));
                if (d_pb) cudaCheck(cudaFree(d_pb));
            }
            // read p, g, m, v; write p, m, v (+ the bf16 copy)
            double bytes = (double)n * (7 * sizeof(float) + (with_bf16 ? sizeof(bf16) : 0));
            print_result("adamw", version, shape, ok, ms, bytes, 0, PEAK_HBM);
        }
    }
    return lab_exit_code();
}
