/*
The CUDA twin of train_moe.c: the same Mixtral-style MoE trainer (same structs, same function names,
same flags, same per-step line, same checkpoint format), with every loop of the CPU file turned into
a kernel or a cuBLAS call beneath a function of the same name. A checkpoint written by either trainer
loads in the other.

The MoE layer reads as the same pipeline:  router -> topk -> permute -> experts -> unpermute
Only the K chosen experts of a token are computed (dropless): the expert buffers have N*K rows, and the
expert matmuls are grouped GEMMs (cublasGemmGroupedBatchedEx) with one problem per expert that got
tokens (the expert weight gradients: one cublasGemmEx per expert, accumulated in fp32 straight into
the fp32 gradient). Their sizes live on the host, so each layer copies E+1 ints (the expert offsets)
device->host once in the forward pass: the one synchronisation of the MoE path.

Precision, chosen at build time:
  PRECISION=FP32  every tensor fp32 (cuBLAS without TF32): diffed against the CPU at 1e-4
  PRECISION=BF16  (default) bf16 weights and activations; fp32 master weights, gradients, AdamW state,
                  router logits and softmax, norm statistics, attention softmax statistics and losses;
                  every matmul accumulates in fp32 (CUBLAS_COMPUTE_32F), split-K sums included
                  (CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)
Deterministic: no float atomics anywhere; every reduction runs in a fixed order (per-block partials
added in block order), so the same seed gives the same bits run after run on the same GPU. (USE_CUDNN=1
asks cuDNN for its deterministic attention backward.)
Non-finite router logits stop training as train_moe.c's router_check does: the top-k kernel counts the
tokens, and the host reads the counts once per forward, with the losses.

Host code (data loader, tokenizer, checkpoint file format, LR schedule, flags, the CPU model itself)
is train_moe.c, included below inside `namespace cpu`, not copied.

Data parallel (USE_MPI=1 builds, one process per GPU under mpirun): -b stays the global batch; every
rank reads it and trains on its own B/R sequences; NCCL sums each layer's expert counts (the
load-balancing loss of the whole batch, as Megatron-Core) and, after the last micro-batch, the gradients,
so every rank takes the same AdamW step. Rank 0 alone prints, logs, evaluates and saves checkpoints.

Beside this file, as llm.c keeps llmc/zero.cuh and llmc/cudnn_att.cpp: dev/moe/dist_nccl.cuh (processes:
MPI and NCCL, the dist_* functions, named as train_moe.c's) and dev/moe/cudnn_att.cuh (USE_CUDNN=1:
attention through cuDNN), each #included at a marked point below.

Build: make train_moe_cu       (PRECISION=FP32: the fp32 build; USE_CUDNN=1: cuDNN attention)
   or: nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fopenmp -DOMP [-DPRECISION_FP32] train_moe.cu -lcublas -lcublasLt -o train_moe_cu
       make train_moe_cu_mpi   (data parallel; needs MPI and NCCL)
Run:   ./train_moe_cu -h        mpirun -n 8 ./train_moe_cu_mpi -b 64 ...
*/
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <errno.h>
#include <glob.h>
#include <unistd.h>
#include <sys/stat.h>
#include <dirent.h>
#ifdef TESTING
#include <sys/wait.h> // dev/moe/testing.h's (test_moe_cu.cu includes it inside namespace cpu)
#endif
#ifdef OMP
#include <omp.h>
#endif
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#ifdef USE_MPI // dev/moe/dist_nccl.cuh's headers (train_moe.c's dev/moe/dist.h is one process here)
#include <mpi.h>
#include <nccl.h>
#endif
#ifdef USE_CUDNN // dev/moe/cudnn_att.cuh's headers, here before train_moe.c's namespace cpu (see that file)
#include <map>
#include <tuple>
#include <memory>
#include <unordered_map>
#include <string>
#include <cudnn_frontend.h> // header-only, from PyPI nvidia-cudnn-frontend (see dev/cuda_build.mk)
#endif

// the CPU trainer, whole: its host code is ours, and its model is the reference the GPU test diffs against.
// (With TESTING defined, as by test_moe_cu.cu, train_moe.c leaves out its main(), and so do we.)
namespace cpu {
#include "train_moe.c"
}
using cpu::MoEConfig; using cpu::TrainState; using cpu::DataPos; using cpu::DataLoader; using cpu::Tokenizer;
using cpu::malloc_check; using cpu::calloc_check; using cpu::fopen_check; using cpu::fread_check;
using cpu::file_size; using cpu::hash3; using cpu::rng_f32; using cpu::now_ms;
using cpu::fill_param_sizes; using cpu::model_config_check; using cpu::param_names; using cpu::param_is_matrix;
using cpu::lr_schedule; using cpu::rope_tables; using cpu::sample_mult;
using cpu::loader_init; using cpu::loader_seek; using cpu::loader_next_batch; using cpu::loader_reset; using cpu::loader_free;
using cpu::tokenizer_init; using cpu::tokenizer_print; using cpu::tokenizer_free;

// ----------------------------------------------------------------------------
// precision: floatX is the type of weights and activations the kernels read

#if defined(PRECISION_FP32)
typedef float floatX;
#define CUDA_X CUDA_R_32F
#define PRECISION_NAME "fp32"
#ifdef USE_CUDNN
#error "USE_CUDNN=1 needs the bf16 build: cuDNN's fused attention has no fp32 kernels"
#endif
__device__ __forceinline__ float tof(float x) { return x; }
__device__ __forceinline__ float tox(float x) { return x; }
#else
#ifndef PRECISION_BF16
#define PRECISION_BF16
#endif
typedef __nv_bfloat16 floatX;
#define CUDA_X CUDA_R_16BF
#define PRECISION_NAME "bf16"
__device__ __forceinline__ float tof(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ __nv_bfloat16 tox(float x) { return __float2bfloat16_rn(x); }
#endif

#ifdef PRECISION_BF16
// bf16 -> float on the host (bf16 is the top half of a float32)
static float floatX_to_float(floatX x) {
    uint16_t b;
    memcpy(&b, &x, 2);
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
#endif

// ----------------------------------------------------------------------------
// CUDA utilities: checked calls and allocation, reductions

static void cuda_check(cudaError_t err, const char* file, int line) {
    if (err != cudaSuccess) cpu::die("CUDA: %s", cudaGetErrorString(err), file, line);
}
#define cudaCheck(err) cuda_check(err, __FILE__, __LINE__)
static void cublas_check(cublasStatus_t st, const char* file, int line) {
    if (st != CUBLAS_STATUS_SUCCESS) cpu::die("cuBLAS: %s", cublasGetStatusString(st), file, line);
}
#define cublasCheck(st) cublas_check(st, __FILE__, __LINE__)

static size_t gpu_bytes_allocated = 0; // what we cudaMalloc'd (cuBLAS workspaces come on top)
static void* cuda_malloc_check(size_t bytes, const char* file, int line) {
    void* p = NULL;
    cudaError_t err = cudaMalloc(&p, bytes ? bytes : 1);
    if (err != cudaSuccess) {
        fprintf(stderr, "Error: cudaMalloc of %zu bytes failed (%zu already allocated): %s\n  (at %s:%d)\n",
                bytes, gpu_bytes_allocated, cudaGetErrorString(err), file, line);
        exit(EXIT_FAILURE);
    }
    gpu_bytes_allocated += bytes;
    return p;
}
#define cudaMallocCheck(bytes) cuda_malloc_check(bytes, __FILE__, __LINE__)

static void cuda_free(void* p) { if (p) cudaCheck(cudaFree(p)); }

static inline unsigned ceil_div(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }

// the GPU's memory in use (all processes, cuBLAS workspaces included) and its high-water mark
static double gpu_mem_peak_mib = 0.0;
static double gpu_mem_sample(void) {
    size_t free_b = 0, total_b = 0;
    cudaCheck(cudaMemGetInfo(&free_b, &total_b));
    double used = (double)(total_b - free_b) / (1024.0 * 1024.0);
    if (used > gpu_mem_peak_mib) gpu_mem_peak_mib = used;
    return used;
}

#define FULL_MASK 0xffffffffu
// warp sum, then lane 0's value to every lane (so all lanes use the very same bits)
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return __shfl_sync(FULL_MASK, v, 0);
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}
// tree sums over a block (blockDim.x a power of 2, sh holds blockDim.x values): a fixed order
template <typename Tv>
__device__ Tv block_sum(Tv v, Tv* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    Tv r = sh[0];
    __syncthreads();
    return r;
}
__device__ float block_max(float v, float* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

__global__ void cast_kernel(floatX* out, const float* inp, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = tox(inp[i]);
}
// out[n] = floatX(inp[n]); in fp32 builds the same buffer may be passed (then nothing happens)
static void cast_to_floatX(floatX* out, const float* inp, size_t n) {
    if ((const void*)out == (const void*)inp || n == 0) return;
    cast_kernel<<<ceil_div(n, 256), 256>>>(out, inp, n);
    cudaCheck(cudaGetLastError());
}

// device floatX[n] -> host float[n]
static void copy_floatX_to_host(float* dst, const floatX* src, size_t n) {
#ifdef PRECISION_BF16
    floatX* tmp = (floatX*)mallocCheck(n * sizeof(floatX));
    cudaCheck(cudaMemcpy(tmp, src, n * sizeof(floatX), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++) dst[i] = floatX_to_float(tmp[i]);
    free(tmp);
#else
    cudaCheck(cudaMemcpy(dst, src, n * sizeof(float), cudaMemcpyDeviceToHost));
#endif
}

// ----------------------------------------------------------------------------
// processes (USE_MPI builds: data parallel, one process per GPU under mpirun): MPI and NCCL, kept in their
// own file as llm.c keeps llmc/zero.cuh. Without USE_MPI: one rank, and its functions do nothing.

#include "dev/moe/dist_nccl.cuh"

// ----------------------------------------------------------------------------
// GEMM: every matmul of the model goes through cuBLAS (column-major), row-major tensors read transposed.
// A and B are floatX; C is floatX or fp32 (ctype); accumulation is always fp32.

static cublasHandle_t cublas_handle;

static void gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const floatX* A, int lda,
                 const floatX* B, int ldb, void* C, cudaDataType_t ctype, int ldc, float beta) {
    const float alpha = 1.0f;
    cublasCheck(cublasGemmEx(cublas_handle, ta, tb, m, n, k, &alpha, A, CUDA_X, lda, B, CUDA_X, ldb, &beta, C, ctype,
                             ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// out[N,OC] = inp[N,IC] . weight[OC,IC]^T
void matmul_forward(floatX* out, const floatX* inp, const floatX* weight, int N, int IC, int OC) {
    gemm(CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, weight, IC, inp, IC, out, CUDA_X, OC, 0.0f);
}
// dinp[N,IC] += dout[N,OC] . weight[OC,IC];  dweight[OC,IC] (fp32) += dout^T . inp
void matmul_backward(floatX* dinp, float* dweight, const floatX* dout, const floatX* inp, const floatX* weight,
                     int N, int IC, int OC) {
    if (dinp) gemm(CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, weight, IC, dout, OC, dinp, CUDA_X, IC, 1.0f);
    gemm(CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, inp, IC, dout, OC, dweight, CUDA_R_32F, IC, 1.0f);
}

// A grouped GEMM: a list of independent problems (here: one per expert that got tokens, each of its own
// size) run by one cublasGemmGroupedBatchedEx call. Sizes, strides and scalars are host arrays, read
// during the call; the matrix pointers must be on the device. They are staged through a ring of
// GROUP_SLOTS pinned host + device buffers: a slot is refilled only after the event recorded behind
// its last GEMM has fired, so the host never waits on the GPU unless it runs GROUP_SLOTS calls ahead.
#define GROUP_SLOTS 16
typedef struct {
    int n, cap;
    cublasOperation_t *ta, *tb;
    int *m, *nn, *k, *lda, *ldb, *ldc, *size;
    float *alpha, *beta;
    const void **A, **B;
    void** C;
    int slot;
    const void** ptrs_h[GROUP_SLOTS]; // pinned: A[0..n) B[0..n) C[0..n)
    const void** ptrs_d[GROUP_SLOTS];
    cudaEvent_t done[GROUP_SLOTS];
} GemmGroup;

static void group_init(GemmGroup* g, int cap) {
    memset(g, 0, sizeof(*g));
    g->cap = cap;
    g->ta = (cublasOperation_t*)mallocCheck(cap * sizeof(cublasOperation_t));
    g->tb = (cublasOperation_t*)mallocCheck(cap * sizeof(cublasOperation_t));
    int** ints[7] = {&g->m, &g->nn, &g->k, &g->lda, &g->ldb, &g->ldc, &g->size};
    for (int i = 0; i < 7; i++) *ints[i] = (int*)mallocCheck(cap * sizeof(int));
    g->alpha = (float*)mallocCheck(cap * sizeof(float));
    g->beta = (float*)mallocCheck(cap * sizeof(float));
    g->A = (const void**)mallocCheck(cap * sizeof(void*));
    g->B = (const void**)mallocCheck(cap * sizeof(void*));
    g->C = (void**)mallocCheck(cap * sizeof(void*));
    for (int s = 0; s < GROUP_SLOTS; s++) {
        cudaCheck(cudaMallocHost((void**)&g->ptrs_h[s], 3 * cap * sizeof(void*)));
        g->ptrs_d[s] = (const void**)cudaMallocCheck(3 * cap * sizeof(void*));
        cudaCheck(cudaEventCreateWithFlags(&g->done[s], cudaEventDisableTiming));
    }
}
static void group_free(GemmGroup* g) {
    void* hs[] = {g->ta, g->tb, g->m, g->nn, g->k, g->lda, g->ldb, g->ldc, g->size, g->alpha, g->beta, g->A, g->B, g->C};
    for (size_t i = 0; i < sizeof(hs) / sizeof(hs[0]); i++) free(hs[i]);
    for (int s = 0; s < GROUP_SLOTS; s++) {
        cudaCheck(cudaEventSynchronize(g->done[s]));
        cudaCheck(cudaFreeHost(g->ptrs_h[s]));
        cuda_free(g->ptrs_d[s]);
        cudaCheck(cudaEventDestroy(g->done[s]));
    }
}
// add the problem C[m,n] (col-major, ldc) = op(A)[m,k] . op(B)[k,n] + beta * C
static void group_add(GemmGroup* g, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                      const floatX* A, int lda, const floatX* B, int ldb, float beta, floatX* C, int ldc) {
    if (g->n == g->cap) { fprintf(stderr, "Error: grouped GEMM holds at most %d problems\n", g->cap); exit(EXIT_FAILURE); }
    int i = g->n++;
    g->ta[i] = ta; g->tb[i] = tb; g->m[i] = m; g->nn[i] = n; g->k[i] = k;
    g->lda[i] = lda; g->ldb[i] = ldb; g->ldc[i] = ldc; g->size[i] = 1;
    g->alpha[i] = 1.0f; g->beta[i] = beta;
    g->A[i] = A; g->B[i] = B; g->C[i] = C;
}
// run the problems added since the last run (one group of size 1 each), then empty the list
static void group_run(GemmGroup* g) {
    int n = g->n, s = g->slot;
    if (n == 0) return;
    g->slot = (s + 1) % GROUP_SLOTS;
    cudaCheck(cudaEventSynchronize(g->done[s])); // this slot's previous GEMM has read its pointers
    const void** h = g->ptrs_h[s];
    memcpy(h, g->A, n * sizeof(void*));
    memcpy(h + n, g->B, n * sizeof(void*));
    memcpy(h + 2 * n, g->C, n * sizeof(void*));
    const void** d = g->ptrs_d[s];
    cudaCheck(cudaMemcpyAsync(d, h, 3 * n * sizeof(void*), cudaMemcpyHostToDevice, 0));
    cublasCheck(cublasGemmGroupedBatchedEx(cublas_handle, g->ta, g->tb, g->m, g->nn, g->k, g->alpha,
                                           d, CUDA_X, g->lda, d + n, CUDA_X, g->ldb, g->beta,
                                           (void* const*)(d + 2 * n), CUDA_X, g->ldc, n, g->size,
                                           CUBLAS_COMPUTE_32F));
    cudaCheck(cudaEventRecord(g->done[s], 0));
    g->n = 0;
}

// ----------------------------------------------------------------------------
// layers: embedding, RMSNorm, RoPE, attention

__global__ void encoder_forward_kernel(floatX* out, const int* tokens, const floatX* wte, int N, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * C) return;
    size_t n = i / C, c = i % C;
    out[i] = wte[(size_t)tokens[n] * C + c];
}
// out[N,C] = wte[tokens[n], :]   (tokens on the device)
void encoder_forward(floatX* out, const int* tokens, const floatX* wte, int N, int C) {
    encoder_forward_kernel<<<ceil_div((size_t)N * C, 256), 256>>>(out, tokens, wte, N, C);
    cudaCheck(cudaGetLastError());
}

// one block per distinct token: its positions (in token order) summed, then added to its row of dwte
__global__ void encoder_backward_kernel(float* dwte, const floatX* dout, const int* uniq, const int* start,
                                        const int* pos, int C) {
    int u = blockIdx.x, tok = uniq[u];
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float s = 0.0f;
        for (int i = start[u]; i < start[u + 1]; i++) s += tof(dout[(size_t)pos[i] * C + c]);
        dwte[(size_t)tok * C + c] += s;
    }
}
// dwte[V,C] += scatter of dout[N,C] by tokens (host array). Repeated tokens are bucketed on the host
// (a counting sort), so no two threads ever add into the same row: no atomics, a fixed order.
// work: host ints, V + 3N + 1; work_d: device ints, 3N + 1
void encoder_backward(float* dwte, const floatX* dout, const int* tokens, int N, int C, int V, int* work, int* work_d) {
    int* cnt = work;          // V: per token count, then its next free slot
    int* uniq = work + V;     // nu distinct tokens
    int* start = uniq + N;    // nu + 1 bucket starts
    int* pos = start + N + 1; // N positions, grouped by token
    memset(cnt, 0, (size_t)V * sizeof(int));
    for (int n = 0; n < N; n++) cnt[tokens[n]]++;
    int nu = 0, run = 0;
    for (int v = 0; v < V; v++)
        if (cnt[v]) { uniq[nu] = v; start[nu] = run; run += cnt[v]; cnt[v] = start[nu]; nu++; }
    start[nu] = N;
    for (int n = 0; n < N; n++) pos[cnt[tokens[n]]++] = n;
    int* d_uniq = work_d;
    int* d_start = work_d + N;
    int* d_pos = work_d + 2 * N + 1;
    cudaCheck(cudaMemcpy(d_uniq, uniq, nu * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_start, start, (nu + 1) * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_pos, pos, N * sizeof(int), cudaMemcpyHostToDevice));
    encoder_backward_kernel<<<nu, 128>>>(dwte, dout, d_uniq, d_start, d_pos, C);
    cudaCheck(cudaGetLastError());
}

// one warp per row
__global__ void rmsnorm_forward_kernel(floatX* out, float* rstd, const floatX* inp, const floatX* w, int N, int C, float eps) {
    int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const floatX* x = inp + (size_t)n * C;
    float ss = 0.0f;
    for (int c = lane; c < C; c += 32) { float xi = tof(x[c]); ss += xi * xi; }
    ss = warp_sum(ss);
    float r = 1.0f / sqrtf(ss / C + eps);
    floatX* o = out + (size_t)n * C;
    for (int c = lane; c < C; c += 32) o[c] = tox(tof(x[c]) * r * tof(w[c]));
    if (lane == 0) rstd[n] = r;
}
// out[N,C] = inp / sqrt(mean(inp^2) + eps) * w ; rstd[N] (fp32) saved for the backward
void rmsnorm_forward(floatX* out, float* rstd, const floatX* inp, const floatX* w, int N, int C, float eps) {
    rmsnorm_forward_kernel<<<ceil_div(N, 8), 256>>>(out, rstd, inp, w, N, C, eps);
    cudaCheck(cudaGetLastError());
}

__global__ void rmsnorm_backward_dx_kernel(floatX* dinp, const floatX* dout, const floatX* inp, const floatX* w,
                                           const float* rstd, int N, int C) {
    int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const floatX* x = inp + (size_t)n * C;
    const floatX* dy = dout + (size_t)n * C;
    floatX* dx = dinp + (size_t)n * C;
    float r = rstd[n];
    float dot = 0.0f; // sum_c dy*w*x
    for (int c = lane; c < C; c += 32) dot += tof(dy[c]) * tof(w[c]) * tof(x[c]);
    dot = warp_sum(dot);
    float k = dot * r * r * r / C;
    for (int c = lane; c < C; c += 32) dx[c] = tox(tof(dx[c]) + (tof(dy[c]) * tof(w[c]) * r - tof(x[c]) * k));
}
// dw partial sums: block (32 columns, 8 row lanes) over NORM_ROWS rows -> partial[blockIdx.y, c]
#define NORM_ROWS 256
__global__ void rmsnorm_backward_dw_kernel(float* partial, const floatX* dout, const floatX* inp, const float* rstd, int N, int C) {
    __shared__ float sh[8][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    int n0 = blockIdx.y * NORM_ROWS, n1 = min(n0 + NORM_ROWS, N);
    float s = 0.0f;
    if (c < C)
        for (int n = n0 + threadIdx.y; n < n1; n += 8) s += tof(dout[(size_t)n * C + c]) * tof(inp[(size_t)n * C + c]) * rstd[n];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float t = 0.0f;
        for (int i = 0; i < 8; i++) t += sh[i][threadIdx.x];
        partial[(size_t)blockIdx.y * C + c] = t;
    }
}
// out[c] += sum over p (in order) of partial[p, c]
__global__ void column_sum_kernel(float* out, const float* partial, int nparts, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.0f;
    for (int p = 0; p < nparts; p++) s += partial[(size_t)p * C + c];
    out[c] += s;
}
// dinp[N,C] += d/dinp ; dw[C] (fp32) += sum_n dout * inp * rstd. partial: scratch of ceil(N/NORM_ROWS)*C floats
void rmsnorm_backward(floatX* dinp, float* dw, const floatX* dout, const floatX* inp, const floatX* w,
                      const float* rstd, int N, int C, float* partial) {
    rmsnorm_backward_dx_kernel<<<ceil_div(N, 8), 256>>>(dinp, dout, inp, w, rstd, N, C);
    cudaCheck(cudaGetLastError());
    int nparts = ceil_div(N, NORM_ROWS);
    rmsnorm_backward_dw_kernel<<<dim3(ceil_div(C, 32), nparts), dim3(32, 8)>>>(partial, dout, inp, rstd, N, C);
    cudaCheck(cudaGetLastError());
    column_sum_kernel<<<ceil_div(C, 256), 256>>>(dw, partial, nparts, C);
    cudaCheck(cudaGetLastError());
}

__global__ void rope_kernel(floatX* x, const float* fcos, const float* fsin, int N, int T, int NH, int D, float dir) {
    int half = D / 2;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * NH * half) return;
    int i = idx % half;
    size_t nh = idx / half; // n * NH + h
    int t = (int)((nh / NH) % T);
    float c = fcos[(size_t)t * half + i], s = dir * fsin[(size_t)t * half + i];
    floatX* v = x + nh * D;
    float x0 = tof(v[i]), x1 = tof(v[i + half]);
    v[i] = tox(x0 * c - x1 * s);
    v[i + half] = tox(x1 * c + x0 * s);
}
// rotate-half RoPE in place on x[B,T,NH,D]; dir = +1 forward, -1 backward (the inverse rotation)
void rope_apply(floatX* x, const float* freqs_cos, const float* freqs_sin, int B, int T, int NH, int D, int dir) {
    size_t n = (size_t)B * T * NH * (D / 2);
    rope_kernel<<<ceil_div(n, 256), 256>>>(x, freqs_cos, freqs_sin, B * T, T, NH, D, (float)dir);
    cudaCheck(cudaGetLastError());
}

// Causal attention, flash-style: no T x T matrix is ever stored. One warp per query row (b, h, t): its
// lanes score 32 keys at a time, keep a running max and sum (online softmax) and accumulate the output,
// lane l owning dims l, l+32, ... The backward recomputes the probabilities from the saved
// logsumexp lse[b,h,t]. Head size D <= ATT_MAXD. Query head h reads kv head h / (H/Hkv).
#define ATT_MAXD 256
#define ATT_WARPS 4
#define ATT_ACC (ATT_MAXD / 32)

__global__ void attention_forward_kernel(floatX* out, float* lse, const floatX* q, const floatX* k, const floatX* v,
                                         int B, int T, int H, int Hkv, int D) {
    __shared__ float qs[ATT_WARPS][ATT_MAXD];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int idx = blockIdx.x * ATT_WARPS + warp; // (b, h, t), t fastest
    if (idx >= B * H * T) return;
    int t = idx % T, h = (idx / T) % H, b = idx / (T * H), hk = h / (H / Hkv);
    float scale = 1.0f / sqrtf((float)D);
    const floatX* qt = q + ((size_t)(b * T + t) * H + h) * D;
    for (int i = lane; i < D; i += 32) qs[warp][i] = tof(qt[i]);
    __syncwarp();
    float acc[ATT_ACC];
#pragma unroll
    for (int i = 0; i < ATT_ACC; i++) acc[i] = 0.0f;
    float mrun = -INFINITY, lrun = 0.0f;
    for (int j0 = 0; j0 <= t; j0 += 32) {
        int j = j0 + lane;
        float s = -INFINITY;
        if (j <= t) { // seek to k[b,j,hk,:]
            const floatX* kj = k + ((size_t)(b * T + j) * Hkv + hk) * D;
            float dot = 0.0f;
            for (int i = 0; i < D; i++) dot += qs[warp][i] * tof(kj[i]);
            s = dot * scale;
        }
        float mnew = fmaxf(mrun, warp_max(s));
        float p = j <= t ? expf(s - mnew) : 0.0f;
        float corr = expf(mrun - mnew); // 0 on the first chunk
        lrun = lrun * corr + warp_sum(p);
#pragma unroll
        for (int i = 0; i < ATT_ACC; i++) acc[i] *= corr;
        int nj = min(32, t - j0 + 1);
        for (int jj = 0; jj < nj; jj++) {
            float pj = __shfl_sync(FULL_MASK, p, jj);
            const floatX* vj = v + ((size_t)(b * T + j0 + jj) * Hkv + hk) * D;
#pragma unroll
            for (int i = 0; i < ATT_ACC; i++) {
                int d = lane + 32 * i;
                if (d < D) acc[i] += pj * tof(vj[d]);
            }
        }
        mrun = mnew;
    }
    floatX* o = out + ((size_t)(b * T + t) * H + h) * D;
    float inv = 1.0f / lrun;
#pragma unroll
    for (int i = 0; i < ATT_ACC; i++) {
        int d = lane + 32 * i;
        if (d < D) o[d] = tox(acc[i] * inv);
    }
    if (lane == 0) lse[idx] = mrun + logf(lrun);
}
#ifdef USE_CUDNN
// cuDNN's fused attention instead of the kernels above (USE_CUDNN=1 builds), kept in its own file as llm.c
// keeps llmc/cudnn_att.cpp: attention_forward_cudnn / attention_backward_cudnn, tried first by
// attention_forward and attention_backward below
#include "dev/moe/cudnn_att.cuh"
#endif

// q[B,T,H,D], k,v[B,T,Hkv,D] -> out[B,T,H,D]; lse[B,H,T] (fp32) kept for the backward. cudnn_ok = 0
// (decoding's forwards): the built-in kernels even in USE_CUDNN builds
void attention_forward(floatX* out, float* lse, const floatX* q, const floatX* k, const floatX* v,
                       int B, int T, int H, int Hkv, int D, int cudnn_ok) {
#ifdef USE_CUDNN
    if (cudnn_ok && attention_forward_cudnn(out, lse, q, k, v, B, T, H, Hkv, D)) return;
#else
    (void)cudnn_ok;
#endif
    attention_forward_kernel<<<ceil_div((size_t)B * H * T, ATT_WARPS), ATT_WARPS * 32>>>(out, lse, q, k, v, B, T, H, Hkv, D);
    cudaCheck(cudaGetLastError());
}

// dq: one warp per query row (b, h, t) over its keys j <= t. It first computes
// dsum[b,h,t] = <dout, out> (= sum_j p_j dp_j), which the dk/dv kernel reads.
__global__ void attention_backward_dq_kernel(floatX* dq, float* dsum, const floatX* dout, const floatX* out,
                                             const float* lse, const floatX* q, const floatX* k, const floatX* v,
                                             int B, int T, int H, int Hkv, int D) {
    __shared__ float qs[ATT_WARPS][ATT_MAXD], dos[ATT_WARPS][ATT_MAXD];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int idx = blockIdx.x * ATT_WARPS + warp;
    if (idx >= B * H * T) return;
    int t = idx % T, h = (idx / T) % H, b = idx / (T * H), hk = h / (H / Hkv);
    float scale = 1.0f / sqrtf((float)D);
    size_t row = ((size_t)(b * T + t) * H + h) * D;
    float di = 0.0f;
    for (int i = lane; i < D; i += 32) {
        qs[warp][i] = tof(q[row + i]);
        dos[warp][i] = tof(dout[row + i]);
        di += dos[warp][i] * tof(out[row + i]);
    }
    di = warp_sum(di);
    if (lane == 0) dsum[idx] = di;
    __syncwarp();
    float L = lse[idx];
    float acc[ATT_ACC];
#pragma unroll
    for (int i = 0; i < ATT_ACC; i++) acc[i] = 0.0f;
    for (int j0 = 0; j0 <= t; j0 += 32) {
        int j = j0 + lane;
        float ds = 0.0f;
        if (j <= t) {
            const floatX* kj = k + ((size_t)(b * T + j) * Hkv + hk) * D;
            const floatX* vj = v + ((size_t)(b * T + j) * Hkv + hk) * D;
            float s = 0.0f, dp = 0.0f;
            for (int i = 0; i < D; i++) { s += qs[warp][i] * tof(kj[i]); dp += dos[warp][i] * tof(vj[i]); }
            float p = expf(s * scale - L);
            ds = p * (dp - di) * scale; // through the softmax and the scale
        }
        int nj = min(32, t - j0 + 1);
        for (int jj = 0; jj < nj; jj++) {
            float dsj = __shfl_sync(FULL_MASK, ds, jj);
            const floatX* kj = k + ((size_t)(b * T + j0 + jj) * Hkv + hk) * D;
#pragma unroll
            for (int i = 0; i < ATT_ACC; i++) {
                int d = lane + 32 * i;
                if (d < D) acc[i] += dsj * tof(kj[d]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < ATT_ACC; i++) {
        int d = lane + 32 * i;
        if (d < D) dq[row + d] = tox(acc[i]);
    }
}
// dk, dv: one warp per key row (b, j, hk) over the queries t >= j of every query head sharing kv head hk,
// in a fixed order (head, then t): nothing is added by two warps, so no atomics
__global__ void attention_backward_dkdv_kernel(floatX* dk, floatX* dv, const floatX* dout, const float* lse,
                                               const float* dsum, const floatX* q, const floatX* k, const floatX* v,
                                               int B, int T, int H, int Hkv, int D) {
    __shared__ float ks[ATT_WARPS][ATT_MAXD], vs[ATT_WARPS][ATT_MAXD];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int idx = blockIdx.x * ATT_WARPS + warp; // (b, hk, j), j fastest
    if (idx >= B * Hkv * T) return;
    int j = idx % T, hk = (idx / T) % Hkv, b = idx / (T * Hkv), group = H / Hkv;
    float scale = 1.0f / sqrtf((float)D);
    size_t kvrow = ((size_t)(b * T + j) * Hkv + hk) * D;
    for (int i = lane; i < D; i += 32) { ks[warp][i] = tof(k[kvrow + i]); vs[warp][i] = tof(v[kvrow + i]); }
    __syncwarp();
    float acck[ATT_ACC], accv[ATT_ACC];
#pragma unroll
    for (int i = 0; i < ATT_ACC; i++) { acck[i] = 0.0f; accv[i] = 0.0f; }
    for (int h = hk * group; h < (hk + 1) * group; h++) {
        for (int t0 = j; t0 < T; t0 += 32) {
            int t = t0 + lane;
            float p = 0.0f, ds = 0.0f;
            if (t < T) {
                size_t row = ((size_t)(b * T + t) * H + h) * D;
                float s = 0.0f, dp = 0.0f;
                for (int i = 0; i < D; i++) { s += tof(q[row + i]) * ks[warp][i]; dp += tof(dout[row + i]) * vs[warp][i]; }
                size_t li = ((size_t)b * H + h) * T + t;
                p = expf(s * scale - lse[li]);
                ds = p * (dp - dsum[li]) * scale;
            }
            int nt = min(32, T - t0);
            for (int tt = 0; tt < nt; tt++) {
                float pt = __shfl_sync(FULL_MASK, p, tt), dst = __shfl_sync(FULL_MASK, ds, tt);
                size_t row = ((size_t)(b * T + t0 + tt) * H + h) * D;
#pragma unroll
                for (int i = 0; i < ATT_ACC; i++) {
                    int d = lane + 32 * i;
                    if (d < D) { acck[i] += dst * tof(q[row + d]); accv[i] += pt * tof(dout[row + d]); }
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < ATT_ACC; i++) {
        int d = lane + 32 * i;
        if (d < D) { dk[kvrow + d] = tox(acck[i]); dv[kvrow + d] = tox(accv[i]); }
    }
}
// gradients into dq, dk, dv (all =) from dout[B,T,H,D], the forward's out and lse; dsum[B,H,T] is scratch
void attention_backward(floatX* dq, floatX* dk, floatX* dv, float* dsum, const floatX* dout, const floatX* out,
                        const float* lse, const floatX* q, const floatX* k, const floatX* v,
                        int B, int T, int H, int Hkv, int D) {
#ifdef USE_CUDNN
    if (attention_backward_cudnn(dq, dk, dv, dout, out, lse, q, k, v, B, T, H, Hkv, D)) return;
#endif
    attention_backward_dq_kernel<<<ceil_div((size_t)B * H * T, ATT_WARPS), ATT_WARPS * 32>>>(
        dq, dsum, dout, out, lse, q, k, v, B, T, H, Hkv, D);
    cudaCheck(cudaGetLastError());
    attention_backward_dkdv_kernel<<<ceil_div((size_t)B * Hkv * T, ATT_WARPS), ATT_WARPS * 32>>>(
        dk, dv, dout, lse, dsum, q, k, v, B, T, H, Hkv, D);
    cudaCheck(cudaGetLastError());
}

__global__ void residual_forward_kernel(floatX* out, const floatX* a, const floatX* b, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = tox(tof(a[i]) + tof(b[i]));
}
// out[n] = a[n] + b[n] (out may be a)
void residual_forward(floatX* out, const floatX* a, const floatX* b, size_t n) {
    residual_forward_kernel<<<ceil_div(n, 256), 256>>>(out, a, b, n);
    cudaCheck(cudaGetLastError());
}

// ----------------------------------------------------------------------------
// the MoE layer: router -> topk -> permute -> experts -> unpermute, and the auxiliary losses

__global__ void router_lse_kernel(float* lse, const float* z, int N, int E) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* zn = z + (size_t)n * E;
    float mx = zn[0];
    for (int e = 1; e < E; e++) if (zn[e] > mx) mx = zn[e];
    float s = 0.0f;
    for (int e = 0; e < E; e++) s += expf(zn[e] - mx);
    lse[n] = mx + logf(s);
}
// router logits z[N,E] = m[N,C] . wr[E,C]^T (fp32 output, fp32 accumulation) and their logsumexp lse[N]
void router_forward(float* z, float* lse, const floatX* m, const floatX* wr, int N, int C, int E) {
    gemm(CUBLAS_OP_T, CUBLAS_OP_N, E, N, C, wr, C, m, C, z, CUDA_R_32F, E, 0.0f);
    router_lse_kernel<<<ceil_div(N, 256), 256>>>(lse, z, N, E);
    cudaCheck(cudaGetLastError());
}

// one thread per token. The j-th pass takes the best expert that comes after the (j-1)-th in the order
// "larger logit first, equal logits: lower index first", which is exactly the CPU's selection. A NaN
// logit ranks as -inf (as on the CPU), so the order is total and every pass finds an expert; a token
// whose logits are not all finite adds 1 to *nonfinite (an integer count: the same in any order).
__global__ void topk_forward_kernel(int* topi, float* gate, int* nonfinite, const float* z, int N, int E, int K) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* zn = z + (size_t)n * E;
    int* ti = topi + (size_t)n * K;
    int finite = 1;
    for (int e = 0; e < E; e++) finite &= isfinite(zn[e]);
    if (!finite) atomicAdd(nonfinite, 1);
    float prevz = INFINITY;
    int preve = -1;
    for (int j = 0; j < K; j++) {
        int best = -1;
        float bz = 0.0f;
        for (int e = 0; e < E; e++) {
            float ze = isnan(zn[e]) ? -INFINITY : zn[e];
            int after = ze < prevz || (ze == prevz && e > preve);
            if (after && (best < 0 || ze > bz)) { best = e; bz = ze; } // strict '>' keeps the lower index on ties
        }
        ti[j] = best;
        prevz = bz; preve = best;
    }
    float* g = gate + (size_t)n * K;
    float mx = zn[ti[0]], s = 0.0f;
    for (int j = 0; j < K; j++) { g[j] = expf(zn[ti[j]] - mx); s += g[j]; }
    for (int j = 0; j < K; j++) g[j] /= s;
}
// the K largest logits of each token (larger first; equal logits: lower expert index first; NaN as
// -inf), and the gates: softmax over those K logits only. The tokens whose logits are not all finite
// are added to *nonfinite (a device int), which the forward checks once (router_check_counts).
void topk_forward(int* topi, float* gate, int* nonfinite, const float* z, int N, int E, int K) {
    topk_forward_kernel<<<ceil_div(N, 128), 128>>>(topi, gate, nonfinite, z, N, E, K);
    cudaCheck(cudaGetLastError());
}

// permute plan: a counting sort of the N*K slots by expert, stable (token order within an expert),
// in three deterministic steps over chunks of PLAN_CHUNK slots:
//   1. hist[chunk, e] = slots of the chunk routed to e (shared-memory integer counts: order-free)
//   2. one block: counts[e], offs[e], and hist[chunk, e] := first row of expert e for that chunk
//   3. one warp per chunk walks its slots in order, 32 at a time; lanes with the same expert
//      (__match_any_sync) take consecutive rows in lane order
#define PLAN_CHUNK 1024
__global__ void permute_count_kernel(int* hist, const int* topi, int NK, int E) {
    extern __shared__ int cnt[]; // E
    for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    int s0 = blockIdx.x * PLAN_CHUNK, s1 = min(s0 + PLAN_CHUNK, NK);
    for (int s = s0 + threadIdx.x; s < s1; s += blockDim.x) atomicAdd(&cnt[topi[s]], 1);
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) hist[(size_t)blockIdx.x * E + e] = cnt[e];
}
__global__ void permute_offsets_kernel(int* counts, int* offs, int* hist, int nchunks, int E) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int c = 0;
        for (int ch = 0; ch < nchunks; ch++) c += hist[(size_t)ch * E + e];
        counts[e] = c;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        offs[0] = 0;
        for (int e = 0; e < E; e++) offs[e + 1] = offs[e] + counts[e];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int r = offs[e];
        for (int ch = 0; ch < nchunks; ch++) { int c = hist[(size_t)ch * E + e]; hist[(size_t)ch * E + e] = r; r += c; }
    }
}
__global__ void permute_place_kernel(int* row_of, int* tok_of, const int* hist, const int* topi, int NK, int E, int K) {
    extern __shared__ int next[]; // E: the next free row of each expert, for this chunk
    int lane = threadIdx.x;       // one warp per block
    for (int e = lane; e < E; e += 32) next[e] = hist[(size_t)blockIdx.x * E + e];
    __syncwarp();
    int s0 = blockIdx.x * PLAN_CHUNK, s1 = min(s0 + PLAN_CHUNK, NK);
    for (int base = s0; base < s1; base += 32) {
        int s = base + lane;
        int valid = s < s1;
        int e = valid ? topi[s] : -1;
        unsigned same = __match_any_sync(FULL_MASK, e);
        int rank = __popc(same & ((1u << lane) - 1u));
        int row = valid ? next[e] + rank : 0;
        __syncwarp();
        if (valid) {
            row_of[s] = row;
            tok_of[row] = s / K;
            if ((same >> lane) == 1u) next[e] += __popc(same); // the group's last lane advances its expert
        }
        __syncwarp();
    }
}
// group the N*K token slots by expert (counting sort: within an expert, by token order).
// counts[E], offs[E+1] (row range of expert e), row_of[n*K+j] = row of slot j of token n,
// tok_of[row] = token of that row; hist: scratch of ceil(NK/PLAN_CHUNK)*E ints.
// offs_h (host, E+1) receives offs: the grouped GEMMs need the sizes on the host.
void permute_plan(int* counts, int* offs, int* row_of, int* tok_of, int* hist, int* offs_h, const int* topi,
                  int N, int E, int K) {
    int NK = N * K, nchunks = ceil_div(NK, PLAN_CHUNK);
    size_t shmem = (size_t)E * sizeof(int);
    permute_count_kernel<<<nchunks, 256, shmem>>>(hist, topi, NK, E);
    cudaCheck(cudaGetLastError());
    permute_offsets_kernel<<<1, 1024>>>(counts, offs, hist, nchunks, E);
    cudaCheck(cudaGetLastError());
    permute_place_kernel<<<nchunks, 32, shmem>>>(row_of, tok_of, hist, topi, NK, E, K);
    cudaCheck(cudaGetLastError());
    cudaCheck(cudaMemcpy(offs_h, offs, (E + 1) * sizeof(int), cudaMemcpyDeviceToHost));
}

__global__ void permute_forward_kernel(floatX* xe, const floatX* m, const int* tok_of, int NK, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)NK * C) return;
    size_t r = i / C, c = i % C;
    xe[i] = m[(size_t)tok_of[r] * C + c];
}
// xe[NK,C] = m[tok_of[row], :]: tokens into expert-contiguous rows
void permute_forward(floatX* xe, const floatX* m, const int* tok_of, int NK, int C) {
    permute_forward_kernel<<<ceil_div((size_t)NK * C, 256), 256>>>(xe, m, tok_of, NK, C);
    cudaCheck(cudaGetLastError());
}
__global__ void permute_backward_kernel(floatX* dm, const floatX* dxe, const int* row_of, int N, int K, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * C) return;
    size_t n = i / C, c = i % C;
    float s = tof(dm[i]);
    for (int j = 0; j < K; j++) s += tof(dxe[(size_t)row_of[n * K + j] * C + c]);
    dm[i] = tox(s);
}
// dm[n,:] += sum_j dxe[row_of[n,j], :]  (a token's K slots add in slot order)
void permute_backward(floatX* dm, const floatX* dxe, const int* row_of, int N, int K, int C) {
    permute_backward_kernel<<<ceil_div((size_t)N * C, 256), 256>>>(dm, dxe, row_of, N, K, C);
    cudaCheck(cudaGetLastError());
}

__global__ void swiglu_forward_kernel(floatX* act, const floatX* h1, const floatX* h3, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = tof(h1[i]);
    act[i] = tox(g / (1.0f + expf(-g)) * tof(h3[i]));
}
__global__ void swiglu_backward_kernel(floatX* dh1, floatX* dh3, const floatX* dact, const floatX* h1, const floatX* h3, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = tof(h1[i]), da = tof(dact[i]);
    float sg = 1.0f / (1.0f + expf(-g));
    float silu = g * sg;
    dh3[i] = tox(da * silu);
    dh1[i] = tox(da * tof(h3[i]) * sg * (1.0f + g * (1.0f - sg)));
}

// each expert's SwiGLU over its own rows: ye = w2 . (silu(w1 . xe) * (w3 . xe))
// xe[NK,C], h1,h3,act[NK,F], ye[NK,C]; w1,w3[E,F,C], w2[E,C,F]; offs on the host.
// One grouped GEMM for w1 and w3 of every expert, one for w2; an expert with no rows is left out.
void experts_forward(floatX* ye, floatX* h1, floatX* h3, floatX* act, const floatX* xe,
                     const floatX* w1, const floatX* w3, const floatX* w2, const int* offs, int E, int C, int F,
                     GemmGroup* g) {
    for (int e = 0; e < E; e++) {
        int r0 = offs[e], n = offs[e + 1] - offs[e];
        if (n == 0) continue;
        // h[n,F] = xe[n,C] . w[e]^T
        group_add(g, CUBLAS_OP_T, CUBLAS_OP_N, F, n, C, w1 + (size_t)e * F * C, C, xe + (size_t)r0 * C, C, 0.0f, h1 + (size_t)r0 * F, F);
        group_add(g, CUBLAS_OP_T, CUBLAS_OP_N, F, n, C, w3 + (size_t)e * F * C, C, xe + (size_t)r0 * C, C, 0.0f, h3 + (size_t)r0 * F, F);
    }
    group_run(g);
    size_t nf = (size_t)offs[E] * F;
    swiglu_forward_kernel<<<ceil_div(nf, 256), 256>>>(act, h1, h3, nf);
    cudaCheck(cudaGetLastError());
    for (int e = 0; e < E; e++) {
        int r0 = offs[e], n = offs[e + 1] - offs[e];
        if (n == 0) continue;
        // ye[n,C] = act[n,F] . w2[e]^T
        group_add(g, CUBLAS_OP_T, CUBLAS_OP_N, C, n, F, w2 + (size_t)e * C * F, F, act + (size_t)r0 * F, F, 0.0f, ye + (size_t)r0 * C, C);
    }
    group_run(g);
}

// dw[e][OC,IC] (fp32) += dout[rows of e, OC]^T . inp[rows of e, IC] for every expert with rows: one
// cublasGemmEx per expert, floatX operands, fp32 accumulation straight into the fp32 gradient (beta 1).
// Not grouped: cublasGemmGroupedBatchedEx writes C in the type of A and B, so a bf16 build would round
// each expert's gradient to bf16 before it reached the fp32 sum.
static void experts_weight_grad(float* dw, const floatX* dout, const floatX* inp, const int* offs, int E, int IC, int OC) {
    for (int e = 0; e < E; e++) {
        int r0 = offs[e], n = offs[e + 1] - offs[e];
        if (n == 0) continue; // no rows: the gradient is left as it is
        gemm(CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, n, inp + (size_t)r0 * IC, IC, dout + (size_t)r0 * OC, OC,
             dw + (size_t)e * OC * IC, CUDA_R_32F, IC, 1.0f);
    }
}
// given dye[NK,C]: dxe[NK,C] (=), dw1,dw3,dw2 (fp32, +=); dact, dh1, dh3 are scratch [NK,F]; offs on the host
void experts_backward(floatX* dxe, float* dw1, float* dw3, float* dw2, floatX* dact, floatX* dh1, floatX* dh3,
                      const floatX* dye, const floatX* xe, const floatX* h1, const floatX* h3, const floatX* act,
                      const floatX* w1, const floatX* w3, const floatX* w2, const int* offs,
                      int E, int C, int F, GemmGroup* g) {
    // dact[n,F] = dye[n,C] . w2[e]  (w2[e] is C x F)
    for (int e = 0; e < E; e++) {
        int r0 = offs[e], n = offs[e + 1] - offs[e];
        if (n == 0) continue;
        group_add(g, CUBLAS_OP_N, CUBLAS_OP_N, F, n, C, w2 + (size_t)e * C * F, F, dye + (size_t)r0 * C, C, 0.0f, dact + (size_t)r0 * F, F);
    }
    group_run(g);
    experts_weight_grad(dw2, dye, act, offs, E, F, C);
    size_t nf = (size_t)offs[E] * F;
    swiglu_backward_kernel<<<ceil_div(nf, 256), 256>>>(dh1, dh3, dact, h1, h3, nf);
    cudaCheck(cudaGetLastError());
    // dxe[n,C] = dh1[n,F] . w1[e] + dh3[n,F] . w3[e]   (two calls: both write dxe)
    for (int pass = 0; pass < 2; pass++) {
        const floatX* w = pass ? w3 : w1;
        const floatX* dh = pass ? dh3 : dh1;
        for (int e = 0; e < E; e++) {
            int r0 = offs[e], n = offs[e + 1] - offs[e];
            if (n == 0) continue;
            group_add(g, CUBLAS_OP_N, CUBLAS_OP_N, C, n, F, w + (size_t)e * F * C, C, dh + (size_t)r0 * F, F,
                      pass ? 1.0f : 0.0f, dxe + (size_t)r0 * C, C);
        }
        group_run(g);
    }
    experts_weight_grad(dw1, dh1, xe, offs, E, C, F);
    experts_weight_grad(dw3, dh3, xe, offs, E, C, F);
}

__global__ void unpermute_forward_kernel(floatX* out, const floatX* res, const floatX* ye, const float* gate,
                                         const int* row_of, int N, int K, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * C) return;
    size_t n = i / C, c = i % C;
    float o = tof(res[i]);
    for (int j = 0; j < K; j++) o += gate[n * K + j] * tof(ye[(size_t)row_of[n * K + j] * C + c]);
    out[i] = tox(o);
}
// combine: out[n,:] = res[n,:] + sum_j gate[n,j] * ye[row_of[n,j], :]
void unpermute_forward(floatX* out, const floatX* res, const floatX* ye, const float* gate, const int* row_of,
                       int N, int K, int C) {
    unpermute_forward_kernel<<<ceil_div((size_t)N * C, 256), 256>>>(out, res, ye, gate, row_of, N, K, C);
    cudaCheck(cudaGetLastError());
}
// one warp per slot (n, j)
__global__ void unpermute_backward_kernel(floatX* dye, float* dgate, const floatX* dout, const floatX* ye, const float* gate,
                                          const int* row_of, int N, int K, int C) {
    int s = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (s >= N * K) return;
    int n = s / K, row = row_of[s];
    const floatX* d = dout + (size_t)n * C;
    const floatX* y = ye + (size_t)row * C;
    floatX* dy = dye + (size_t)row * C;
    float g = gate[s], dot = 0.0f;
    for (int c = lane; c < C; c += 32) { float dc = tof(d[c]); dy[c] = tox(g * dc); dot += dc * tof(y[c]); }
    dot = warp_sum(dot);
    if (lane == 0) dgate[s] = dot;
}
// dye[row,:] = gate * dout[n,:]; dgate[n,j] = <dout[n,:], ye[row,:]> (fp32)
void unpermute_backward(floatX* dye, float* dgate, const floatX* dout, const floatX* ye, const float* gate,
                        const int* row_of, int N, int K, int C) {
    unpermute_backward_kernel<<<ceil_div((size_t)N * K, 8), 256>>>(dye, dgate, dout, ye, gate, row_of, N, K, C);
    cudaCheck(cudaGetLastError());
}

// block e < E: part[e] = sum_n softmax(z_n)_e; block E: part[E] = sum_n lse_n^2 (double, tree order)
__global__ void router_losses_partial_kernel(double* part, const float* z, const float* lse, int N, int E) {
    __shared__ double sh[256];
    int e = blockIdx.x;
    double s = 0.0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
        if (e < E) s += expf(z[(size_t)n * E + e] - lse[n]);
        else s += (double)lse[n] * lse[n];
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) part[e] = s;
}
__global__ void router_losses_final_kernel(float* aux, float* zl, const double* part, const int* counts, int Nc, int N,
                                           int E, int K) {
    double a = 0.0;
    for (int e = 0; e < E; e++) a += ((double)counts[e] / ((double)Nc * K)) * (part[e] / N);
    *aux = (float)(E * a);
    *zl = (float)(part[E] / N);
}
// aux_l = E * sum_e f_e * P_e  (f_e = counts_e/(Nc*K), no gradient; P_e = mean_n softmax(z_n)_e)
// zl_l = mean_n lse_n^2. counts are over Nc tokens: this batch's N, or in a data-parallel step the whole
// batch of every rank (f global, as Megatron-Core's load balancing; P and zl stay this rank's means).
// aux, zl: device floats; part: E+1 doubles of scratch
void router_losses(float* aux, float* zl, const float* z, const float* lse, const int* counts, int Nc, int N, int E, int K,
                   double* part) {
    router_losses_partial_kernel<<<E + 1, 256>>>(part, z, lse, N, E);
    cudaCheck(cudaGetLastError());
    router_losses_final_kernel<<<1, 1>>>(aux, zl, part, counts, Nc, N, E, K);
    cudaCheck(cudaGetLastError());
}

__global__ void router_backward_kernel(float* dz, const float* dgate, const float* z, const float* lse, const int* topi,
                                       const float* gate, const int* counts, int Nc, float daux, float dzl, int N, int E,
                                       int K) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* zn = z + (size_t)n * E;
    float* d = dz + (size_t)n * E;
    float fp = 0.0f; // sum_e f_e p_e
    for (int e = 0; e < E; e++) fp += ((float)counts[e] / ((float)Nc * K)) * expf(zn[e] - lse[n]);
    for (int e = 0; e < E; e++) {
        float p = expf(zn[e] - lse[n]);
        float f = (float)counts[e] / ((float)Nc * K);
        d[e] = daux * E / N * p * (f - fp) + dzl * 2.0f / N * lse[n] * p;
    }
    // gates are a softmax over the chosen logits: dz_j = g_j (dg_j - sum_i g_i dg_i)
    const float* g = gate + (size_t)n * K;
    const float* dg = dgate + (size_t)n * K;
    float gdg = 0.0f;
    for (int j = 0; j < K; j++) gdg += g[j] * dg[j];
    for (int j = 0; j < K; j++) d[topi[n * K + j]] += g[j] * (dg[j] - gdg);
}
// dz[N,E] (=, fp32) from the gates (dgate), the aux loss (scaled by daux) and the z-loss (scaled by dzl);
// counts over Nc tokens as in router_losses
void router_backward(float* dz, const float* dgate, const float* z, const float* lse, const int* topi,
                     const float* gate, const int* counts, int Nc, float daux, float dzl, int N, int E, int K) {
    router_backward_kernel<<<ceil_div(N, 128), 128>>>(dz, dgate, z, lse, topi, gate, counts, Nc, daux, dzl, N, E, K);
    cudaCheck(cudaGetLastError());
}

// ----------------------------------------------------------------------------
// classifier: the lm_head matmuls over chunks of rows, and softmax cross-entropy with an ignore index
// (target -1). The forward keeps the logits and each row's logsumexp; the backward overwrites the
// logits with their gradient in place, so the N x V tensor exists once.

// The logits and their gradient are N x V: at B=8, T=4096, V=100k that is 3.3e9 elements, past the
// 32-bit counts a cuBLAS call takes. So the classifier's matmuls run over chunks of rows, none of
// whose N x V operand holds more than classifier_max_elems elements (llm.c chunks its classifier the
// same way). A batch that fits in one chunk makes the very call it made before, bit for bit.
static size_t classifier_max_elems = INT_MAX; // the GPU test lowers it to force several chunks

// the rows of one chunk: as many as keep rows x V within classifier_max_elems (at least 1), at most N
static int classifier_chunk_rows(int N, int V) {
    size_t rows = classifier_max_elems / (size_t)V;
    if (rows < 1) rows = 1;
    return rows < (size_t)N ? (int)rows : N;
}
// logits[N,V] = xf[N,C] . lm_head[V,C]^T, chunk by chunk of rows
void classifier_forward(floatX* logits, const floatX* xf, const floatX* lm_head, int N, int C, int V) {
    int rows = classifier_chunk_rows(N, V);
    for (int n0 = 0; n0 < N; n0 += rows) {
        int nr = N - n0 < rows ? N - n0 : rows;
        matmul_forward(logits + (size_t)n0 * V, xf + (size_t)n0 * C, lm_head, nr, C, V);
    }
}
// dxf[N,C] += dlogits[N,V] . lm_head[V,C];  dlm_head[V,C] (fp32) += dlogits^T . xf, chunk by chunk of
// rows (the weight gradient adds the chunks in row order, in fp32)
void classifier_backward(floatX* dxf, float* dlm_head, const floatX* dlogits, const floatX* xf, const floatX* lm_head,
                         int N, int C, int V) {
    int rows = classifier_chunk_rows(N, V);
    for (int n0 = 0; n0 < N; n0 += rows) {
        int nr = N - n0 < rows ? N - n0 : rows;
        matmul_backward(dxf + (size_t)n0 * C, dlm_head, dlogits + (size_t)n0 * V, xf + (size_t)n0 * C, lm_head, nr, C, V);
    }
}

__global__ void crossentropy_forward_kernel(float* losses, float* row_lse, const floatX* logits, const int* targets, int N, int V) {
    __shared__ float sh[256];
    int n = blockIdx.x;
    const floatX* l = logits + (size_t)n * V;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, tof(l[i]));
    mx = block_max(mx, sh);
    float s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += expf(tof(l[i]) - mx);
    s = block_sum(s, sh);
    if (threadIdx.x == 0) {
        float lse = mx + logf(s);
        row_lse[n] = lse;
        losses[n] = targets[n] < 0 ? 0.0f : lse - tof(l[targets[n]]);
    }
}
__global__ void mean_loss_kernel(float* out, const float* losses, int N, int counted) {
    __shared__ double sh[1024];
    double s = 0.0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) s += losses[n];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) *out = counted ? (float)(s / counted) : 0.0f;
}
// losses[N] = -log softmax(logits[n])[target] (0 where ignored), row_lse[N]; *ce (device) = mean over
// the counted targets
void crossentropy_forward(float* ce, float* losses, float* row_lse, const floatX* logits, const int* targets, int counted, int N, int V) {
    crossentropy_forward_kernel<<<N, 256>>>(losses, row_lse, logits, targets, N, V);
    cudaCheck(cudaGetLastError());
    mean_loss_kernel<<<1, 1024>>>(ce, losses, N, counted);
    cudaCheck(cudaGetLastError());
}
__global__ void crossentropy_backward_kernel(floatX* logits, const float* row_lse, const int* targets, const float* weights,
                                             float scale, int V) {
    int n = blockIdx.x, t = targets[n];
    floatX* l = logits + (size_t)n * V;
    float lse = row_lse[n];
    if (weights) scale *= weights[n];
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float d = 0.0f;
        if (t >= 0) d = expf(tof(l[i]) - lse) * scale - (i == t ? scale : 0.0f);
        l[i] = tox(d);
    }
}
// logits[N,V] := dloss * (softmax - onehot) / counted, in place; zero rows for ignored targets. With
// per-token weights (device, GRPO): dloss * weights[n] * (softmax - onehot), as train_moe.c.
void crossentropy_backward(floatX* logits, const float* row_lse, const int* targets, const float* weights, float dloss,
                           int counted, int N, int V) {
    float scale = weights ? dloss : counted ? dloss / counted : 0.0f;
    crossentropy_backward_kernel<<<N, 256>>>(logits, row_lse, targets, weights, scale, V);
    cudaCheck(cudaGetLastError());
}
// GRPO's entropy statistic: ent[n] = -sum p log p = lse - sum_i p_i l_i of each row with a target
__global__ void entropy_kernel(float* ent, const floatX* logits, const float* row_lse, const int* targets, int V) {
    __shared__ float sh[256];
    int n = blockIdx.x;
    const floatX* l = logits + (size_t)n * V;
    float lse = row_lse[n], s = 0.0f;
    if (targets[n] >= 0)
        for (int i = threadIdx.x; i < V; i += blockDim.x) s += expf(tof(l[i]) - lse) * tof(l[i]);
    s = block_sum(s, sh);
    if (threadIdx.x == 0) ent[n] = targets[n] >= 0 ? lse - s : 0.0f;
}

// ----------------------------------------------------------------------------
// the model: parameters (one block, fp32 master + a floatX copy), activations (one block), forward, backward

template <typename Tp>
struct ParamTensorsT { Tp *wte, *attn_norm, *wq, *wk, *wv, *wo, *moe_norm, *wr, *w1, *w3, *w2, *final_norm, *lm_head; };
typedef ParamTensorsT<floatX> ParamTensors;   // the weights the kernels read
typedef ParamTensorsT<float> ParamTensorsF32; // master weights, gradients, AdamW m and v: always fp32

template <typename Tp>
static void point_params(ParamTensorsT<Tp>* p, Tp* mem, const size_t* sizes) {
    Tp** ptrs[NUM_PARAM_TENSORS] = {&p->wte, &p->attn_norm, &p->wq, &p->wk, &p->wv, &p->wo, &p->moe_norm,
                                    &p->wr, &p->w1, &p->w3, &p->w2, &p->final_norm, &p->lm_head};
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) { *ptrs[i] = mem; mem += sizes[i]; }
}

// activations kept for the backward pass, for at most B*T = N tokens. Per layer l (outermost):
#define NUM_ACT_TENSORS 20
typedef struct {
    floatX* resid;    // (L+1) x N x C   input of each layer, then the last layer's output
    floatX* resid_mid;// L x N x C       after attention
    floatX* a;        // L x N x C       attn rmsnorm output
    float* a_rstd;    // L x N
    floatX* q;        // L x N x H*D     after RoPE
    floatX* k;        // L x N x Hkv*D   after RoPE
    floatX* v;        // L x N x Hkv*D
    float* att_lse;   // L x B x H x T   softmax logsumexp per query (the CPU keeps att[B,H,T,T] instead)
    floatX* atty;     // L x N x H*D     attention output before wo
    floatX* m;        // L x N x C       moe rmsnorm output
    float* m_rstd;    // L x N
    float* z;         // L x N x E       router logits (fp32)
    float* lse;       // L x N           logsumexp of z
    float* gate;      // L x N x K
    floatX* xe;       // L x NK x C      tokens permuted into expert-contiguous rows
    floatX* h1;       // L x NK x F      w1 . xe
    floatX* h3;       // L x NK x F      w3 . xe
    floatX* act;      // L x NK x F      silu(h1) * h3
    floatX* ye;       // L x NK x C      expert outputs
    floatX* xf;       // N x C           final rmsnorm output
} ActTensors;

typedef struct {
    MoEConfig config;
    ParamTensors params;                              // floatX (in fp32 builds: the master weights themselves)
    ParamTensorsF32 master, grads, m_state, v_state;  // fp32
    size_t param_sizes[NUM_PARAM_TENSORS];
    size_t num_params;
    floatX* params_memory;
    float *master_memory, *grads_memory, *m_memory, *v_memory;
    // activations
    int maxB, maxT;   // allocated for B*T <= maxB*maxT and T <= maxT
    int B, T;         // of the last forward
    ActTensors acts;
    void* acts_memory;
    float *f_rstd, *losses, *logit_lse;
    floatX* logits;   // N x V; model_backward overwrites it with its gradient
    int *topi, *counts, *offs, *row_of, *tok_of; // device: L x N x K, L x E, L x (E+1), L x NK, L x NK
    int* plan_hist;   // permute_plan scratch
    int* offs_h;      // host copy of offs: L x (E+1)
    float *freqs_cos, *freqs_sin;
    int *inputs_d, *targets_d;
    // backward scratch (one layer at a time)
    floatX *dres, *dbuf, *dq, *dk, *dv, *datty, *dzx, *dxe, *dye, *dact, *dh1, *dh3;
    float *dz, *dgate, *att_dsum, *norm_partial;
    double* reduce_scratch;
    int *enc_work, *enc_work_d;
    GemmGroup group;
    float* loss_terms_d; // device: ce, aux[L], zl[L]
    int* nonfinite_d;    // device, L: tokens of the last forward (or decode step) with non-finite router logits
    floatX *kcache, *vcache; // decoding: the KV cache, L x maxB x maxT x Hkv*D each (allocated on first use)
    // results of the last forward (host)
    const int* inputs;
    const int* targets;
    int counted;      // targets that are not -1
    float ce, loss;
    float *aux, *zl;  // L each
    int step;         // the step being trained (1-based, as printed), for error messages; -1: none
    const float* token_weights; // host, NULL: the backward is of the mean ce; else of sum_n w[n]*ce_n (GRPO)
    float* token_weights_d;     // device copy, N
    int collective;   // 1: forward and backward are this rank's part of a step of every rank (all take part):
                      // the forward sums each layer's expert counts over the ranks (dist_sum_counts)
    int counts_ranks; // the ranks whose tokens the counts of the last forward count (1, or R after a collective one)
    int forward_only; // a frozen model (GRPO's reference): the floatX weights (fp32 builds: the master), no
                      // gradients, AdamW state or backward scratch; model_backward and model_update refuse it
    int decoding;     // set around the forwards of decoding (prefill, sampling): their attention runs on the
                      // built-in kernels, so cuDNN's graph cache keeps the shapes of training and eval
} Model;

// allocate parameters, gradients and the optimizer state (zeros) on the GPU; forward_only: the
// parameters alone (bf16 builds: only their floatX copy; fp32 builds: the fp32 weights, which are that copy)
static void model_build_as(Model* model, const MoEConfig* config, int forward_only) {
    memset(model, 0, sizeof(*model));
    model->forward_only = forward_only;
    model->config = *config;
    int D = config->C / config->H;
    if (D > ATT_MAXD) {
        fprintf(stderr, "Error: head size D=C/H=%d exceeds %d, the attention kernels' limit (flags -nc, -nh)\n", D, ATT_MAXD);
        exit(EXIT_FAILURE);
    }
#ifdef PRECISION_BF16
    if (config->C % 8 || config->F % 8) { // 16-byte aligned rows for the bf16 grouped GEMMs
        fprintf(stderr, "Error: the bf16 build needs C and F to be multiples of 8 (got C=%d F=%d); "
                        "build with PRECISION=FP32 for other shapes\n", config->C, config->F);
        exit(EXIT_FAILURE);
    }
#endif
    fill_param_sizes(model->param_sizes, config);
    size_t n = 0;
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) n += model->param_sizes[i];
    model->num_params = n;
    float** f32[4] = {&model->master_memory, &model->grads_memory, &model->m_memory, &model->v_memory};
    ParamTensorsF32* views[4] = {&model->master, &model->grads, &model->m_state, &model->v_state};
#ifdef PRECISION_BF16
    int nf32 = forward_only ? 0 : 4;
#else
    int nf32 = forward_only ? 1 : 4; // the master weights are the weights the kernels read
#endif
    for (int i = 0; i < nf32; i++) {
        *f32[i] = (float*)cudaMallocCheck(n * sizeof(float));
        cudaCheck(cudaMemset(*f32[i], 0, n * sizeof(float)));
        point_params(views[i], *f32[i], model->param_sizes);
    }
#ifdef PRECISION_BF16
    model->params_memory = (floatX*)cudaMallocCheck(n * sizeof(floatX));
    cudaCheck(cudaMemset(model->params_memory, 0, n * sizeof(floatX)));
#else
    model->params_memory = model->master_memory;
#endif
    point_params(&model->params, model->params_memory, model->param_sizes);
    model->aux = (float*)callocCheck(config->L, sizeof(float));
    model->zl = (float*)callocCheck(config->L, sizeof(float));
    model->loss_terms_d = (float*)cudaMallocCheck((1 + 2 * (size_t)config->L) * sizeof(float));
    model->nonfinite_d = (int*)cudaMallocCheck((size_t)config->L * sizeof(int));
    group_init(&model->group, 2 * config->E); // the grouped expert GEMMs' pointer ring: the forward needs it too
    model->step = -1;
}
void model_build(Model* model, const MoEConfig* config) { model_build_as(model, config, 0); }

// what a forward-only model cannot do: stop with a message that names the call
static void model_trainable_check(const Model* model, const char* what) {
    if (!model->forward_only) return;
    fprintf(stderr, "Error: %s on a forward-only model (a frozen reference has no gradients or AdamW state)\n", what);
    exit(EXIT_FAILURE);
}

// host fp32 parameters (and AdamW m, v when given) -> the GPU; the floatX copy is cast from the master.
// A forward-only bf16 model has no master: its floatX copy is cast from a staging buffer, chunk by chunk.
void model_upload(Model* model, const float* params, const float* m, const float* v) {
    size_t bytes = model->num_params * sizeof(float);
    if (m || v) model_trainable_check(model, "model_upload of AdamW state");
    if (!model->master_memory) {
        size_t n = model->num_params, chunk = n < ((size_t)1 << 24) ? n : ((size_t)1 << 24);
        float* stage = (float*)cudaMallocCheck(chunk * sizeof(float));
        for (size_t off = 0; off < n; off += chunk) {
            size_t k = n - off < chunk ? n - off : chunk;
            cudaCheck(cudaMemcpy(stage, params + off, k * sizeof(float), cudaMemcpyHostToDevice));
            cast_to_floatX(model->params_memory + off, stage, k);
        }
        cudaCheck(cudaDeviceSynchronize());
        cuda_free(stage);
        return;
    }
    cudaCheck(cudaMemcpy(model->master_memory, params, bytes, cudaMemcpyHostToDevice));
    if (m) cudaCheck(cudaMemcpy(model->m_memory, m, bytes, cudaMemcpyHostToDevice));
    if (v) cudaCheck(cudaMemcpy(model->v_memory, v, bytes, cudaMemcpyHostToDevice));
    cast_to_floatX(model->params_memory, model->master_memory, model->num_params);
    cudaCheck(cudaDeviceSynchronize());
}
// the GPU's fp32 master weights, m and v -> host arrays of num_params (any may be NULL)
void model_download(const Model* model, float* params, float* m, float* v) {
    size_t bytes = model->num_params * sizeof(float);
    if ((params && !model->master_memory) || m || v) model_trainable_check(model, "model_download");
    if (params) cudaCheck(cudaMemcpy(params, model->master_memory, bytes, cudaMemcpyDeviceToHost));
    if (m) cudaCheck(cudaMemcpy(m, model->m_memory, bytes, cudaMemcpyDeviceToHost));
    if (v) cudaCheck(cudaMemcpy(v, model->v_memory, bytes, cudaMemcpyDeviceToHost));
}

// Megatron's init, drawn on the host by train_moe.c itself: the same seed gives the CPU's very weights
void model_init_random(Model* model, uint64_t seed, float std) {
    cpu::Model shell; // only what cpu::model_init_random reads
    memset(&shell, 0, sizeof(shell));
    shell.config = model->config;
    memcpy(shell.param_sizes, model->param_sizes, sizeof(shell.param_sizes));
    shell.num_params = model->num_params;
    shell.params_memory = (float*)mallocCheck(model->num_params * sizeof(float));
    cpu::model_init_random(&shell, seed, std);
    model_upload(model, shell.params_memory, NULL, NULL);
    free(shell.params_memory);
}

static void model_alloc_acts(Model* model, int B, int T) {
    const MoEConfig* c = &model->config;
    size_t N = (size_t)B * T, L = c->L, C = c->C, H = c->H, D = c->C / c->H, HD = c->H * D, KD = c->Hkv * D;
    size_t E = c->E, K = c->K, F = c->F, NK = N * K, V = c->V, X = sizeof(floatX), S = sizeof(float);
    size_t counts[NUM_ACT_TENSORS] = {
        (L + 1) * N * C, L * N * C, L * N * C, L * N, L * N * HD, L * N * KD, L * N * KD,
        L * N * H, L * N * HD, L * N * C, L * N, L * N * E, L * N, L * N * K,
        L * NK * C, L * NK * F, L * NK * F, L * NK * F, L * NK * C, N * C};
    size_t elem[NUM_ACT_TENSORS] = {X, X, X, S, X, X, X, S, X, X, S, S, S, S, X, X, X, X, X, X};
    void** ptrs[NUM_ACT_TENSORS] = {
        (void**)&model->acts.resid, (void**)&model->acts.resid_mid, (void**)&model->acts.a, (void**)&model->acts.a_rstd,
        (void**)&model->acts.q, (void**)&model->acts.k, (void**)&model->acts.v, (void**)&model->acts.att_lse,
        (void**)&model->acts.atty, (void**)&model->acts.m, (void**)&model->acts.m_rstd, (void**)&model->acts.z,
        (void**)&model->acts.lse, (void**)&model->acts.gate, (void**)&model->acts.xe, (void**)&model->acts.h1,
        (void**)&model->acts.h3, (void**)&model->acts.act, (void**)&model->acts.ye, (void**)&model->acts.xf};
    size_t total = 0; // each tensor starts 256-byte aligned
    for (int i = 0; i < NUM_ACT_TENSORS; i++) total += (counts[i] * elem[i] + 255) / 256 * 256;
    char* p = (char*)cudaMallocCheck(total);
    model->acts_memory = p;
    for (int i = 0; i < NUM_ACT_TENSORS; i++) { *ptrs[i] = p; p += (counts[i] * elem[i] + 255) / 256 * 256; }
    model->f_rstd = (float*)cudaMallocCheck(N * S);
    model->logits = (floatX*)cudaMallocCheck(N * V * X);
    model->losses = (float*)cudaMallocCheck(N * S);
    model->logit_lse = (float*)cudaMallocCheck(N * S);
    model->topi = (int*)cudaMallocCheck(L * NK * sizeof(int));
    model->counts = (int*)cudaMallocCheck(L * E * sizeof(int));
    model->offs = (int*)cudaMallocCheck(L * (E + 1) * sizeof(int));
    model->row_of = (int*)cudaMallocCheck(L * NK * sizeof(int));
    model->tok_of = (int*)cudaMallocCheck(L * NK * sizeof(int));
    model->plan_hist = (int*)cudaMallocCheck((size_t)ceil_div(NK, PLAN_CHUNK) * E * sizeof(int));
    model->offs_h = (int*)callocCheck(L * (E + 1), sizeof(int));
    float* fcos = (float*)mallocCheck((size_t)T * (D / 2) * S);
    float* fsin = (float*)mallocCheck((size_t)T * (D / 2) * S);
    rope_tables(fcos, fsin, T, (int)D, c->theta);
    model->freqs_cos = (float*)cudaMallocCheck((size_t)T * (D / 2) * S);
    model->freqs_sin = (float*)cudaMallocCheck((size_t)T * (D / 2) * S);
    cudaCheck(cudaMemcpy(model->freqs_cos, fcos, (size_t)T * (D / 2) * S, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(model->freqs_sin, fsin, (size_t)T * (D / 2) * S, cudaMemcpyHostToDevice));
    free(fcos); free(fsin);
    model->inputs_d = (int*)cudaMallocCheck(N * sizeof(int));
    model->targets_d = (int*)cudaMallocCheck(N * sizeof(int));
    model->reduce_scratch = (double*)cudaMallocCheck((E + 1 + 1024) * sizeof(double));
    model->maxB = B;
    model->maxT = T;
    if (model->forward_only) return; // what follows is the backward's
    // backward scratch (one layer at a time)
    model->token_weights_d = (float*)cudaMallocCheck(N * S);
    size_t mx = C > HD ? C : HD;
    model->dres = (floatX*)cudaMallocCheck(N * C * X);
    model->dbuf = (floatX*)cudaMallocCheck(N * mx * X);
    model->dq = (floatX*)cudaMallocCheck(N * HD * X);
    model->dk = (floatX*)cudaMallocCheck(N * KD * X);
    model->dv = (floatX*)cudaMallocCheck(N * KD * X);
    model->datty = (floatX*)cudaMallocCheck(N * HD * X);
    model->dz = (float*)cudaMallocCheck(N * E * S);
#ifdef PRECISION_BF16
    model->dzx = (floatX*)cudaMallocCheck(N * E * X);
#else
    model->dzx = model->dz;
#endif
    model->dgate = (float*)cudaMallocCheck(NK * S);
    model->dxe = (floatX*)cudaMallocCheck(NK * C * X);
    model->dye = (floatX*)cudaMallocCheck(NK * C * X);
    model->dact = (floatX*)cudaMallocCheck(NK * F * X);
    model->dh1 = (floatX*)cudaMallocCheck(NK * F * X);
    model->dh3 = (floatX*)cudaMallocCheck(NK * F * X);
    model->att_dsum = (float*)cudaMallocCheck(N * H * S);
    model->norm_partial = (float*)cudaMallocCheck((size_t)ceil_div(N, NORM_ROWS) * C * S);
    model->enc_work = (int*)mallocCheck((V + 3 * N + 1) * sizeof(int));
    model->enc_work_d = (int*)cudaMallocCheck((3 * N + 1) * sizeof(int));
}

static void model_free_acts(Model* model) {
    void* dev[] = {model->acts_memory, model->f_rstd, model->logits, model->losses, model->logit_lse, model->token_weights_d, model->topi,
                   model->counts, model->offs, model->row_of, model->tok_of, model->plan_hist, model->freqs_cos,
                   model->freqs_sin, model->inputs_d, model->targets_d, model->dres, model->dbuf, model->dq, model->dk,
                   model->dv, model->datty, model->dz, model->dgate, model->dxe, model->dye, model->dact, model->dh1,
                   model->dh3, model->att_dsum, model->norm_partial, model->reduce_scratch, model->enc_work_d};
    for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]); i++) cuda_free(dev[i]);
#ifdef PRECISION_BF16
    cuda_free(model->dzx);
#endif
    free(model->offs_h);
    free(model->enc_work);
    model->acts_memory = NULL;
}

void model_free(Model* model) {
    if (model->acts_memory) model_free_acts(model);
    cuda_free(model->master_memory); cuda_free(model->grads_memory); cuda_free(model->m_memory); cuda_free(model->v_memory);
#ifdef PRECISION_BF16
    cuda_free(model->params_memory);
#endif
    cuda_free(model->loss_terms_d);
    cuda_free(model->nonfinite_d);
    cuda_free(model->kcache); cuda_free(model->vcache);
    group_free(&model->group);
    free(model->aux); free(model->zl);
}

// train_moe.c's router_check on the counts of the last forward (or decode step) of N tokens: the first
// layer with a token whose router logits are not all finite stops the program, with the CPU's message
// (after the whole forward, where the CPU stops inside it: the GPU's count is read back only once)
static void router_check_counts(const Model* model, int N) {
    int L = model->config.L;
    int* bad = (int*)mallocCheck((size_t)L * sizeof(int));
    cudaCheck(cudaMemcpy(bad, model->nonfinite_d, (size_t)L * sizeof(int), cudaMemcpyDeviceToHost));
    cpu::Model shell; // only what cpu::router_check reads
    memset(&shell, 0, sizeof(shell));
    shell.step = model->step;
    for (int l = 0; l < L; l++) cpu::router_check(&shell, l, bad[l], N);
    free(bad);
}

// forward pass on inputs[B,T] (host); with targets (host, may be NULL) it computes ce, aux, zl and loss.
// Buffers are laid out for (B,T) of this call, so any B*T <= maxB*maxT with T <= maxT works.
// Each layer is an attention block and an MoE block, both residual: h += attn(h); h += moe(h).

// the attention block of layer l on the N = B*T tokens in resid[l]: resid_mid[l] = resid[l] + attention
static void attention_block_forward(Model* model, int l) {
    const MoEConfig* c = &model->config;
    int B = model->B, T = model->T, N = B * T, C = c->C, H = c->H, Hkv = c->Hkv, D = C / H;
    int HD = H * D, KD = Hkv * D;
    ParamTensors p = model->params;
    ActTensors a = model->acts;
    // seek to layer l's parameters and activations
    const floatX* wq = p.wq + (size_t)l * HD * C;
    const floatX* wk = p.wk + (size_t)l * KD * C;
    const floatX* wv = p.wv + (size_t)l * KD * C;
    const floatX* wo = p.wo + (size_t)l * C * HD;
    floatX* res = a.resid + (size_t)l * N * C;
    floatX* res_mid = a.resid_mid + (size_t)l * N * C;
    floatX* an = a.a + (size_t)l * N * C;
    floatX* q = a.q + (size_t)l * N * HD;
    floatX* k = a.k + (size_t)l * N * KD;
    floatX* v = a.v + (size_t)l * N * KD;
    float* att_lse = a.att_lse + (size_t)l * N * H;
    floatX* atty = a.atty + (size_t)l * N * HD;
    rmsnorm_forward(an, a.a_rstd + (size_t)l * N, res, p.attn_norm + (size_t)l * C, N, C, c->eps);
    matmul_forward(q, an, wq, N, C, HD);
    matmul_forward(k, an, wk, N, C, KD);
    matmul_forward(v, an, wv, N, C, KD);
    rope_apply(q, model->freqs_cos, model->freqs_sin, B, T, H, D, +1);
    rope_apply(k, model->freqs_cos, model->freqs_sin, B, T, Hkv, D, +1);
    attention_forward(atty, att_lse, q, k, v, B, T, H, Hkv, D, !model->decoding);
    matmul_forward(res_mid, atty, wo, N, HD, C);
    residual_forward(res_mid, res_mid, res, (size_t)N * C);
}

// the MoE block of layer l: router -> topk -> permute -> experts -> unpermute,
// resid[l+1] = resid_mid[l] + sum over the K chosen experts of gate * expert(rmsnorm(resid_mid[l]))
static void moe_block_forward(Model* model, int l) {
    const MoEConfig* c = &model->config;
    int N = model->B * model->T, L = c->L, C = c->C, E = c->E, K = c->K, F = c->F, NK = N * K;
    ParamTensors p = model->params;
    ActTensors a = model->acts;
    // seek to layer l's parameters, activations and routing
    const floatX* wr = p.wr + (size_t)l * E * C;
    const floatX* w1 = p.w1 + (size_t)l * E * F * C;
    const floatX* w3 = p.w3 + (size_t)l * E * F * C;
    const floatX* w2 = p.w2 + (size_t)l * E * C * F;
    floatX* res = a.resid + (size_t)l * N * C;
    floatX* res_mid = a.resid_mid + (size_t)l * N * C;
    floatX* m = a.m + (size_t)l * N * C;
    float* z = a.z + (size_t)l * N * E;
    float* lse = a.lse + (size_t)l * N;
    float* gate = a.gate + (size_t)l * NK;
    int* topi = model->topi + (size_t)l * NK;
    int* counts = model->counts + (size_t)l * E;
    int* offs = model->offs + (size_t)l * (E + 1);
    int* offs_h = model->offs_h + (size_t)l * (E + 1);
    int* row_of = model->row_of + (size_t)l * NK;
    int* tok_of = model->tok_of + (size_t)l * NK;
    floatX* xe = a.xe + (size_t)l * NK * C;
    floatX* h1 = a.h1 + (size_t)l * NK * F;
    floatX* h3 = a.h3 + (size_t)l * NK * F;
    floatX* act = a.act + (size_t)l * NK * F;
    floatX* ye = a.ye + (size_t)l * NK * C;
    rmsnorm_forward(m, a.m_rstd + (size_t)l * N, res_mid, p.moe_norm + (size_t)l * C, N, C, c->eps);
    router_forward(z, lse, m, wr, N, C, E);
    topk_forward(topi, gate, model->nonfinite_d + l, z, N, E, K);
    permute_plan(counts, offs, row_of, tok_of, model->plan_hist, offs_h, topi, N, E, K);
    permute_forward(xe, m, tok_of, NK, C);
    experts_forward(ye, h1, h3, act, xe, w1, w3, w2, offs_h, E, C, F, &model->group);
    unpermute_forward(res + (size_t)N * C, res_mid, ye, gate, row_of, N, K, C);
    // the load-balancing counts: this batch's, or in a step of every rank, their sum (in place: the
    // plan above is done with them; the backward reads the sum)
    if (model->collective) dist_sum_counts(counts, E);
    router_losses(model->loss_terms_d + 1 + l, model->loss_terms_d + 1 + L + l, z, lse, counts,
                  N * model->counts_ranks, N, E, K, model->reduce_scratch);
}

void model_forward(Model* model, const int* inputs, const int* targets, int B, int T) {
    const MoEConfig* c = &model->config;
    int L = c->L, C = c->C, V = c->V;
    if (model->acts_memory == NULL) model_alloc_acts(model, B, T);
    if ((size_t)B * T > (size_t)model->maxB * model->maxT || T > model->maxT) {
        fprintf(stderr, "Error: forward with B=%d T=%d exceeds the allocated B=%d T=%d\n", B, T, model->maxB, model->maxT);
        exit(EXIT_FAILURE);
    }
    for (int i = 0; i < B * T; i++)
        if (inputs[i] < 0 || inputs[i] >= V) {
            fprintf(stderr, "Error: input token %d at position %d is outside [0, V=%d)\n", inputs[i], i, V);
            exit(EXIT_FAILURE);
        }
    int N = B * T;
    model->B = B; model->T = T; model->inputs = inputs; model->targets = targets;
    model->counts_ranks = model->collective ? dist.world : 1;
    cudaCheck(cudaMemcpy(model->inputs_d, inputs, N * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemset(model->nonfinite_d, 0, (size_t)L * sizeof(int)));
    ParamTensors p = model->params;
    ActTensors a = model->acts;
    encoder_forward(a.resid, model->inputs_d, p.wte, N, C);
    for (int l = 0; l < L; l++) {
        attention_block_forward(model, l);
        moe_block_forward(model, l);
    }
    rmsnorm_forward(a.xf, model->f_rstd, a.resid + (size_t)L * N * C, p.final_norm, N, C, c->eps);
    classifier_forward(model->logits, a.xf, p.lm_head, N, C, V);
    if (targets) {
        model->counted = 0;
        for (int i = 0; i < N; i++) {
            if (targets[i] < -1 || targets[i] >= V) {
                fprintf(stderr, "Error: target %d at position %d is outside [0, V=%d) (and not -1)\n", targets[i], i, V);
                exit(EXIT_FAILURE);
            }
            model->counted += targets[i] >= 0;
        }
        cudaCheck(cudaMemcpy(model->targets_d, targets, N * sizeof(int), cudaMemcpyHostToDevice));
        crossentropy_forward(model->loss_terms_d, model->losses, model->logit_lse, model->logits, model->targets_d,
                             model->counted, N, V);
    }
    float* terms = (float*)mallocCheck((1 + 2 * (size_t)L) * sizeof(float));
    cudaCheck(cudaMemcpy(terms, model->loss_terms_d, (1 + 2 * (size_t)L) * sizeof(float), cudaMemcpyDeviceToHost));
    router_check_counts(model, N);
    memcpy(model->aux, terms + 1, L * sizeof(float));
    memcpy(model->zl, terms + 1 + L, L * sizeof(float));
    if (targets) {
        model->ce = terms[0];
        double loss = model->ce;
        for (int l = 0; l < L; l++) loss += (double)c->aux_coef * model->aux[l] + (double)c->z_coef * model->zl[l];
        model->loss = (float)loss;
    }
    free(terms);
}

void model_zero_grad(Model* model) {
    model_trainable_check(model, "model_zero_grad");
    cudaCheck(cudaMemset(model->grads_memory, 0, model->num_params * sizeof(float)));
}

// the MoE block of layer l in reverse: unpermute -> experts -> permute -> topk/router. dres holds the
// gradient of resid[l+1] and, through the residual connection, becomes that of resid_mid[l]
static void moe_block_backward(Model* model, int l, floatX* dres, float dloss) {
    const MoEConfig* c = &model->config;
    int N = model->B * model->T, C = c->C, E = c->E, K = c->K, F = c->F, NK = N * K;
    ParamTensors p = model->params;
    ParamTensorsF32 g = model->grads;
    ActTensors a = model->acts;
    size_t X = sizeof(floatX);
    // seek to layer l's parameters, activations and routing
    const floatX* wr = p.wr + (size_t)l * E * C;
    size_t eo1 = (size_t)l * E * F * C, eo2 = (size_t)l * E * C * F;
    const floatX* res_mid = a.resid_mid + (size_t)l * N * C;
    const floatX* m = a.m + (size_t)l * N * C;
    const float* z = a.z + (size_t)l * N * E;
    const float* lse = a.lse + (size_t)l * N;
    const float* gate = a.gate + (size_t)l * NK;
    const int* topi = model->topi + (size_t)l * NK;
    const int* counts = model->counts + (size_t)l * E;
    const int* offs_h = model->offs_h + (size_t)l * (E + 1);
    const int* row_of = model->row_of + (size_t)l * NK;
    const floatX* xe = a.xe + (size_t)l * NK * C;
    unpermute_backward(model->dye, model->dgate, dres, a.ye + (size_t)l * NK * C, gate, row_of, N, K, C);
    experts_backward(model->dxe, g.w1 + eo1, g.w3 + eo1, g.w2 + eo2, model->dact, model->dh1, model->dh3,
                     model->dye, xe, a.h1 + (size_t)l * NK * F, a.h3 + (size_t)l * NK * F,
                     a.act + (size_t)l * NK * F, p.w1 + eo1, p.w3 + eo1, p.w2 + eo2, offs_h, E, C, F,
                     &model->group);
    floatX* dm = model->dbuf;
    cudaCheck(cudaMemset(dm, 0, (size_t)N * C * X));
    permute_backward(dm, model->dxe, row_of, N, K, C);
    router_backward(model->dz, model->dgate, z, lse, topi, gate, counts, N * model->counts_ranks,
                    dloss * c->aux_coef, dloss * c->z_coef, N, E, K);
    cast_to_floatX(model->dzx, model->dz, (size_t)N * E); // bf16 builds: the router gradient enters the GEMMs as bf16
    matmul_backward(dm, g.wr + (size_t)l * E * C, model->dzx, m, wr, N, C, E);
    // dres already holds the gradient through the MoE residual connection
    rmsnorm_backward(dres, g.moe_norm + (size_t)l * C, dm, res_mid, p.moe_norm + (size_t)l * C,
                     a.m_rstd + (size_t)l * N, N, C, model->norm_partial);
}

// the attention block of layer l in reverse: dres, the gradient of resid_mid[l], becomes that of
// resid[l]
static void attention_block_backward(Model* model, int l, floatX* dres) {
    const MoEConfig* c = &model->config;
    int B = model->B, T = model->T, N = B * T, C = c->C, H = c->H, Hkv = c->Hkv, D = C / H;
    int HD = H * D, KD = Hkv * D;
    ParamTensors p = model->params;
    ParamTensorsF32 g = model->grads;
    ActTensors a = model->acts;
    size_t X = sizeof(floatX);
    // seek to layer l's parameters and activations
    const floatX* wq = p.wq + (size_t)l * HD * C;
    const floatX* wk = p.wk + (size_t)l * KD * C;
    const floatX* wv = p.wv + (size_t)l * KD * C;
    const floatX* wo = p.wo + (size_t)l * C * HD;
    const floatX* res = a.resid + (size_t)l * N * C;
    cudaCheck(cudaMemset(model->datty, 0, (size_t)N * HD * X));
    matmul_backward(model->datty, g.wo + (size_t)l * C * HD, dres, a.atty + (size_t)l * N * HD, wo, N, HD, C);
    attention_backward(model->dq, model->dk, model->dv, model->att_dsum, model->datty, a.atty + (size_t)l * N * HD,
                       a.att_lse + (size_t)l * N * H, a.q + (size_t)l * N * HD, a.k + (size_t)l * N * KD,
                       a.v + (size_t)l * N * KD, B, T, H, Hkv, D);
    rope_apply(model->dq, model->freqs_cos, model->freqs_sin, B, T, H, D, -1);
    rope_apply(model->dk, model->freqs_cos, model->freqs_sin, B, T, Hkv, D, -1);
    floatX* da = model->dbuf;
    cudaCheck(cudaMemset(da, 0, (size_t)N * C * X));
    const floatX* an = a.a + (size_t)l * N * C;
    matmul_backward(da, g.wq + (size_t)l * HD * C, model->dq, an, wq, N, C, HD);
    matmul_backward(da, g.wk + (size_t)l * KD * C, model->dk, an, wk, N, C, KD);
    matmul_backward(da, g.wv + (size_t)l * KD * C, model->dv, an, wv, N, C, KD);
    rmsnorm_backward(dres, g.attn_norm + (size_t)l * C, da, res, p.attn_norm + (size_t)l * C,
                     a.a_rstd + (size_t)l * N, N, C, model->norm_partial);
}

// backward of the last forward (which must have had targets); gradients of dloss * loss are ADDED into
// model->grads (dloss = 1/grad_accum_steps averages the micro-batches; data parallel, 1/(grad_accum_steps*R):
// the sum over the ranks is then the gradient of the global mean). The logits become their gradient.
void model_backward(Model* model, float dloss) {
    const MoEConfig* c = &model->config;
    int B = model->B, T = model->T, L = c->L, C = c->C, V = c->V, N = B * T;
    model_trainable_check(model, "model_backward");
    if (!model->targets) { fprintf(stderr, "Error: model_backward needs a forward with targets\n"); exit(EXIT_FAILURE); }
    ParamTensors p = model->params;
    ParamTensorsF32 g = model->grads;
    ActTensors a = model->acts;
    size_t X = sizeof(floatX);
    // classifier and final norm
    floatX* dlogits = model->logits;
    if (model->token_weights) // GRPO: per-token weights from the host
        cudaCheck(cudaMemcpy(model->token_weights_d, model->token_weights, N * sizeof(float), cudaMemcpyHostToDevice));
    crossentropy_backward(dlogits, model->logit_lse, model->targets_d, model->token_weights ? model->token_weights_d : NULL,
                          dloss, model->counted, N, V);
    cudaCheck(cudaMemset(model->dbuf, 0, (size_t)N * C * X));
    classifier_backward(model->dbuf, g.lm_head, dlogits, a.xf, p.lm_head, N, C, V);
    cudaCheck(cudaMemset(model->dres, 0, (size_t)N * C * X));
    rmsnorm_backward(model->dres, g.final_norm, model->dbuf, a.resid + (size_t)L * N * C, p.final_norm,
                     model->f_rstd, N, C, model->norm_partial);
    floatX* dres = model->dres; // gradient of the residual stream, flowing down
    for (int l = L - 1; l >= 0; l--) {
        moe_block_backward(model, l, dres, dloss);
        attention_block_backward(model, l, dres);
    }
    encoder_backward(g.wte, dres, model->inputs, N, C, V, model->enc_work, model->enc_work_d);
}

// ----------------------------------------------------------------------------
// optimizer: global-norm clipping, AdamW (fp32 master weights and state), and the shared LR schedule

#define NORM_GRID 1024
__global__ void sumsq_partial_kernel(double* part, const float* x, size_t n) {
    __shared__ double sh[256];
    double s = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}
__global__ void sum_in_order_kernel(double* out, const double* part, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += part[i];
    *out = s;
}
// sqrt(sum of all g^2): a fixed grid of partial sums added in block order, the same bits every run
float global_grad_norm(const Model* model) {
    model_trainable_check(model, "global_grad_norm");
    double* part = model->reduce_scratch; // needs NORM_GRID + 1 doubles (allocated with the activations)
    if (!part) { fprintf(stderr, "Error: global_grad_norm before any forward pass\n"); exit(EXIT_FAILURE); }
    sumsq_partial_kernel<<<NORM_GRID, 256>>>(part, model->grads_memory, model->num_params);
    cudaCheck(cudaGetLastError());
    sum_in_order_kernel<<<1, 1>>>(part + NORM_GRID, part, NORM_GRID);
    cudaCheck(cudaGetLastError());
    double total;
    cudaCheck(cudaMemcpy(&total, part + NORM_GRID, sizeof(double), cudaMemcpyDeviceToHost));
    return (float)sqrt(total);
}

__global__ void adamw_kernel(float* master, floatX* params, const float* grads, float* m, float* v, size_t n, float lr,
                             float beta1, float beta2, float bc1, float bc2, float eps, float wd, float grad_scale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = grads[i] * grad_scale;
    float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float mhat = mi / bc1, vhat = vi / bc2;
    float p = master[i];
    p -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p);
    master[i] = p;
#ifdef PRECISION_BF16
    params[i] = tox(p); // round to nearest: the copy is a pure function of the master (resume-exact)
#endif
}
// one AdamW step t (1-based) with gradients first scaled by grad_scale (the clipping factor)
void model_update(Model* model, float lr, float beta1, float beta2, float eps, float weight_decay, int t, float grad_scale) {
    model_trainable_check(model, "model_update");
    float bc1 = 1.0f - powf(beta1, (float)t), bc2 = 1.0f - powf(beta2, (float)t);
    size_t off = 0;
    for (int ti = 0; ti < NUM_PARAM_TENSORS; ti++) {
        size_t n = model->param_sizes[ti];
        float wd = param_is_matrix[ti] ? weight_decay : 0.0f;
        adamw_kernel<<<ceil_div(n, 256), 256>>>(model->master_memory + off, model->params_memory + off,
                                                model->grads_memory + off, model->m_memory + off, model->v_memory + off,
                                                n, lr, beta1, beta2, bc1, bc2, eps, wd, grad_scale);
        cudaCheck(cudaGetLastError());
        off += n;
    }
}

// ----------------------------------------------------------------------------
// checkpoints: train_moe.c's format and its own writer/reader, fed from and into the GPU's fp32 master
// weights and AdamW state (so either trainer loads the other's files)

void checkpoint_save(const Model* model, const char* path, int with_optimizer, const TrainState* st) {
    cpu::Model shell; // only what cpu::checkpoint_save reads
    memset(&shell, 0, sizeof(shell));
    shell.config = model->config;
    shell.num_params = model->num_params;
    size_t n = model->num_params;
    shell.params_memory = (float*)mallocCheck(n * sizeof(float));
    if (with_optimizer) {
        shell.m_memory = (float*)mallocCheck(n * sizeof(float));
        shell.v_memory = (float*)mallocCheck(n * sizeof(float));
    }
    model_download(model, shell.params_memory, shell.m_memory, shell.v_memory);
    cpu::checkpoint_save(&shell, path, with_optimizer, st);
    free(shell.params_memory); free(shell.m_memory); free(shell.v_memory);
}

// load a checkpoint into a fresh model; with_optimizer also loads m and v (the file must hold them).
// The body is read and checked on the host (train_moe.c's checks) before anything is put on the GPU.
// Returns 0, or -1 after an error message with nothing left allocated. forward_only: a frozen model
// (model_build_as), its weights alone on the GPU.
static int checkpoint_load_as(Model* model, const char* path, TrainState* st, int with_optimizer, int forward_only) {
    cpu::Model shell; // what cpu::checkpoint_check_values reads: the host copy of the body
    memset(&shell, 0, sizeof(shell));
    int has_opt;
    FILE* fp = cpu::checkpoint_open(path, &shell.config, st, &has_opt); // header checked, file size checked
    if (!fp) return -1;
    if (with_optimizer && !has_opt) {
        fclose(fp);
        return cpu::read_error("'%s' holds no optimizer state, so training cannot resume from it (use -e to start from its weights)", path);
    }
    fill_param_sizes(shell.param_sizes, &shell.config);
    size_t n = 0;
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) n += shell.param_sizes[i];
    shell.num_params = n;
    float** body[3] = {&shell.params_memory, &shell.m_memory, &shell.v_memory};
    int bad = 0;
    for (int b = 0; b < (with_optimizer ? 3 : 1) && !bad; b++) {
        *body[b] = (float*)mallocCheck(n * sizeof(float));
        bad = cpu::fread_report(*body[b], sizeof(float), n, fp, path);
    }
    fclose(fp);
    if (!bad) bad = cpu::checkpoint_check_values(&shell, path, with_optimizer);
    if (!bad) {
        model_build_as(model, &shell.config, forward_only);
        model_upload(model, shell.params_memory, shell.m_memory, shell.v_memory);
    }
    free(shell.params_memory); free(shell.m_memory); free(shell.v_memory);
    return bad ? -1 : 0;
}
int checkpoint_load(Model* model, const char* path, TrainState* st, int with_optimizer) {
    return checkpoint_load_as(model, path, st, with_optimizer, 0);
}
// the weights of a checkpoint as a forward-only model (GRPO's frozen reference): no gradients, no AdamW
// state, no backward scratch (at 0.94e9 parameters 11 GB less than a trainable copy, 15 GB in bf16 builds)
int checkpoint_load_frozen(Model* model, const char* path, TrainState* st) {
    return checkpoint_load_as(model, path, st, 0, 1);
}

// ----------------------------------------------------------------------------
// sampler and eval: val loss and router diagnostics

// logits of rows [row0, row0 + nrows) of the last forward, as host floats
void model_logits_to_host(const Model* model, float* out, size_t row0, size_t nrows) {
    size_t V = model->config.V;
    copy_floatX_to_host(out, model->logits + row0 * V, nrows * V);
}

// generate gen_len tokens after the eot token, printing them; uses and advances *rng
void generate(Model* model, const Tokenizer* tk, int eot, int gen_len, uint64_t* rng) {
    int V = model->config.V, maxT = model->maxT;
    int* toks = (int*)mallocCheck((size_t)(gen_len + 1) * sizeof(int));
    float* probs = (float*)mallocCheck((size_t)V * sizeof(float));
    toks[0] = eot;
    for (int t = 1; t <= gen_len; t++) {
        int ctx = t < maxT ? t : maxT; // a window of the last maxT tokens
        model->decoding = 1; // a new shape every token: the built-in attention, not a cuDNN graph each
        model_forward(model, toks + t - ctx, NULL, 1, ctx);
        model->decoding = 0;
        model_logits_to_host(model, probs, ctx - 1, 1);
        float mx = probs[0], s = 0.0f;
        for (int i = 1; i < V; i++) if (probs[i] > mx) mx = probs[i];
        for (int i = 0; i < V; i++) { probs[i] = expf(probs[i] - mx); s += probs[i]; }
        for (int i = 0; i < V; i++) probs[i] /= s;
        toks[t] = sample_mult(probs, V, rng_f32(rng));
        tokenizer_print(tk, toks[t]);
        fflush(stdout);
    }
    printf("\n");
    free(toks);
    free(probs);
}

// ce of the val batch in the loader: one forward, or where the activations hold fewer rows (data
// parallel: B/R), forwards of as many rows as they hold, the mean over all their counted targets
static float val_batch_ce(Model* model, const DataLoader* val) {
    int B = val->B, T = val->T;
    int rows = model->acts_memory ? (int)((size_t)model->maxB * model->maxT / T) : B;
    if (B <= rows) {
        model_forward(model, val->inputs, val->targets, B, T);
        return model->ce;
    }
    double sum = 0.0;
    long counted = 0;
    for (int b = 0; b < B; b += rows) {
        int nb = B - b < rows ? B - b : rows;
        model_forward(model, val->inputs + (size_t)b * T, val->targets + (size_t)b * T, nb, T);
        sum += (double)model->ce * model->counted;
        counted += model->counted;
    }
    return counted ? (float)(sum / counted) : 0.0f;
}

// mean ce over up to max_batches val batches (all of them if max_batches <= 0)
float eval_val_loss(Model* model, DataLoader* val, int max_batches) {
    loader_reset(val);
    double sum = 0.0;
    int n = 0;
    for (;;) {
        if (max_batches > 0 && n >= max_batches) break;
        loader_next_batch(val);
        if (val->pos.epoch > 0) break; // wrapped around: the whole val set was seen
        sum += val_batch_ce(model, val);
        n++;
    }
    return n ? (float)(sum / n) : NAN;
}

// per layer: the share of token slots each expert received (as a multiple of the uniform 1/E), the
// mean router entropy (nats), aux and z of the last forward. After a step of every rank the loads are
// over every rank's tokens (the summed counts) and the entropy over this rank's, as in train_moe.c
void print_router_stats(const Model* model, FILE* logfile, int step) {
    const MoEConfig* c = &model->config;
    int N = model->B * model->T, E = c->E;
    float* z = (float*)mallocCheck((size_t)N * E * sizeof(float));
    float* lse = (float*)mallocCheck((size_t)N * sizeof(float));
    int* counts = (int*)mallocCheck((size_t)c->L * E * sizeof(int));
    cudaCheck(cudaMemcpy(counts, model->counts, (size_t)c->L * E * sizeof(int), cudaMemcpyDeviceToHost));
    for (int l = 0; l < c->L; l++) {
        cudaCheck(cudaMemcpy(z, model->acts.z + (size_t)l * N * E, (size_t)N * E * sizeof(float), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(lse, model->acts.lse + (size_t)l * N, (size_t)N * sizeof(float), cudaMemcpyDeviceToHost));
        cpu::print_router_layer(logfile, step, l, counts + (size_t)l * E, N * model->counts_ranks, z, lse, N, E, c->K,
                                   model->aux[l], model->zl[l]);
    }
    free(z); free(lse); free(counts);
}

// ----------------------------------------------------------------------------
// task eval: task loss, greedy accuracy and test-time compute on -ev files (train_moe.c's eval section:
// the file reader, the batch layout, answer matching, majority vote and the reports are its functions)

using cpu::EvalSet; using cpu::TASK_MEMORIZATION;

// task loss in bits per answer token and per answer byte: train_moe.c's rows, the per-token losses
// read back from the GPU
void eval_task_loss(Model* model, const EvalSet* es, const Tokenizer* tk, int B, int T, int eot,
                    double* bits_per_token, double* bits_per_byte, int* truncated) {
    int* x = (int*)mallocCheck((size_t)B * T * sizeof(int));
    int* y = (int*)mallocCheck((size_t)B * T * sizeof(int));
    float* losses = (float*)mallocCheck((size_t)B * T * sizeof(float));
    double nll = 0.0;
    long ntok = 0, nbytes = 0;
    *truncated = 0;
    for (int i0 = 0; i0 < es->n; i0 += B) {
        *truncated += cpu::task_loss_batch(es, i0, B, T, eot, x, y);
        model_forward(model, x, y, B, T);
        cudaCheck(cudaMemcpy(losses, model->losses, (size_t)B * T * sizeof(float), cudaMemcpyDeviceToHost));
        cpu::task_loss_add(y, losses, B * T, tk, &nll, &ntok, &nbytes);
    }
    *bits_per_token = ntok ? nll / ntok / log(2.0) : NAN;
    *bits_per_byte = nbytes ? nll / nbytes / log(2.0) : NAN;
    free(x); free(y); free(losses);
}

// one new query per row against that row's KV cache (positions 0..pos): q[R,H*D] -> out[R,H*D];
// cache [R][maxT][Hkv*D]. One block of ATT_DEC_THREADS per (row, head): a warp per key scores it,
// the block takes max and sum, then thread i accumulates output dim i over the keys in order.
#define ATT_DEC_THREADS 128
__global__ void attention_decode_kernel(floatX* out, const floatX* q, const floatX* kc, const floatX* vc, int pos,
                                        int maxT, int H, int Hkv, int D) {
    extern __shared__ float score[]; // maxT
    __shared__ float red[ATT_DEC_THREADS];
    int r = blockIdx.x / H, h = blockIdx.x % H, KD = Hkv * D;
    const floatX* qr = q + (size_t)r * H * D + (size_t)h * D;
    const floatX* kr = kc + (size_t)r * maxT * KD + (size_t)(h / (H / Hkv)) * D;
    const floatX* vr = vc + (size_t)r * maxT * KD + (size_t)(h / (H / Hkv)) * D;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int t = warp; t <= pos; t += ATT_DEC_THREADS / 32) {
        float s = 0.0f;
        for (int i = lane; i < D; i += 32) s += tof(qr[i]) * tof(kr[(size_t)t * KD + i]);
        s = warp_sum(s);
        if (lane == 0) score[t] = s / sqrtf((float)D);
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int t = threadIdx.x; t <= pos; t += ATT_DEC_THREADS) mx = fmaxf(mx, score[t]);
    mx = block_max(mx, red);
    float sum = 0.0f;
    for (int t = threadIdx.x; t <= pos; t += ATT_DEC_THREADS) { score[t] = expf(score[t] - mx); sum += score[t]; }
    sum = block_sum(sum, red); // (its barrier also publishes the exponentials)
    for (int i = threadIdx.x; i < D; i += ATT_DEC_THREADS) {
        float o = 0.0f;
        for (int t = 0; t <= pos; t++) o += score[t] * tof(vr[(size_t)t * KD + i]);
        out[(size_t)r * H * D + (size_t)h * D + i] = tox(o / sum);
    }
}

// attention_decode_kernel keeps one score per cached position in shared memory, 4*maxT bytes: past the
// 48 KiB a launch may take by default from maxT ~ 12k on. Its limit is raised to what the GPU allows
// (the opt-in maximum, 227 KiB on an H100: maxT up to ~58k); beyond that, an error that says so.
static void attention_decode_setup(int maxT) {
    static size_t raised = 0; // the dynamic shared memory the kernel may take now (bytes)
    size_t bytes = (size_t)maxT * sizeof(float);
    if (bytes <= raised) return;
    int dev, optin = 0;
    cudaFuncAttributes fa;
    cudaCheck(cudaGetDevice(&dev));
    cudaCheck(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    cudaCheck(cudaFuncGetAttributes(&fa, attention_decode_kernel));
    size_t room = (size_t)optin > fa.sharedSizeBytes ? (size_t)optin - fa.sharedSizeBytes : 0;
    if (bytes > room) {
        fprintf(stderr, "Error: KV-cached decoding at T=%d keeps %zu bytes of scores per block in shared memory; this GPU "
                        "allows %zu (decoding needs T <= %zu)\n", maxT, bytes, room, room / sizeof(float));
        exit(EXIT_FAILURE);
    }
    cudaCheck(cudaFuncSetAttribute(attention_decode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    raised = bytes;
}

// k (or v) of len positions per row, x[R][len][KD], into the cache [R][maxT][KD] at positions pos..
static void cache_put(floatX* cache, const floatX* x, int R, int len, int maxT, int KD, int pos) {
    size_t row = (size_t)len * KD * sizeof(floatX);
    cudaCheck(cudaMemcpy2D(cache + (size_t)pos * KD, (size_t)maxT * KD * sizeof(floatX), x, row, row, R,
                           cudaMemcpyDeviceToDevice));
}

// one new token per row (toks[R], host) at position pos through every layer, attending to the KV
// cache, which gets the token's k and v; logits [R,V] land in model->logits. Layer 0's activation
// buffers are the scratch, as in train_moe.c's generate_answer.
static void decode_step(Model* model, const int* toks, int R, int pos) {
    const MoEConfig* c = &model->config;
    int L = c->L, C = c->C, H = c->H, Hkv = c->Hkv, D = C / H, E = c->E, K = c->K, F = c->F, V = c->V;
    int HD = H * D, KD = Hkv * D, maxB = model->maxB, maxT = model->maxT;
    cudaCheck(cudaMemcpy(model->inputs_d, toks, R * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemset(model->nonfinite_d, 0, (size_t)L * sizeof(int)));
    ParamTensors p = model->params;
    ActTensors a = model->acts;
    floatX* h = a.resid; // R x C, the residual stream of the new tokens
    const float* fc = model->freqs_cos + (size_t)pos * (D / 2);
    const float* fs = model->freqs_sin + (size_t)pos * (D / 2);
    encoder_forward(h, model->inputs_d, p.wte, R, C);
    for (int l = 0; l < L; l++) {
        floatX* kl = model->kcache + (size_t)l * maxB * maxT * KD;
        floatX* vl = model->vcache + (size_t)l * maxB * maxT * KD;
        rmsnorm_forward(a.a, a.a_rstd, h, p.attn_norm + (size_t)l * C, R, C, c->eps);
        matmul_forward(a.q, a.a, p.wq + (size_t)l * HD * C, R, C, HD);
        matmul_forward(a.k, a.a, p.wk + (size_t)l * KD * C, R, C, KD);
        matmul_forward(a.v, a.a, p.wv + (size_t)l * KD * C, R, C, KD);
        rope_apply(a.q, fc, fs, R, 1, H, D, +1); // T = 1: every row at position pos
        rope_apply(a.k, fc, fs, R, 1, Hkv, D, +1);
        cache_put(kl, a.k, R, 1, maxT, KD, pos);
        cache_put(vl, a.v, R, 1, maxT, KD, pos);
        attention_decode_kernel<<<R * H, ATT_DEC_THREADS, maxT * sizeof(float)>>>(a.atty, a.q, kl, vl, pos, maxT, H, Hkv, D);
        cudaCheck(cudaGetLastError());
        matmul_forward(a.resid_mid, a.atty, p.wo + (size_t)l * C * HD, R, HD, C);
        residual_forward(a.resid_mid, a.resid_mid, h, (size_t)R * C);
        rmsnorm_forward(a.m, a.m_rstd, a.resid_mid, p.moe_norm + (size_t)l * C, R, C, c->eps);
        router_forward(a.z, a.lse, a.m, p.wr + (size_t)l * E * C, R, C, E);
        topk_forward(model->topi, a.gate, model->nonfinite_d + l, a.z, R, E, K);
        permute_plan(model->counts, model->offs, model->row_of, model->tok_of, model->plan_hist, model->offs_h,
                     model->topi, R, E, K);
        permute_forward(a.xe, a.m, model->tok_of, R * K, C);
        experts_forward(a.ye, a.h1, a.h3, a.act, a.xe, p.w1 + (size_t)l * E * F * C, p.w3 + (size_t)l * E * F * C,
                        p.w2 + (size_t)l * E * C * F, model->offs_h, E, C, F, &model->group);
        unpermute_forward(h, a.resid_mid, a.ye, a.gate, model->row_of, R, K, C);
    }
    rmsnorm_forward(a.xf, model->f_rstd, h, p.final_norm, R, C, c->eps);
    classifier_forward(model->logits, a.xf, p.lm_head, R, C, V);
    router_check_counts(model, R);
}

// decoding with a KV cache on the GPU, R <= maxB rows that continue one prompt together (the samples
// of one item): greedy (temperature <= 0; rngs may be NULL) or sampled at a temperature, row r drawing
// from *rngs[r] (rows may share a stream: then it is drawn row by row at each position). Prefill: one forward over R copies of the prompt, whose per-layer k and v (after
// RoPE) become the cache. A row stops as train_moe.c's generate_answer does (stop_token, a newline
// if stop_newline, max_new tokens); finished rows ride along until all are done. Row r's tokens go to
// out[r * max_new ...], their number to lens[r]. For GRPO's rollouts (train_moe.c's sample_response):
// keep_stop keeps a sampled stop token as the row's last token, and logp (if not NULL, laid out as out)
// receives each token's log-prob under softmax(logits) at temperature 1.
void generate_answers(Model* model, const int* prompt, int plen, int R, int max_new, int stop_token, int stop_newline,
                      const Tokenizer* tk, int* out, int* lens, float temperature, uint64_t* const* rngs,
                      float* logp = NULL, int keep_stop = 0) {
    const MoEConfig* c = &model->config;
    int L = c->L, V = c->V, KD = c->Hkv * (c->C / c->H), maxB = model->maxB, maxT = model->maxT;
    if (R > maxB) { fprintf(stderr, "Error: generate_answers: %d rows, more than B=%d\n", R, maxB); exit(EXIT_FAILURE); }
    int stride = max_new;
    if (plen + max_new > maxT) max_new = maxT - plen;
    for (int r = 0; r < R; r++) lens[r] = 0;
    if (max_new <= 0) return;
    size_t cache = (size_t)L * maxB * maxT * KD;
    if (!model->kcache) {
        model->kcache = (floatX*)cudaMallocCheck(cache * sizeof(floatX));
        model->vcache = (floatX*)cudaMallocCheck(cache * sizeof(floatX));
    }
    attention_decode_setup(maxT);
    int* toks = (int*)mallocCheck((size_t)R * plen * sizeof(int));
    for (int r = 0; r < R; r++) memcpy(toks + (size_t)r * plen, prompt, plen * sizeof(int));
    model->decoding = 1; // the prefill: a shape per prompt length, kept out of cuDNN's graph cache
    model_forward(model, toks, NULL, R, plen);
    model->decoding = 0;
    for (int l = 0; l < L; l++) { // the prefill's k, v [R][plen][KD] become positions 0..plen-1 of the cache
        size_t at = (size_t)l * maxB * maxT * KD, act = (size_t)l * R * plen * KD;
        cache_put(model->kcache + at, model->acts.k + act, R, plen, maxT, KD, 0);
        cache_put(model->vcache + at, model->acts.v + act, R, plen, maxT, KD, 0);
    }
    float* logits = (float*)mallocCheck((size_t)R * V * sizeof(float));
    float* probs = (float*)mallocCheck((size_t)V * sizeof(float));
    int* done = (int*)callocCheck(R, sizeof(int));
    int* next = (int*)mallocCheck(R * sizeof(int));
    for (int r = 0; r < R; r++) model_logits_to_host(model, logits + (size_t)r * V, (size_t)r * plen + plen - 1, 1);
    for (int pos = plen;; pos++) {
        int active = 0;
        for (int r = 0; r < R; r++) {
            next[r] = 0; // what a finished row feeds (ignored)
            if (done[r]) continue;
            const float* lr = logits + (size_t)r * V;
            int t = cpu::pick_token(lr, V, temperature, rngs ? rngs[r] : NULL, probs);
            if (logp) { // as the training forward's cross-entropy: max + log(sum exp(l - max)) - l[t]
                float mx = cpu::vmax(lr, V);
                for (int i = 0; i < V; i++) probs[i] = cpu::vexpf(lr[i] - mx);
                logp[(size_t)r * stride + lens[r]] = -(mx + logf(cpu::vsum(probs, V)) - lr[t]);
            }
            if (t == stop_token) {
                if (keep_stop) out[(size_t)r * stride + lens[r]++] = t;
                done[r] = 1;
                continue;
            }
            out[(size_t)r * stride + lens[r]++] = t;
            const char* piece = cpu::tokenizer_piece(tk, t);
            if ((stop_newline && piece && strchr(piece, '\n')) || lens[r] == max_new) { done[r] = 1; continue; }
            next[r] = t;
            active++;
        }
        if (!active) break;
        decode_step(model, next, R, pos);
        model_logits_to_host(model, logits, 0, R);
    }
    free(toks); free(logits); free(probs); free(done); free(next);
}

// greedy accuracy over the first max_items items (all if max_items <= 0); right (if not NULL): each
// item's '1' or '0' (train_moe.c's eval_task_accuracy)
double eval_task_accuracy(Model* model, const EvalSet* es, const Tokenizer* tk, int eot, int max_items, int* scored,
                          char* right) {
    int n = (max_items > 0 && max_items < es->n) ? max_items : es->n, correct = 0, len;
    int* out = (int*)mallocCheck((size_t)(es->max_answer + 8) * sizeof(int));
    size_t cap = 1024;
    char* text = (char*)mallocCheck(cap);
    for (int i = 0; i < n; i++) {
        generate_answers(model, es->toks[i], es->plen[i], 1, es->max_answer + 8, eot, es->kind == TASK_MEMORIZATION,
                         tk, out, &len, 0.0f, NULL);
        int ok = cpu::answer_matches(cpu::tokens_text(tk, out, len, &text, &cap), es->ref[i], es->kind);
        correct += ok;
        if (right) right[i] = ok ? '1' : '0';
    }
    if (right) right[n] = 0;
    free(out); free(text);
    *scored = n;
    return n ? (double)correct / n : NAN;
}

// test-time compute (train_moe.c's definitions of maj@n and pass@n): an item's nsamples answers are
// decoded together, up to B rows at a time
int eval_test_time_compute(Model* model, const EvalSet* es, const Tokenizer* tk, int eot, int max_items, int nsamples,
                           float temperature, uint64_t* rng, int* ns, double* maj, double* pass, int* scored) {
    int items = (max_items > 0 && max_items < es->n) ? max_items : es->n, max_new = es->max_answer + 8;
    int nn = cpu::ttc_begin(nsamples, ns, maj, pass), rows = nsamples < model->maxB ? nsamples : model->maxB;
    int* out = (int*)mallocCheck((size_t)rows * max_new * sizeof(int));
    int* lens = (int*)mallocCheck(rows * sizeof(int));
    size_t cap = 1024;
    char* text = (char*)mallocCheck(cap);
    char** ans = (char**)callocCheck(nsamples, sizeof(char*));
    int* right = (int*)callocCheck(nsamples, sizeof(int));
    uint64_t** rngs = (uint64_t**)mallocCheck(rows * sizeof(uint64_t*));
    for (int r = 0; r < rows; r++) rngs[r] = rng; // one stream, drawn row by row
    for (int i = 0; i < items; i++) {
        for (int s0 = 0; s0 < nsamples; s0 += rows) {
            int R = nsamples - s0 < rows ? nsamples - s0 : rows;
            generate_answers(model, es->toks[i], es->plen[i], R, max_new, eot, es->kind == TASK_MEMORIZATION, tk, out,
                             lens, temperature, rngs);
            for (int r = 0; r < R; r++)
                ans[s0 + r] = cpu::sample_answer(tk, out + (size_t)r * max_new, lens[r], es, i, &text, &cap, &right[s0 + r]);
        }
        cpu::ttc_tally(ans, right, ns, nn, maj, pass);
        for (int s = 0; s < nsamples; s++) free(ans[s]);
    }
    for (int j = 0; j < nn; j++) { maj[j] /= items; pass[j] /= items; }
    free(out); free(lens); free(text); free(ans); free(right); free(rngs);
    *scored = items;
    return nn;
}

// ----------------------------------------------------------------------------
// GRPO post-training (-rl): train_moe.c's algorithm and its host code (advantages, token weights,
// rollout rows, prompt order, the report); here each prompt's G samples decode together, and the
// forward and the weighted backward run on the GPU

using cpu::GrpoConfig; using cpu::GrpoStats; using cpu::Rollouts;

__global__ void divide_kernel(floatX* x, size_t n, float d) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = tox(tof(x[i]) / d);
}
// after a forward with targets over N positions: the log-probs at temperature temp, the logits divided by
// it and the per-token losses and logsumexps computed again from them (train_moe.c's grpo_temper)
void grpo_temper(Model* model, int N, float temp) {
    if (temp == 1.0f) return;
    size_t n = (size_t)N * model->config.V;
    divide_kernel<<<ceil_div(n, 256), 256>>>(model->logits, n, temp);
    cudaCheck(cudaGetLastError());
    crossentropy_forward(model->loss_terms_d, model->losses, model->logit_lse, model->logits, model->targets_d,
                         model->counted, N, model->config.V);
}

// one mini-batch's gradient (added to model->grads): the forward, its per-token losses to the host,
// train_moe.c's weights, the weighted backward. Returns the loss (with -rx 1 the router terms too; else
// the backward leaves them out, as train_moe.c).
float grpo_backward(Model* model, const int* x, const int* y, const float* adv, const float* old_logp,
                    const float* ref_logp, int rows, int T, const GrpoConfig* gc, float* w, GrpoStats* st) {
    const MoEConfig* c = &model->config;
    size_t N = (size_t)rows * T;
    model_forward(model, x, y, rows, T);
    grpo_temper(model, (int)N, gc->temp);
    float* ce = (float*)mallocCheck(2 * N * sizeof(float));
    float* ent = ce + N;
    cudaCheck(cudaMemcpy(ce, model->losses, N * sizeof(float), cudaMemcpyDeviceToHost));
    // the entropy, through token_weights_d (free until the backward uploads the weights)
    entropy_kernel<<<N, 256>>>(model->token_weights_d, model->logits, model->logit_lse, model->targets_d, c->V);
    cudaCheck(cudaGetLastError());
    cudaCheck(cudaMemcpy(ent, model->token_weights_d, N * sizeof(float), cudaMemcpyDeviceToHost));
    double loss = cpu::grpo_token_weights(ce, y, adv, old_logp, ref_logp, rows, T, gc, w, st);
    for (size_t n = 0; n < N; n++) if (y[n] >= 0) st->entropy += ent[n];
    if (gc->router_losses)
        for (int l = 0; l < c->L; l++) loss += (double)c->aux_coef * model->aux[l] + (double)c->z_coef * model->zl[l];
    st->loss += loss;
    if (gc->temp != 1.0f)
        for (size_t n = 0; n < N; n++) w[n] /= gc->temp;
    MoEConfig keep = model->config;
    if (!gc->router_losses) model->config.aux_coef = model->config.z_coef = 0.0f;
    model->token_weights = w;
    model_backward(model, 1.0f);
    model->token_weights = NULL;
    model->config = keep;
    free(ce);
    return (float)loss;
}

__global__ void decay_kernel(float* p, size_t n, float f) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] -= f * p[i];
}
// one AdamW step of GRPO's update (train_moe.c's grpo_adamw): the fp32 master weights of the tensors
// model_update does not decay (norm weights) decayed first, unless decay_matrices_only
void grpo_adamw(Model* model, float lr, float beta1, float beta2, float weight_decay, int decay_matrices_only, int t,
                float grad_scale) {
    model_trainable_check(model, "grpo_adamw");
    size_t off = 0;
    for (int ti = 0; ti < NUM_PARAM_TENSORS; ti++) {
        size_t n = model->param_sizes[ti];
        if (!param_is_matrix[ti] && !decay_matrices_only) {
            decay_kernel<<<ceil_div(n, 256), 256>>>(model->master_memory + off, n, lr * weight_decay);
            cudaCheck(cudaGetLastError());
        }
        off += n;
    }
    model_update(model, lr, beta1, beta2, 1e-8f, weight_decay, t, grad_scale);
}

// row r's sampler stream in a rollout batch: dev/moe/grpo.h's grpo_row_stream, the CPU's own, so a row's
// tokens depend on the step's seed and r alone (any thread count there, any batching here)
using cpu::grpo_row_stream;

// G responses to each of the P items, a prompt's G rows decoded together, row r = p*G + g sampling
// from grpo_row_stream(seed, r) as on the CPU: the same checkpoint and seed give the CPU's rollouts
// (up to rounding of the logits); rewards from the answer check. Returns how many rows earned reward 1.
int grpo_rollouts(Model* model, const EvalSet* es, const int* items, const GrpoConfig* gc, const Tokenizer* tk,
                  int eot, uint64_t seed, Rollouts* ro) {
    int G = gc->G, R = gc->R, right = 0;
    int* out = (int*)mallocCheck((size_t)G * R * sizeof(int));
    float* logp = (float*)mallocCheck((size_t)G * R * sizeof(float));
    int* lens = (int*)mallocCheck(G * sizeof(int));
    uint64_t* streams = (uint64_t*)mallocCheck(G * sizeof(uint64_t));
    uint64_t** rngs = (uint64_t**)mallocCheck(G * sizeof(uint64_t*));
    size_t cap = 1024;
    char* text = (char*)mallocCheck(cap);
    for (int p = 0; p < gc->P; p++) {
        int i = items[p];
        for (int g = 0; g < G; g++) { streams[g] = grpo_row_stream(seed, p * G + g); rngs[g] = &streams[g]; }
        generate_answers(model, es->toks[i], es->plen[i], G, R, eot, es->kind == TASK_MEMORIZATION, tk, out, lens, gc->temp,
                         rngs, logp, 1);
        for (int g = 0; g < G; g++) {
            int r = p * G + g, n = lens[g];
            const int* resp = out + (size_t)g * R;
            cpu::rollouts_set_row(ro, r, es->toks[i], es->plen[i], resp, n, logp + (size_t)g * R, eot);
            int k = n > 0 && resp[n - 1] == eot ? n - 1 : n; // the answer's text, without the stop token
            ro->reward[r] = (float)cpu::answer_matches(cpu::tokens_text(tk, resp, k, &text, &cap), es->ref[i], es->kind);
            right += ro->reward[r] > 0;
        }
    }
    free(out); free(logp); free(lens); free(streams); free(rngs); free(text);
    return right;
}

// the log-probs under model of the rollouts' response tokens at temperature temp, through the training
// forward on the update's mini-batches (rows/M rows each), into dst laid out as ro->y (0 where no target)
void grpo_logp(Model* model, const Rollouts* ro, int M, float temp, float* dst) {
    int mb = ro->rows / M, T = ro->T;
    size_t n = (size_t)mb * T;
    float* ce = (float*)mallocCheck(n * sizeof(float));
    for (int m = 0; m < M; m++) {
        size_t o = (size_t)m * n;
        model_forward(model, ro->x + o, ro->y + o, mb, T);
        grpo_temper(model, (int)n, temp);
        cudaCheck(cudaMemcpy(ce, model->losses, n * sizeof(float), cudaMemcpyDeviceToHost));
        for (size_t j = 0; j < n; j++) dst[o + j] = ro->y[o + j] >= 0 ? -ce[j] : 0.0f;
    }
    free(ce);
}
// the reference model's log-probs of the response tokens, mini-batch by mini-batch
void grpo_ref_logp(Model* ref, Rollouts* ro, int M, float temp) { grpo_logp(ref, ro, M, temp, ro->ref_logp); }
// pi_old: the policy's log-probs of its rollouts, recomputed by the very forward the first update runs
// (as verl recomputes them with the actor), not taken from the decoder: in bf16 the KV-cached decode
// and the training forward round differently, and the first mini-batch's ratios would not be 1
void grpo_old_logp(Model* policy, Rollouts* ro, int M, float temp) { grpo_logp(policy, ro, M, temp, ro->old_logp); }

// ----------------------------------------------------------------------------
// throughput: model FLOPs utilisation and the device

// Training FLOPs per token, the 6N rule over the matmul weights one token passes through, plus attention:
//   6 * (L * (H*D*C + 2*Hkv*D*C + C*H*D + E*C + K*3*F*C) + V*C)   q,k,v,o projections, router, K experts, head
// + 6 * L * T * H*D                                                causal attention: QK^T and PV cost 2*H*D
//                                                                  FLOPs per (query, key) pair each, T/2 keys
//                                                                  per query on average, x3 for the backward
// The embedding is a lookup (0 FLOPs); norms, softmax and elementwise work are not counted.
double flops_per_token(const MoEConfig* c, int T) {
    double L = c->L, C = c->C, D = (double)c->C / c->H, HD = c->H * D, KD = c->Hkv * D;
    double matmul = L * (HD * C + 2.0 * KD * C + C * HD + c->E * C + (double)c->K * 3.0 * c->F * C) + (double)c->V * C;
    return 6.0 * matmul + 6.0 * L * T * HD;
}
// the dense peak MFU is quoted against: H100 SXM, bf16 tensor cores 989.4 TFLOP/s; fp32 (no tensor
// cores) 66.9 TFLOP/s. The environment variable PEAK_TFLOPS overrides it for other GPUs.
double peak_flops(void) {
    const char* env = getenv("PEAK_TFLOPS");
    if (env && atof(env) > 0) return atof(env) * 1e12;
#ifdef PRECISION_BF16
    return 989.4e12;
#else
    return 66.9e12;
#endif
}

// pick the GPU (data parallel: the rank's, dist_device), make the cuBLAS handle (fp32 accumulation and
// reductions, no TF32)
void gpu_init(void) {
    int dev = dist_device();
    cudaCheck(cudaSetDevice(dev));
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, dev));
    printf("device: %s (sm_%d%d, %.1f GiB), precision %s\n", prop.name, prop.major, prop.minor,
           prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0), PRECISION_NAME);
    cublasCheck(cublasCreate(&cublas_handle));
    // no TF32, and split-K partial sums of bf16 GEMMs added in fp32 (the compute type), never in bf16
    cublasCheck(cublasSetMathMode(cublas_handle, (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
#ifdef USE_CUDNN
    cudnn_att_init();
#endif
}
void gpu_free(void) {
    cublasCheck(cublasDestroy(cublas_handle));
#ifdef USE_CUDNN
    cudnn_att_free();
#endif
}

// ----------------------------------------------------------------------------
// main's helpers: the flags against the ranks, the model to start from, the log, checkpoints and evals
// during training, one step; GRPO

#ifndef TESTING

using cpu::Args;

// the flags against the number of ranks, which every rank checks alike: rank 0 says what is wrong,
// every rank stops. Expert parallelism (-ep) is train_moe.c's alone.
static void dist_setup(const Args* a) {
    const char* one = a->rl_file ? "-rl (GRPO)" : a->fwd_in ? "-fi/-fo (forward only)" : a->eval_only ? "-ex (eval only)" : NULL;
    if (a->ep == 1 && (dist.world == 1 || (!one && a->B % dist.world == 0))) return;
    char msg[512];
    if (a->ep != 1)
        snprintf(msg, sizeof msg, "-ep %d: expert parallelism is train_moe_mpi's (train_moe.c); train_moe_cu is data "
                                  "parallel only (USE_MPI=1: mpirun -n R ./train_moe_cu_mpi)", a->ep);
    else if (one) snprintf(msg, sizeof msg, "%s runs in one process, not across %d ranks (run ./train_moe_cu)", one, dist.world);
    else
        snprintf(msg, sizeof msg, "the batch size B=%d (flag -b) must be divisible by the %d ranks: -b is the global batch, "
                                  "of which each rank trains B/%d sequences", a->B, dist.world, dist.world);
    dist_fail(msg);
}

// -fi/-fo: logits of the loaded model on raw int32 tokens
static int run_forward_only(Model* model, const Args* a) {
    size_t n = (size_t)a->B * a->T;
    int* toks = (int*)mallocCheck(n * sizeof(int));
    FILE* fp = fopenCheck(a->fwd_in, "rb");
    if (file_size(fp) != (long)(n * sizeof(int))) {
        fprintf(stderr, "Error: '%s' is %ld bytes, expected B*T=%zu int32 tokens\n", a->fwd_in, file_size(fp), n);
        exit(EXIT_FAILURE);
    }
    freadCheck(toks, sizeof(int), n, fp, a->fwd_in);
    fclose(fp);
    model_forward(model, toks, NULL, a->B, a->T);
    size_t nl = n * model->config.V;
    float* logits = (float*)mallocCheck(nl * sizeof(float));
    model_logits_to_host(model, logits, 0, n);
    char* tmp = (char*)mallocCheck(strlen(a->fwd_out) + 5);
    sprintf(tmp, "%s.tmp", a->fwd_out);
    fp = fopenCheck(tmp, "wb");
    int ok = fwrite(logits, sizeof(float), nl, fp) == nl;
    ok = (fclose(fp) == 0) && ok;
    if (!ok || rename(tmp, a->fwd_out) != 0) { remove(tmp); fprintf(stderr, "Error: writing '%s' failed\n", a->fwd_out); exit(EXIT_FAILURE); }
    free(tmp); free(toks); free(logits);
    return 0;
}

// every -ev file: task loss and greedy accuracy, then (-tn) test-time compute (train_moe.c's run_task_evals)
static void run_task_evals(Model* model, EvalSet* sets, int nsets, const Tokenizer* tk, int eot, const Args* a,
                           FILE* logf, int step) {
    for (int i = 0; i < nsets; i++) {
        double bpt, bpb, maj[16], pass[16];
        int trunc, scored, ns[16];
        eval_task_loss(model, &sets[i], tk, a->B / dist.world, a->T, eot, &bpt, &bpb, &trunc); // rows the activations hold
        double acc = 0.0;
        scored = 0;
        char* right = (char*)mallocCheck((size_t)sets[i].n + 1);
        if (!sets[i].loss_only) acc = eval_task_accuracy(model, &sets[i], tk, eot, a->acc_items, &scored, right);
        cpu::report_task_eval(logf, step, &sets[i], bpt, bpb, trunc, acc, scored, sets[i].loss_only ? NULL : right);
        free(right);
        if (a->ttc_samples <= 0 || sets[i].loss_only) continue;
        uint64_t rng = hash3(a->seed, (uint64_t)step, 0x77C + i); // its own stream: training is not affected
        int nn = eval_test_time_compute(model, &sets[i], tk, eot, a->acc_items, a->ttc_samples, a->ttc_temp, &rng, ns,
                                        maj, pass, &scored);
        cpu::report_ttc(logf, step, &sets[i], nn, ns, maj, pass, scored, a->ttc_temp);
    }
}

// the model to train: from a checkpoint (-e, or the newest in -o with -y: weights, AdamW, step, data
// position and RNG) or a random init. Returns the checkpoint resumed from (malloc'd), or NULL.
static char* model_start(Model* model, TrainState* st, const Args* a, const Tokenizer* tk) {
    *st = (TrainState){0, {0, 0, 0}, 0, a->seed};
    char* resume_path = a->resume ? cpu::resume_checkpoint(a->out_dir) : NULL;
    const char* ckpt = resume_path ? resume_path : a->init_ckpt;
    if (a->resume && !resume_path) printf("resume: no checkpoint in '%s' yet, starting fresh\n", a->out_dir);
    if (ckpt) {
        if (checkpoint_load(model, ckpt, st, resume_path != NULL) != 0) exit(EXIT_FAILURE);
        cpu::check_shape_flags(&model->config, a, ckpt);
        if (!resume_path) { st->step = 0; st->pos = (DataPos){0, 0, 0}; st->rng = 0; st->seed = a->seed; }
        printf("loaded %s%s (step %d)\n", ckpt, resume_path ? " with optimizer state" : "", st->step);
    } else {
        MoEConfig c = a->model;
        if (c.V == 0) c.V = tk->ok ? tk->V : 4096;
        c.T = a->T;
        model_config_check(&c, "model flags");
        model_build(model, &c);
        model_init_random(model, a->seed, a->init_std);
    }
    if (st->rng == 0) st->rng = hash3(st->seed, 0x5A3, 0);
    return resume_path;
}

// OUT_DIR/log.txt, appended to (an earlier run's log is never lost); NULL without -o, and on every rank but 0
static FILE* open_log(const char* out_dir) {
    FILE* logf = NULL;
    if (out_dir && dist.rank == 0) {
        cpu::mkdir_p(out_dir);
        char* lp = (char*)mallocCheck(strlen(out_dir) + 16);
        sprintf(lp, "%s/log.txt", out_dir);
        logf = fopenCheck(lp, "a"); // appends: an earlier run's log is never lost
        free(lp);
    }
    return logf;
}

// OUT_DIR/model_STEP.bin with the AdamW state and where training is (now)
static void save_checkpoint(const Model* model, const char* out_dir, TrainState now) {
    char* path = (char*)mallocCheck(strlen(out_dir) + 32);
    sprintf(path, "%s/model_%08d.bin", out_dir, now.step);
    checkpoint_save(model, path, 1, &now);
    printf("saved %s\n", path);
    free(path);
}

// the val loss and every -ev file's task loss and accuracy, on the console and in the log
static void evaluate(Model* model, DataLoader* val, EvalSet* sets, int nsets, const Tokenizer* tk,
                     const Args* a, FILE* logf, int step) {
    float vl = eval_val_loss(model, val, a->val_batches);
    printf("val loss %.4f\n", vl);
    if (logf) fprintf(logf, "step %d val %.6f\n", step, vl);
    run_task_evals(model, sets, nsets, tk, tk->ok ? tk->eot : 0, a, logf, step);
}

// one optimizer step: grad_accum micro-batches of this rank's B/R sequences of each batch, the gradients
// summed over the ranks, clipping by the global norm, AdamW. Returns the step's mean loss terms in
// terms[4] (loss, ce, aux, z; their means over the ranks), its lr and grad norm.
static void training_step(Model* model, DataLoader* train, const Args* a, int step, double* terms, float* lr,
                          float* norm) {
    const MoEConfig* c = &model->config;
    int Bl = a->B / dist.world; // the sequences of each global batch this rank trains on
    size_t shard = (size_t)dist.rank * Bl * a->T; // where this rank's sequences start in each global batch
    model->step = step + 1; // as the step line counts
    model_zero_grad(model);
    double loss = 0, ce = 0, aux = 0, zl = 0;
    model->collective = 1;
    for (int micro = 0; micro < a->grad_accum; micro++) {
        loader_next_batch(train); // the global batch: every rank reads it, and trains on its B/R sequences
        model_forward(model, train->inputs + shard, train->targets + shard, Bl, a->T);
        model_backward(model, 1.0f / (a->grad_accum * dist.world));
        loss += model->loss; ce += model->ce;
        for (int l = 0; l < c->L; l++) { aux += model->aux[l] / c->L; zl += model->zl[l] / c->L; }
    }
    model->collective = 0; // the evals after the step are rank 0's alone
    dist_allreduce_grads(model->grads_memory, model->num_params); // every rank: the gradient of the whole batch
    loss /= a->grad_accum; ce /= a->grad_accum; aux /= a->grad_accum; zl /= a->grad_accum;
    terms[0] = loss; terms[1] = ce; terms[2] = aux; terms[3] = zl;
    dist_mean(terms, 4); // what is logged: the means over the ranks
    *norm = global_grad_norm(model);
    float scale = (a->grad_clip > 0 && *norm > a->grad_clip) ? a->grad_clip / *norm : 1.0f;
    *lr = lr_schedule(step, a->steps, a->warmup, a->lr, a->lr * a->min_lr_frac);
    model_update(model, *lr, a->beta1, a->beta2, 1e-8f, a->weight_decay, step + 1, scale);
}

// -rl: GRPO post-training, as train_moe.c's run_grpo
static int run_grpo(Model* model, const Args* a, TrainState* st, const Tokenizer* tk, EvalSet* sets, int nsets,
                    DataLoader* val, FILE* logf) {
    const GrpoConfig* gc = &a->grpo;
    const MoEConfig* c = &model->config;
    int T = a->T, eot = tk->ok ? tk->eot : 0, rows = gc->P * gc->G, mb = rows / gc->M;
    EvalSet es;
    if (cpu::evalset_load(&es, a->rl_file, c->V, T) != 0) return 1;
    if (cpu::grpo_check_prompts(&es, a->rl_file, gc, T) != 0) { cpu::evalset_free(&es); return 1; }
    Model ref;
    int use_ref = gc->kl > 0;
    if (use_ref) {
        TrainState rst;
        if (checkpoint_load_frozen(&ref, a->init_ckpt, &rst) != 0) { cpu::evalset_free(&es); return 1; }
        if (!cpu::grpo_same_shape(&ref.config, c)) {
            fprintf(stderr, "Error: reference checkpoint '%s' (flag -e) has another shape than the policy being resumed\n",
                    a->init_ckpt);
            model_free(&ref);
            cpu::evalset_free(&es);
            return 1;
        }
        model_alloc_acts(&ref, mb, T);
    }
    printf("grpo: %s (%d prompts) | P=%d G=%d R=%d M=%d (%d rows per update) temp=%g clip=%g kl=%g agg=%d router "
           "losses %s | lr=%g AdamW betas (%g, %g) wd %g on %s\n",
           a->rl_file, es.n, gc->P, gc->G, gc->R, gc->M, mb, gc->temp, gc->clip, gc->kl, gc->agg,
           gc->router_losses ? "in" : "out", a->lr, a->beta1, a->beta2, a->weight_decay,
           gc->decay_matrices_only ? "the matrices" : "every parameter");
    Rollouts ro;
    cpu::rollouts_alloc(&ro, rows, T);
    float* w = (float*)mallocCheck((size_t)mb * T * sizeof(float));
    int* perm = (int*)mallocCheck((size_t)es.n * sizeof(int));
    int* items = (int*)mallocCheck((size_t)gc->P * sizeof(int));
    int perm_epoch = -1;
    DataPos pos = st->pos;
    if (a->val_every > 0 && st->step == 0) evaluate(model, val, sets, nsets, tk, a, logf, 0); // the start, as step 0
    for (int step = st->step; step < a->steps; step++) {
        cudaCheck(cudaDeviceSynchronize());
        double t0 = now_ms();
        model->step = step + 1;
        cpu::grpo_next_prompts(perm, &perm_epoch, es.n, &pos, st->seed, items, gc->P);
        grpo_rollouts(model, &es, items, gc, tk, eot, cpu::rng_u64(&st->rng), &ro); // one draw per step, as train_moe.c
        int flat = cpu::grpo_advantages(ro.reward, ro.adv, rows, gc->G);
        grpo_old_logp(model, &ro, gc->M, gc->temp);
        if (use_ref) grpo_ref_logp(&ref, &ro, gc->M, gc->temp);
        double t1 = now_ms();
        GrpoStats gs = {0};
        float lr = lr_schedule(step, a->steps, a->warmup, a->lr, a->lr * a->min_lr_frac), norm = 0.0f;
        for (int m = 0; m < gc->M; m++) {
            size_t o = (size_t)m * mb * T;
            model_zero_grad(model);
            grpo_backward(model, ro.x + o, ro.y + o, ro.adv + m * mb, ro.old_logp + o, ro.ref_logp + o, mb, T, gc, w, &gs);
            norm = global_grad_norm(model);
            float scale = (a->grad_clip > 0 && norm > a->grad_clip) ? a->grad_clip / norm : 1.0f;
            grpo_adamw(model, lr, a->beta1, a->beta2, a->weight_decay, gc->decay_matrices_only, step * gc->M + m + 1, scale);
        }
        cudaCheck(cudaDeviceSynchronize());
        cpu::grpo_report(logf, step + 1, a->steps, gc, &ro, flat, &gs, lr, norm, t1 - t0, now_ms() - t1);
        int last = step + 1 == a->steps;
        if (a->val_every > 0 && ((step + 1) % a->val_every == 0 || last))
            evaluate(model, val, sets, nsets, tk, a, logf, step + 1);
        if (a->out_dir && ((a->ckpt_every > 0 && (step + 1) % a->ckpt_every == 0) || last)) {
            TrainState now = {step + 1, pos, st->rng, st->seed};
            save_checkpoint(model, a->out_dir, now);
        }
        if (logf) fflush(logf);
    }
    if (use_ref) model_free(&ref);
    cpu::rollouts_free(&ro);
    free(w); free(perm); free(items);
    cpu::evalset_free(&es);
    return 0;
}

// ----------------------------------------------------------------------------
// main: flags (train_moe.c's, parsed by its parse_args), the training loop

int main(int argc, char** argv) {
    dist_init(&argc, &argv);
    Args a;
    cpu::parse_args(&a, argc, argv);
    dist_setup(&a);
    gpu_init();
    dist_nccl_init();
    if (dist.rank == 0 && a.profile_every > 0) fprintf(stderr, "note: -pf (the per-phase time table) is train_moe.c's: train_moe_cu ignores it\n");
    Tokenizer tk;
    if (tokenizer_init(&tk, a.tokenizer) != 0) exit(EXIT_FAILURE);
    Model model;
    TrainState st;
    char* resume_path = model_start(&model, &st, &a, &tk);
    MoEConfig* c = &model.config;
    if (dist.rank == 0 && tk.ok && tk.V != c->V)
        fprintf(stderr, "warning: tokenizer '%s' has V=%d but the model has V=%d\n", a.tokenizer, tk.V, c->V);
    if (a.fwd_in) {
        int rc = run_forward_only(&model, &a);
        gpu_free();
        dist_finalize();
        return rc;
    }

    cpu::print_model_summary(c, model.num_params);
    printf("train: B=%d T=%d grad_accum=%d steps=%d lr=%g warmup=%d min_lr=%g wd=%g clip=%g precision=%s\n",
           a.B, a.T, a.grad_accum, a.steps, a.lr, a.warmup, a.lr * a.min_lr_frac, a.weight_decay, a.grad_clip, PRECISION_NAME);
    if (dist.world > 1) printf("data parallel: %d ranks, a GPU each (NCCL); each trains %d sequences of every batch\n", dist.world, a.B / dist.world);

    int nsets = 0;
    EvalSet* sets = cpu::evalsets_load(a.eval_files, c->V, a.T, &nsets);
    DataLoader train, val;
    if (!a.rl_file) {
        loader_init(&train, a.train_glob, "-i", a.B, a.T, c->V, a.shuffle, st.seed);
        loader_seek(&train, st.pos);
    }
    loader_init(&val, a.val_glob, "-j", a.B, a.T, c->V, 0, st.seed);
    int rl_rows = a.rl_file ? a.grpo.P * a.grpo.G / a.grpo.M : 0;
    int Bl = a.B / dist.world; // the sequences of each global batch this rank trains on
    model_alloc_acts(&model, Bl > rl_rows ? Bl : rl_rows, a.T);
    printf("gpu memory: %.1f MiB allocated by the trainer, %.1f MiB in use on the device\n",
           gpu_bytes_allocated / (1024.0 * 1024.0), gpu_mem_sample());
    FILE* logf = open_log(a.out_dir);
    int eot = tk.ok ? tk.eot : 0;
    if (a.eval_only) {
        printf("val loss %.4f\n", eval_val_loss(&model, &val, a.val_batches));
        run_task_evals(&model, sets, nsets, &tk, eot, &a, logf, st.step);
        gpu_free();
        dist_finalize();
        return 0;
    }
    if (a.rl_file) {
        int rc = run_grpo(&model, &a, &st, &tk, sets, nsets, &val, logf);
        if (logf) fclose(logf);
        for (int i = 0; i < nsets; i++) cpu::evalset_free(&sets[i]);
        free(sets);
        loader_free(&val);
        tokenizer_free(&tk);
        model_free(&model);
        gpu_free();
        dist_finalize();
        free(resume_path);
        return rc;
    }
    double tokens_per_step = (double)a.B * a.T * a.grad_accum; // of every rank
    double flops_per_step = tokens_per_step * flops_per_token(c, a.T), peak = peak_flops() * dist.world;
    for (int step = st.step; step < a.steps; step++) {
        cudaCheck(cudaDeviceSynchronize());
        double t0 = now_ms(), terms[4];
        float lr, norm;
        training_step(&model, &train, &a, step, terms, &lr, &norm);
        cudaCheck(cudaDeviceSynchronize());
        double ms = now_ms() - t0;
        double mfu = flops_per_step / (ms / 1e3) / peak;
        gpu_mem_sample();
        printf("step %5d/%d | loss %.6f (ce %.4f aux %.4f z %.4f) | lr %.2e | norm %.4f | %.1f ms | %.0f tok/s | MFU %.1f%% | mem %.0f MiB\n",
               step + 1, a.steps, terms[0], terms[1], terms[2], terms[3], lr, norm, ms, tokens_per_step / (ms / 1e3), 100.0 * mfu,
               gpu_mem_peak_mib);
        fflush(stdout);
        if (logf) fprintf(logf, "step %d loss %.6f ce %.6f aux %.6f z %.6f lr %.6e norm %.6f ms %.3f mfu %.5f mem_mib %.1f\n",
                          step + 1, terms[0], terms[1], terms[2], terms[3], lr, norm, ms, mfu, gpu_mem_peak_mib);
        int last = step + 1 == a.steps;
        int evals = a.val_every > 0 && ((step + 1) % a.val_every == 0 || last);
        int sample = a.sample_every > 0 && ((step + 1) % a.sample_every == 0 || last);
        int save = a.out_dir && ((a.ckpt_every > 0 && (step + 1) % a.ckpt_every == 0) || last);
        if (evals) { // the router's aux and z of the last micro-batch (for its stats): their means over the ranks
            for (int l = 0; l < c->L; l++) {
                double t[2] = {model.aux[l], model.zl[l]};
                dist_mean(t, 2);
                model.aux[l] = (float)t[0]; model.zl[l] = (float)t[1];
            }
        }
        if (evals && dist.rank == 0) { // rank 0 evaluates alone, on its whole copy of the model
            print_router_stats(&model, logf, step + 1); // routing of the last training micro-batch
            evaluate(&model, &val, sets, nsets, &tk, &a, logf, step + 1);
        }
        if (sample && dist.rank == 0) {
            printf("--- sample ---\n");
            generate(&model, &tk, eot, a.gen_len, &st.rng);
            printf("--------------\n");
        }
        if (save) dist_check_replicas(model.master_memory, model.num_params);
        if (save && dist.rank == 0) {
            TrainState now = {step + 1, train.pos, st.rng, st.seed};
            save_checkpoint(&model, a.out_dir, now);
        }
        if (evals || sample || save) dist_wait_all(); // the other ranks wait for rank 0
        if (logf) fflush(logf);
    }
    printf("peak gpu memory %.0f MiB\n", gpu_mem_peak_mib);
    if (logf) fclose(logf);
    for (int i = 0; i < nsets; i++) cpu::evalset_free(&sets[i]);
    free(sets);
    loader_free(&train);
    loader_free(&val);
    tokenizer_free(&tk);
    model_free(&model);
    gpu_free();
    dist_finalize();
    free(resume_path);
    return 0;
}
#endif
