/*
RoPE, the rotate-half convention of HF Llama/Mixtral, in place on x[B,T,NH,D] (q with NH = H, k with NH = Hkv):
    for i < D/2, angle a = t * theta^(-2i/D):
    x[i] <- x[i] cos a - x[i+D/2] sin a,   x[i+D/2] <- x[i+D/2] cos a + x[i] sin a
dir = +1 is the forward; dir = -1 (the inverse rotation) is the backward, applied to dq and dk.
The cos/sin tables [T, D/2] come from train_moe.c's rope_tables; the CPU reference is its rope_apply.

Build: nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fopenmp -DOMP rope.cu -o rope -lcublas -lcublasLt
Run:   ./rope [version]          (no version: every version)

version 1: one thread per rotated pair (x[i], x[i+D/2]), scalar loads
version 2: one thread per 4 consecutive pairs: float4 loads of x and of the tables (needs D % 8 == 0)

Validated (forward and backward) and benchmarked at the full shapes: B = 2, T = 4096, NH in {8, 4, 2} with
D = 128, and NH = 8 with D = 64. Tolerance |err| <= 1e-6 max(1, |ref|) (the CPU's arithmetic up to fused
multiply-adds). Bytes: x read and written, plus the tables.
LAB_VALIDATE_ONLY=1 in the environment skips the benchmarks (for compute-sanitizer runs).
*/
#pragma GCC diagnostic ignored "-Wunused-function" // train_moe.c's static helpers that this file does not call
#define TESTING
#define MOE_LAYERS_ONLY // the layers, the model and AdamW of train_moe.c: nothing after them
#include "../../train_moe.c"
#include "common.h"

// version 1: one thread per pair; idx = ((b*T + t)*NH + h)*half + i
__global__ void rope_v1_kernel(float* x, const float* fcos, const float* fsin, int B, int T, int NH, int D, int dir) {
    int half = D / 2;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * T * NH * half) return;
    int i = (int)(idx % half);
    size_t bth = idx / half;                  // (b*T + t)*NH + h
    int t = (int)((bth / NH) % T);
    float* v = x + bth * D;                   // seek to x[b,t,h,:]
    float c = fcos[(size_t)t * half + i], s = dir * fsin[(size_t)t * half + i];
    float x0 = v[i], x1 = v[i + half];
    v[i] = x0 * c - x1 * s;
    v[i + half] = x1 * c + x0 * s;
}

// version 2: one thread per 4 pairs; idx = ((b*T + t)*NH + h)*(half/4) + i4
__global__ void rope_v2_kernel(float* x, const float* fcos, const float* fsin, int B, int T, int NH, int D, int dir) {
    int half = D / 2, q4 = half / 4;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * T * NH * q4) return;
    int i = (int)(idx % q4) * 4;
    size_t bth = idx / q4;
    int t = (int)((bth / NH) % T);
    float* v = x + bth * D;
    float4 c = *(const float4*)&fcos[(size_t)t * half + i];
    float4 s = *(const float4*)&fsin[(size_t)t * half + i];
    float fd = (float)dir;
    s.x *= fd; s.y *= fd; s.z *= fd; s.w *= fd;
    float4 a = *(float4*)&v[i], b = *(float4*)&v[i + half];
    *(float4*)&v[i] = make_float4(a.x * c.x - b.x * s.x, a.y * c.y - b.y * s.y, a.z * c.z - b.z * s.z,
                                  a.w * c.w - b.w * s.w);
    *(float4*)&v[i + half] = make_float4(b.x * c.x + a.x * s.x, b.y * c.y + a.y * s.y, b.z * c.z + a.z * s.z,
                                         b.w * c.w + a.w * s.w);
}

void rope_gpu(int version, float* x, const float* fcos, const float* fsin, int B, int T, int NH, int D, int dir) {
    const int bs = 256;
    size_t pairs = (size_t)B * T * NH * (D / 2);
    switch (version) {
        case 1: rope_v1_kernel<<<ceil_div((long long)pairs, bs), bs>>>(x, fcos, fsin, B, T, NH, D, dir); break;
        case 2:
            if (D % 8) { fprintf(stderr, "Error: rope v2 needs D %% 8 == 0 (D=%d)\n", D); exit(EXIT_FAILURE); }
            rope_v2_kernel<<<ceil_div((long long)pairs / 4, bs), bs>>>(x, fcos, fsin, B, T, NH, D, dir);
            break;
        default: fprintf(stderr, "Error: rope has no version %d\n", version); exit(EXIT_FAILURE);
    }
    cudaCheckLast();
}

// ----------------------------------------------------------------------------
// main: validate every version against the CPU (the full shapes: the CPU is quick here), then benchmark

#define NUM_VERSIONS 2

// LAB_VALIDATE_ONLY=1 skips the timed runs (validation still runs; RESULT lines then carry no time)
static int rope_benchmarks_on() {
    const char* s = getenv("LAB_VALIDATE_ONLY");
    return s == NULL || s[0] == '\0' || strcmp(s, "0") == 0;
}

typedef struct { int B, T, NH, D; } RopeShape;

int main(int argc, char** argv) {
    lab_seed(42);
    lab_device_init();
    int want = lab_version_arg(argc, argv);
    const float theta = 10000.0f;
    // B*T = 8192 tokens at T = 4096: q of C = 1024 (H = 8) and C = 512 (H = 4) with D = 128, a grouped k
    // (Hkv = 2), and D = 64
    RopeShape shapes[] = {{2, 4096, 8, 128}, {2, 4096, 4, 128}, {2, 4096, 2, 128}, {2, 4096, 8, 64}};
    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
        RopeShape c = shapes[si];
        size_t n = (size_t)c.B * c.T * c.NH * c.D, nt = (size_t)c.T * (c.D / 2);
        char shape[64];
        snprintf(shape, sizeof(shape), "B%d_T%d_NH%d_D%d", c.B, c.T, c.NH, c.D);
        float* fcos = make_zeros_float(nt);
        float* fsin = make_zeros_float(nt);
        rope_tables(fcos, fsin, c.T, c.D, theta);
        float* x = make_random_normal(n, 1.0f);
        float* fwd = (float*)mallocCheck(n * sizeof(float));
        float* bwd = (float*)mallocCheck(n * sizeof(float));
        memcpy(fwd, x, n * sizeof(float));
        rope_apply(fwd, fcos, fsin, c.B, c.T, c.NH, c.D, +1);
        memcpy(bwd, x, n * sizeof(float));
        rope_apply(bwd, fcos, fsin, c.B, c.T, c.NH, c.D, -1);
        float* d_x = cuda_malloc_copy(x, n);
        float* d_cos = cuda_malloc_copy(fcos, nt);
        float* d_sin = cuda_malloc_copy(fsin, nt);
        double bytes = (2.0 * n + 2.0 * nt) * sizeof(float);
        for (int version = 1; version <= NUM_VERSIONS; version++) {
            if (want && version != want) continue;
            printf("rope v%d, %s:\n", version, shape);
            // the same arithmetic as the CPU up to fused multiply-adds: tolerance 1e-6 * max(1, |ref|)
            cudaCheck(cudaMemcpy(d_x, x, n * sizeof(float), cudaMemcpyHostToDevice));
            rope_gpu(version, d_x, d_cos, d_sin, c.B, c.T, c.NH, c.D, +1);
            cudaCheck(cudaDeviceSynchronize());
            int ok = validate_result(d_x, fwd, "forward", n, 1e-6);
            cudaCheck(cudaMemcpy(d_x, x, n * sizeof(float), cudaMemcpyHostToDevice));
            rope_gpu(version, d_x, d_cos, d_sin, c.B, c.T, c.NH, c.D, -1);
            cudaCheck(cudaDeviceSynchronize());
            ok &= validate_result(d_x, bwd, "backward", n, 1e-6);
            float ms = 0.0f; // timed in place: the values rotate on, the work is the same
            if (ok && rope_benchmarks_on())
                ms = benchmark_kernel(20, rope_gpu, version, d_x, d_cos, d_sin, c.B, c.T, c.NH, c.D, +1);
            print_result("rope", version, shape, ok, ms, bytes, 0, PEAK_HBM);
        }
        free(fcos); free(fsin); free(x); free(fwd); free(bwd);
        cudaCheck(cudaFree(d_x)); cudaCheck(cudaFree(d_cos)); cudaCheck(cudaFree(d_sin));
    }
    return lab_exit_code();
}
