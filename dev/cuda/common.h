/*
common.h: what every kernel-lab file (the .cu files of dev/cuda) shares. Modelled on llm.c's dev/cuda/common.h.

A lab file looks like:
    #define TESTING
    #define MOE_LAYERS_ONLY
    #include "../../train_moe.c"     // the CPU references: the trainer's own layer functions
    #include "common.h"

API (stable: later changes only add to it)

  errors
    cudaCheck(err)              any cudaError_t; prints file:line and the error string, exits 1
    cudaCheckLast()             cudaCheck(cudaGetLastError()), after a kernel launch
    cublasCheck(status)         any cublasStatus_t (cuBLAS and cuBLASLt); prints file:line, exits 1
  arithmetic
    ceil_div(a, b)              (a + b - 1) / b as int, host and device (for grid sizes)
  deterministic host random inputs (splitmix64; the same seed gives the same inputs everywhere)
    lab_seed(seed)              reset the generator (each main calls it once, first)
    lab_rand_u64(), lab_rand_uniform() in [0,1), lab_rand_normal() ~ N(0,1)
    make_random_float(n)        malloc'd float[n], uniform in [-1, 1)
    make_random_float_01(n)     malloc'd float[n], uniform in [0, 1)
    make_random_normal(n, std)  malloc'd float[n], N(0, std^2)
    make_random_int(n, V)       malloc'd int[n], uniform in [0, V)
    make_zeros_float(n)         malloc'd float[n] of zeros
    (all exit with a message if malloc fails; free them with free())
  device memory
    cuda_malloc_copy(host, n)   T* on the device holding a copy of host[0..n)
    cuda_calloc<T>(n)           T* on the device, zeroed
    cuda_to_host(host, dev, n)  copy n elements back
  bf16
    bf16                        = __nv_bfloat16
    round_to_bf16(x, n)         in place on the host: x[i] = float(bf16(x[i])), so a CPU reference can
                                see exactly the values a bf16 kernel reads
    cuda_malloc_copy_bf16(x, n) bf16* on the device holding bf16(x[i])
    lab_to_double(v)            float, double, int, bf16 -> double (used by validate_result)
  validation (prints one line per tensor; returns 1 when every element passes, else 0 and counts
  the failure so lab_exit_code() is non-zero)
    validate_result(dev, ref, name, n, tol)
        element i passes when |dev[i] - ref[i]| <= tol * max(1, |ref[i]|): absolute near zero,
        relative for large values; NaN/Inf never passes; tol = 0 means exact (use it for indices)
    validate_result_tol(dev, ref, name, n, atol, rtol)
        element i passes when |dev[i] - ref[i]| <= atol + rtol * |ref[i]|
  benchmarking
    benchmark_kernel(repeats, fn, args...)
        calls fn(args...) once to warm up, then `repeats` times, each timed alone with cudaEvents
        after the L2 cache has been flushed (a memset over twice its size, outside the timed range);
        returns the median in ms
  reporting
    lab_device_init()           prints the device (once); call at the top of main
    lab_version_arg(argc, argv) the version asked for on the command line (argv[1]); 0 = all
    lab_cublas()                a cuBLAS handle, created on first use: no TF32, and split-K partial sums
                                added in the compute type (fp32), never in a bf16 output's type (as the trainer's)
    lab_cublaslt()              a cuBLASLt handle, created on first use
    print_result(kernel, version, case, ok, ms, bytes, flops, peak)
        prints one machine-readable line (run_all.sh parses these):
        RESULT kernel=<file> version=<v> case=<shape> ok=<0|1> ms=<median> gbps=<x> tflops=<y> pct_peak=<z> peak=<which>
        gbps = bytes / time, tflops = flops / time ('-' when the count given is 0);
        pct_peak is against `peak`, one of
            PEAK_HBM   memory bandwidth   H100 SXM 3350 GB/s  (H200 4800, H100 PCIe 2000: by device name)
            PEAK_BF16  dense bf16 tensor  H100 SXM  989 TFLOP/s (H100 PCIe 756)
            PEAK_TF32  dense tf32 tensor  H100 SXM  495 TFLOP/s (H100 PCIe 378)
            PEAK_FP32  fp32 non-tensor    H100 SXM   67 TFLOP/s (H100 PCIe 51)
        ok=0 prints ms=- (a version that fails validation is not timed)
    lab_exit_code()             0 when every validate_result passed, else 1: `return lab_exit_code();`
  small host helpers (added later)
    lab_max_abs(x, n)           max |x[i]| of a host float array (to scale an absolute tolerance)
    make_router_logits(N, E, K, skew)
                                malloc'd float z[N*E]: router logits for MoE tests, z = N(0,1) + bias_e.
                                skew = 0: bias 0 (balanced routing). skew = 1: bias_e = -0.25 e for the
                                first live = min(E, max(2K, E/2)) experts and -30 beyond them, so the low
                                experts take most slots and the upper ones none at all
    lab_print_load(counts, E)   one line: busiest expert, mean load, number of empty experts
*/
#pragma once

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <cublasLt.h>

// ----------------------------------------------------------------------------
// errors

inline void lab_cuda_check(cudaError_t err, const char* file, int line) {
    if (err != cudaSuccess) {
        fprintf(stderr, "[CUDA ERROR] at %s:%d\n  %s: %s\n", file, line, cudaGetErrorName(err), cudaGetErrorString(err));
        exit(EXIT_FAILURE);
    }
}
#define cudaCheck(err) lab_cuda_check((err), __FILE__, __LINE__)
#define cudaCheckLast() lab_cuda_check(cudaGetLastError(), __FILE__, __LINE__)

inline void lab_cublas_check(cublasStatus_t status, const char* file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "[cuBLAS ERROR] at %s:%d\n  status %d (%s)\n", file, line, (int)status, cublasGetStatusString(status));
        exit(EXIT_FAILURE);
    }
}
#define cublasCheck(status) lab_cublas_check((status), __FILE__, __LINE__)

// ----------------------------------------------------------------------------
// arithmetic

__host__ __device__ constexpr inline int ceil_div(long long a, long long b) { return (int)((a + b - 1) / b); }

// ----------------------------------------------------------------------------
// deterministic host random inputs (splitmix64)

inline uint64_t lab_rng_state = 1337;
inline void lab_seed(uint64_t seed) { lab_rng_state = seed; }
inline uint64_t lab_rand_u64() {
    uint64_t z = (lab_rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
inline float lab_rand_uniform() { return (lab_rand_u64() >> 40) / 16777216.0f; } // [0,1)
inline float lab_rand_normal() {
    float u1 = ((lab_rand_u64() >> 40) + 1.0f) / 16777217.0f; // (0,1]
    float u2 = lab_rand_uniform();
    return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}

template<class T> inline T* lab_host_alloc(size_t n, const char* file, int line) {
    T* p = (T*)malloc((n ? n : 1) * sizeof(T));
    if (p == NULL) {
        fprintf(stderr, "[malloc ERROR] at %s:%d: %zu bytes\n", file, line, n * sizeof(T));
        exit(EXIT_FAILURE);
    }
    return p;
}
#define make_random_float(n) lab_make_random_float((n), __FILE__, __LINE__)
#define make_random_float_01(n) lab_make_random_float_01((n), __FILE__, __LINE__)
#define make_random_normal(n, std) lab_make_random_normal((n), (std), __FILE__, __LINE__)
#define make_random_int(n, V) lab_make_random_int((n), (V), __FILE__, __LINE__)
#define make_zeros_float(n) lab_make_zeros_float((n), __FILE__, __LINE__)
inline float* lab_make_random_float(size_t n, const char* file, int line) {
    float* x = lab_host_alloc<float>(n, file, line);
    for (size_t i = 0; i < n; i++) x[i] = 2.0f * lab_rand_uniform() - 1.0f;
    return x;
}
inline float* lab_make_random_float_01(size_t n, const char* file, int line) {
    float* x = lab_host_alloc<float>(n, file, line);
    for (size_t i = 0; i < n; i++) x[i] = lab_rand_uniform();
    return x;
}
inline float* lab_make_random_normal(size_t n, float std, const char* file, int line) {
    float* x = lab_host_alloc<float>(n, file, line);
    for (size_t i = 0; i < n; i++) x[i] = std * lab_rand_normal();
    return x;
}
inline int* lab_make_random_int(size_t n, int V, const char* file, int line) {
    int* x = lab_host_alloc<int>(n, file, line);
    for (size_t i = 0; i < n; i++) x[i] = (int)(lab_rand_u64() % (uint64_t)V);
    return x;
}
inline float* lab_make_zeros_float(size_t n, const char* file, int line) {
    float* x = lab_host_alloc<float>(n, file, line);
    memset(x, 0, n * sizeof(float));
    return x;
}

// ----------------------------------------------------------------------------
// device memory

template<class T> inline T* cuda_malloc_copy(const T* host, size_t n) {
    T* d;
    cudaCheck(cudaMalloc(&d, (n ? n : 1) * sizeof(T)));
    if (n) cudaCheck(cudaMemcpy(d, host, n * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}
template<class T> inline T* cuda_calloc(size_t n) {
    T* d;
    cudaCheck(cudaMalloc(&d, (n ? n : 1) * sizeof(T)));
    cudaCheck(cudaMemset(d, 0, (n ? n : 1) * sizeof(T)));
    return d;
}
template<class T> inline void cuda_to_host(T* host, const T* dev, size_t n) {
    if (n) cudaCheck(cudaMemcpy(host, dev, n * sizeof(T), cudaMemcpyDeviceToHost));
}

// ----------------------------------------------------------------------------
// bf16

typedef __nv_bfloat16 bf16;

inline void round_to_bf16(float* x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = __bfloat162float(__float2bfloat16(x[i]));
}
inline bf16* cuda_malloc_copy_bf16(const float* x, size_t n) {
    std::vector<bf16> h(n ? n : 1);
    for (size_t i = 0; i < n; i++) h[i] = __float2bfloat16(x[i]);
    return cuda_malloc_copy(h.data(), n);
}
inline double lab_to_double(float v) { return (double)v; }
inline double lab_to_double(double v) { return v; }
inline double lab_to_double(int v) { return (double)v; }
inline double lab_to_double(bf16 v) { return (double)__bfloat162float(v); }

// ----------------------------------------------------------------------------
// validation

inline int lab_failures = 0;

template<class D, class T>
int validate_result_tol(const D* device_ptr, const T* cpu_ref, const char* name, size_t n, double atol, double rtol) {
    std::vector<D> got(n ? n : 1);
    cuda_to_host(got.data(), device_ptr, n);
    double max_abs = 0.0, max_rel = 0.0;
    size_t nbad = 0;
    for (size_t i = 0; i < n; i++) {
        double r = lab_to_double(cpu_ref[i]), g = lab_to_double(got[i]);
        double err = fabs(g - r);
        int ok = isfinite(g) && err <= atol + rtol * fabs(r);
        if (!isfinite(g)) err = INFINITY;
        if (err > max_abs) max_abs = err;
        double rel = err / (fabs(r) > 1e-30 ? fabs(r) : 1e-30);
        if (fabs(r) > atol && rel > max_rel) max_rel = rel; // relative error only where it means something
        if (!ok) {
            if (nbad < 5) printf("    %s[%zu]: gpu %.8g cpu %.8g (|err| %.3g)\n", name, i, g, r, err);
            nbad++;
        }
    }
    int pass = nbad == 0;
    printf("  %-14s n=%-10zu max|err| %.3e  max rel %.3e  (atol %.1e rtol %.1e)  %s", name, n, max_abs, max_rel,
           atol, rtol, pass ? "OK" : "FAIL");
    if (!pass) printf(": %zu elements out of tolerance", nbad);
    printf("\n");
    if (!pass) lab_failures++;
    return pass;
}
template<class D, class T>
int validate_result(const D* device_ptr, const T* cpu_ref, const char* name, size_t n, double tol) {
    return validate_result_tol(device_ptr, cpu_ref, name, n, tol, tol);
}

inline int lab_exit_code() {
    if (lab_failures) printf("%d validation(s) FAILED\n", lab_failures);
    return lab_failures ? 1 : 0;
}

// ----------------------------------------------------------------------------
// benchmarking

inline void* lab_flush_buf = NULL;
inline size_t lab_flush_bytes = 0;

inline void lab_flush_l2() {
    if (lab_flush_buf == NULL) {
        int dev, l2 = 0;
        cudaCheck(cudaGetDevice(&dev));
        cudaCheck(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
        lab_flush_bytes = (size_t)(l2 > 0 ? l2 : 64 << 20) * 2;
        cudaCheck(cudaMalloc(&lab_flush_buf, lab_flush_bytes));
    }
    cudaCheck(cudaMemset(lab_flush_buf, 0, lab_flush_bytes));
}

template<class Kernel, class... Args>
float benchmark_kernel(int repeats, Kernel fn, Args&&... args) {
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    fn(args...); // warm-up (and first-call setup inside cuBLAS)
    cudaCheckLast();
    std::vector<float> ms(repeats > 0 ? repeats : 1);
    for (int i = 0; i < repeats; i++) {
        lab_flush_l2();
        cudaCheck(cudaEventRecord(start));
        fn(args...);
        cudaCheck(cudaEventRecord(stop));
        cudaCheck(cudaEventSynchronize(stop));
        cudaCheckLast();
        cudaCheck(cudaEventElapsedTime(&ms[i], start, stop));
    }
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    if (repeats <= 0) return 0.0f;
    std::sort(ms.begin(), ms.end());
    return ms[repeats / 2];
}

// ----------------------------------------------------------------------------
// device, handles, command line, reporting

enum LabPeak { PEAK_HBM, PEAK_BF16, PEAK_TF32, PEAK_FP32 };

inline char lab_device_name[256] = "unknown";

inline void lab_device_init() {
    static int done = 0;
    if (done) return;
    done = 1;
    int dev;
    cudaDeviceProp prop;
    cudaCheck(cudaGetDevice(&dev));
    cudaCheck(cudaGetDeviceProperties(&prop, dev));
    snprintf(lab_device_name, sizeof(lab_device_name), "%s", prop.name);
    printf("device %d: %s, sm_%d%d, %d SMs, %.1f GiB, L2 %d MiB\n", dev, prop.name, prop.major, prop.minor,
           prop.multiProcessorCount, prop.totalGlobalMem / 1073741824.0, prop.l2CacheSize >> 20);
}

// the peak a result is measured against (GB/s for PEAK_HBM, TFLOP/s otherwise)
inline double lab_peak_value(LabPeak p) {
    int h200 = strstr(lab_device_name, "H200") != NULL;
    int pcie = strstr(lab_device_name, "H100") != NULL && strstr(lab_device_name, "PCIe") != NULL;
    switch (p) {
        case PEAK_HBM:  return h200 ? 4800.0 : pcie ? 2000.0 : 3350.0;
        case PEAK_BF16: return pcie ? 756.0 : 989.0;
        case PEAK_TF32: return pcie ? 378.0 : 495.0;
        case PEAK_FP32: return pcie ? 51.0 : 67.0;
    }
    return 1.0;
}
inline const char* lab_peak_name(LabPeak p) {
    switch (p) {
        case PEAK_HBM:  return "hbm";
        case PEAK_BF16: return "bf16";
        case PEAK_TF32: return "tf32";
        case PEAK_FP32: return "fp32";
    }
    return "?";
}

inline int lab_version_arg(int argc, char** argv) {
    if (argc < 2) return 0;
    char* end;
    long v = strtol(argv[1], &end, 10);
    if (*end != '\0' || v < 0) {
        fprintf(stderr, "usage: %s [version]   (version: a positive integer, or 0/absent for all)\n", argv[0]);
        exit(EXIT_FAILURE);
    }
    return (int)v;
}

inline cublasHandle_t lab_cublas() {
    static cublasHandle_t h = NULL;
    if (h == NULL) {
        cublasCheck(cublasCreate(&h));
        cublasCheck(cublasSetMathMode(h, (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
    }
    return h;
}
inline cublasLtHandle_t lab_cublaslt() {
    static cublasLtHandle_t h = NULL;
    if (h == NULL) cublasCheck(cublasLtCreate(&h));
    return h;
}

inline void print_result(const char* kernel, int version, const char* shape, int ok, float ms, double bytes,
                         double flops, LabPeak peak) {
    printf("RESULT kernel=%s version=%d case=%s ok=%d", kernel, version, shape, ok ? 1 : 0);
    if (!ok || ms <= 0.0f) { printf(" ms=- gbps=- tflops=- pct_peak=- peak=%s\n", lab_peak_name(peak)); return; }
    double gbps = bytes > 0 ? bytes / (ms * 1e-3) / 1e9 : 0.0;
    double tflops = flops > 0 ? flops / (ms * 1e-3) / 1e12 : 0.0;
    double got = peak == PEAK_HBM ? gbps : tflops;
    printf(" ms=%.4f", ms);
    if (bytes > 0) printf(" gbps=%.1f", gbps); else printf(" gbps=-");
    if (flops > 0) printf(" tflops=%.2f", tflops); else printf(" tflops=-");
    if (got > 0) printf(" pct_peak=%.1f", 100.0 * got / lab_peak_value(peak)); else printf(" pct_peak=-");
    printf(" peak=%s\n", lab_peak_name(peak));
    fflush(stdout);
}

// ----------------------------------------------------------------------------
// small host helpers

inline float lab_max_abs(const float* x, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) m = fabsf(x[i]) > m ? fabsf(x[i]) : m;
    return m;
}

#define make_router_logits(N, E, K, skew) lab_make_router_logits((N), (E), (K), (skew), __FILE__, __LINE__)
inline float* lab_make_router_logits(int N, int E, int K, int skew, const char* file, int line) {
    float* z = lab_host_alloc<float>((size_t)N * E, file, line);
    int live = 2 * K > E / 2 ? 2 * K : E / 2;
    if (live > E) live = E;
    for (int n = 0; n < N; n++)
        for (int e = 0; e < E; e++) {
            float bias = !skew ? 0.0f : e < live ? -0.25f * e : -30.0f;
            z[(size_t)n * E + e] = lab_rand_normal() + bias;
        }
    return z;
}

inline void lab_print_load(const int* counts, int E) {
    long total = 0;
    int cmax = 0, empty = 0;
    for (int e = 0; e < E; e++) {
        total += counts[e];
        if (counts[e] > cmax) cmax = counts[e];
        if (counts[e] == 0) empty++;
    }
    printf("load: busiest expert %d slots, mean %.1f, %d of %d experts empty\n", cmax, (double)total / E, empty, E);
}
