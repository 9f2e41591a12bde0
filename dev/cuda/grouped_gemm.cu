/*
Grouped expert GEMMs: every expert multiplies only its own rows (the token slots routed to it,
contiguous after the permute), so one MoE layer is E GEMMs of different heights. With rows
r in [offs[e], offs[e+1]) of expert e, and W[e] an [OC, IC] matrix:
    forward   Y[r,:]  = X[r,:] . W[e]^T          (h1 = xe.w1^T, h3 = xe.w3^T, ye = act.w2^T)
    input     dX[r,:] (=/+=) dY[r,:] . W[e]       (dact = dye.w2, dxe = dh1.w1 + dh3.w3)
    weight    dW[e]   += dY[rows of e]^T . X[rows of e]       (dW always fp32, as the trainer's gradients)
The versions are checked as a whole expert layer: the GEMMs plus a plain SwiGLU are composed into
the expert forward and backward and compared, tensor by tensor, with train_moe.c's
experts_forward and experts_backward (the CPU references).

Build: make grouped_gemm      (nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fopenmp -DOMP grouped_gemm.cu -lcublas -lcublasLt -o grouped_gemm)
Run:   ./grouped_gemm [version]

version 1: fp32, a loop of cublasSgemm, one call per non-empty expert (offsets on the host)
version 2: fp32, one cublasGemmGroupedBatchedEx call per GEMM kind (a group per non-empty expert)
version 3: fp32, hand-written tiled kernel (64x64 tiles, 16-deep k-slices in shared memory, 4x4 per
           thread) that reads the permutation itself: X rows are gathered from m by tok_of, so no
           permuted copy xe is made; offsets stay on the device (no host sync)
version 4: bf16 storage, fp32 accumulation: a loop of cublasGemmEx (the weight gradient: bf16 A and B,
           fp32 C, beta 1: accumulated in fp32 straight into the fp32 gradient)
version 5: bf16, cublasGemmGroupedBatchedEx; the weight gradient as in version 4 (the grouped call writes
           C in the type of A and B: a bf16 gradient, rounded before it reaches the fp32 sum)
version 6: bf16, hand-written tensor-core kernel (WMMA 16x16x16, 64x64 tiles, 4 warps of 32x32)
           that gathers m by tok_of like version 3; dW accumulated into fp32

The cuBLAS versions (1, 2, 4, 5) need a permuted copy xe = m[tok_of] and the offsets on the host
(one device-to-host copy per layer in a trainer); their forward time includes the gather kernel.
Validated at 512 tokens (the CPU references are slow), on inputs and weights rounded to bf16 so
that every version reads the same values; benchmarked at 8192 tokens. FLOPs: forward 6*NK*C*F,
backward 12*NK*C*F; fp32 versions measured against the 67 TFLOP/s fp32 (non-tensor) peak, bf16
versions against 989 TFLOP/s dense bf16.
Tolerances, relative to the largest |value| of each tensor (atol) plus rtol on each element:
fp32 atol 1e-4 * max, rtol 1e-4 (summation order); bf16 atol 1e-2 * max, rtol 2e-2 (h1, h3, act
and the outputs are rounded to bf16 along the way). The bf16 versions' weight gradients are also
checked at 4096 sampled entries per tensor against sums in double of the very bf16 values their GEMMs
read: relative RMS error <= 1e-4, which fp32 accumulation meets (~1e-6) and a gradient rounded to bf16
on its way (~1e-3) does not.
*/
#define TESTING
#define MOE_LAYERS_ONLY // the layers, the model and AdamW of train_moe.c: nothing after them
#include "../../train_moe.c"
#include "common.h"
#include <mma.h>

#define NUM_VERSIONS 6
static bool is_bf16(int v) { return v >= 4; }
static bool reads_permutation(int v) { return v == 3 || v == 6; } // hand-written: gather m by tok_of
static size_t elem_size(int v) { return is_bf16(v) ? 2 : 4; }

// the rows of one grouped GEMM: expert e owns rows [offs[e], offs[e+1]) of Y (and of X, or of m
// through gather[] when gather != NULL)
struct GGPlan {
    int E, NK;
    const int* offs_host; // [E+1], cuBLAS versions
    const int* offs;      // [E+1], device
    const int* gather;    // [NK] device tok_of, or NULL: X row r is row gather[r] of the input
};

// ----------------------------------------------------------------------------
// versions 1, 2, 4, 5: cuBLAS. cuBLAS is column-major; a row-major [R, C] matrix is its C x R
// transpose, so every row-major product below is issued with the operands swapped.

struct GemmDesc { int m, n, k; const void* A; int lda; const void* B; int ldb; void* C; int ldc; };

static void** gg_ptrs = NULL; // device: the A, B, C pointer arrays of the grouped call
static int gg_ptrs_n = 0;

// C in the version's type, or in fp32 with fp32_out (the weight gradients)
void gg_cublas(int v, cublasOperation_t ta, cublasOperation_t tb, const std::vector<GemmDesc>& d, float beta, int fp32_out) {
    const float one = 1.0f;
    int G = (int)d.size();
    if (G == 0) return;
    cudaDataType_t t = is_bf16(v) ? CUDA_R_16BF : CUDA_R_32F, tc = fp32_out ? CUDA_R_32F : t;
    if (v == 1 || v == 4 || (v == 5 && fp32_out)) { // a loop: one call per expert
        for (const GemmDesc& g : d) {
            if (v == 1)
                cublasCheck(cublasSgemm(lab_cublas(), ta, tb, g.m, g.n, g.k, &one, (const float*)g.A, g.lda,
                                        (const float*)g.B, g.ldb, &beta, (float*)g.C, g.ldc));
            else
                cublasCheck(cublasGemmEx(lab_cublas(), ta, tb, g.m, g.n, g.k, &one, g.A, t, g.lda, g.B, t, g.ldb,
                                         &beta, g.C, tc, g.ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
        return;
    }
    // grouped: G groups of one problem each; sizes and scalars on the host, pointers on the device
    std::vector<cublasOperation_t> tas(G, ta), tbs(G, tb);
    std::vector<int> ms(G), ns(G), ks(G), ldas(G), ldbs(G), ldcs(G), sizes(G, 1);
    std::vector<float> alphas(G, 1.0f), betas(G, beta);
    std::vector<void*> ptrs(3 * G);
    for (int i = 0; i < G; i++) {
        ms[i] = d[i].m; ns[i] = d[i].n; ks[i] = d[i].k;
        ldas[i] = d[i].lda; ldbs[i] = d[i].ldb; ldcs[i] = d[i].ldc;
        ptrs[i] = (void*)d[i].A; ptrs[G + i] = (void*)d[i].B; ptrs[2 * G + i] = d[i].C;
    }
    if (3 * G > gg_ptrs_n) {
        if (gg_ptrs) cudaCheck(cudaFree(gg_ptrs));
        cudaCheck(cudaMalloc(&gg_ptrs, 3 * G * sizeof(void*)));
        gg_ptrs_n = 3 * G;
    }
    cudaCheck(cudaMemcpy(gg_ptrs, ptrs.data(), 3 * G * sizeof(void*), cudaMemcpyHostToDevice));
    cublasStatus_t st = cublasGemmGroupedBatchedEx(lab_cublas(), tas.data(), tbs.data(), ms.data(), ns.data(), ks.data(),
                                                   alphas.data(), (const void* const*)gg_ptrs, t, ldas.data(),
                                                   (const void* const*)(gg_ptrs + G), t, ldbs.data(), betas.data(),
                                                   gg_ptrs + 2 * G, t, ldcs.data(), G, sizes.data(), CUBLAS_COMPUTE_32F);
    if (st != CUBLAS_STATUS_SUCCESS) { // not fatal: the version then fails validation and the others still run
        static int said = 0;
        if (!said++) fprintf(stderr, "cublasGemmGroupedBatchedEx (%s): %s\n", is_bf16(v) ? "bf16" : "fp32", cublasGetStatusString(st));
    }
}

// Y[r,:OC] = X[r,:IC] . W[e]^T   ->  column-major: Y^T (OC x rows) = W^T-view^T . X^T-view
void gg_forward_cublas(int v, void* Y, const void* X, const void* W, const GGPlan& p, int IC, int OC) {
    size_t es = elem_size(v);
    std::vector<GemmDesc> d;
    for (int e = 0; e < p.E; e++) {
        int r0 = p.offs_host[e], n = p.offs_host[e + 1] - r0;
        if (n == 0) continue;
        d.push_back({OC, n, IC, (const char*)W + (size_t)e * OC * IC * es, IC, (const char*)X + (size_t)r0 * IC * es, IC,
                     (char*)Y + (size_t)r0 * OC * es, OC});
    }
    gg_cublas(v, CUBLAS_OP_T, CUBLAS_OP_N, d, 0.0f, 0);
}
// dX[r,:IC] (=/+=) dY[r,:OC] . W[e]
void gg_backward_dx_cublas(int v, void* dX, const void* dY, const void* W, const GGPlan& p, int IC, int OC, int accumulate) {
    size_t es = elem_size(v);
    std::vector<GemmDesc> d;
    for (int e = 0; e < p.E; e++) {
        int r0 = p.offs_host[e], n = p.offs_host[e + 1] - r0;
        if (n == 0) continue;
        d.push_back({IC, n, OC, (const char*)W + (size_t)e * OC * IC * es, IC, (const char*)dY + (size_t)r0 * OC * es, OC,
                     (char*)dX + (size_t)r0 * IC * es, IC});
    }
    gg_cublas(v, CUBLAS_OP_N, CUBLAS_OP_N, d, accumulate ? 1.0f : 0.0f, 0);
}
// dW[e] (fp32) += dY[rows]^T . X[rows]
void gg_backward_dw_cublas(int v, float* dW, const void* dY, const void* X, const GGPlan& p, int IC, int OC) {
    size_t es = elem_size(v);
    std::vector<GemmDesc> d;
    for (int e = 0; e < p.E; e++) {
        int r0 = p.offs_host[e], n = p.offs_host[e + 1] - r0;
        if (n == 0) continue; // an expert without rows keeps its gradient as it is
        d.push_back({IC, OC, n, (const char*)X + (size_t)r0 * IC * es, IC, (const char*)dY + (size_t)r0 * OC * es, OC,
                     dW + (size_t)e * OC * IC, IC});
    }
    gg_cublas(v, CUBLAS_OP_N, CUBLAS_OP_T, d, 1.0f, 1);
}

// ----------------------------------------------------------------------------
// shared by the hand-written versions: which rows a block of a row-tiled grid owns

#define GG_TILE 64 // rows and columns of an output tile (versions 3 and 6)

// Row tiles are numbered expert by expert: expert e has ceil(count_e / GG_TILE) of them. Tile t
// belongs to expert *e and covers rows [*r0, min(*r0 + GG_TILE, *r1)). false: t is past the last
// tile (the grid is sized for the worst case, ceil(NK / GG_TILE) + E tiles).
__device__ bool gg_row_tile(const int* offs, int E, int t, int* e, int* r0, int* r1) {
    for (int i = 0; i < E; i++) {
        int lo = offs[i], hi = offs[i + 1];
        int nt = (hi - lo + GG_TILE - 1) / GG_TILE;
        if (t < nt) { *e = i; *r0 = lo + t * GG_TILE; *r1 = hi; return true; }
        t -= nt;
    }
    return false;
}

// ----------------------------------------------------------------------------
// version 3: fp32 tiles in shared memory, 256 threads, each owning a 4x4 block of the 64x64 tile

#define G3_BK 16
#define G3_PAD 4 // keeps rows 16-byte aligned, spreads the transposed stores over banks

// acc[i][j] += sum_kk As[kk][ty*4+i] * Bs[kk][tx*4+j]
__device__ __forceinline__ void g3_mma(const float (*As)[GG_TILE + G3_PAD], const float (*Bs)[GG_TILE + G3_PAD],
                                       float (*acc)[4], int ty, int tx) {
    #pragma unroll
    for (int kk = 0; kk < G3_BK; kk++) {
        float4 a = *(const float4*)&As[kk][ty * 4];
        float4 b = *(const float4*)&Bs[kk][tx * 4];
        float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
        #pragma unroll
        for (int i = 0; i < 4; i++)
            #pragma unroll
            for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
    }
}

// Y[r, n0:n0+64] for the 64 rows of one row tile; X rows through gather (if given)
__global__ void __launch_bounds__(256) gg_forward_kernel3(float* Y, const float* X, const float* W, const int* offs,
                                                          const int* gather, int E, int IC, int OC) {
    __shared__ __align__(16) float As[G3_BK][GG_TILE + G3_PAD]; // As[k][row]
    __shared__ __align__(16) float Bs[G3_BK][GG_TILE + G3_PAD]; // Bs[k][col]
    int e, r0, r1;
    if (!gg_row_tile(offs, E, blockIdx.y, &e, &r0, &r1)) return;
    int n0 = blockIdx.x * GG_TILE;
    int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    int lr = tid / 4, lk = (tid % 4) * 4; // this thread loads row lr, k lk..lk+3 of both tiles
    int r = r0 + lr;
    const float* xrow = r < r1 ? X + (size_t)(gather ? gather[r] : r) * IC : NULL; // seek to X[row of r]
    const float* wrow = W + ((size_t)e * OC + n0 + lr) * IC;                    // seek to W[e][n0+lr]
    float acc[4][4] = {};
    for (int k0 = 0; k0 < IC; k0 += G3_BK) {
        float4 a = xrow ? *(const float4*)(xrow + k0 + lk) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        float4 b = *(const float4*)(wrow + k0 + lk);
        As[lk][lr] = a.x; As[lk + 1][lr] = a.y; As[lk + 2][lr] = a.z; As[lk + 3][lr] = a.w;
        Bs[lk][lr] = b.x; Bs[lk + 1][lr] = b.y; Bs[lk + 2][lr] = b.z; Bs[lk + 3][lr] = b.w;
        __syncthreads();
        g3_mma(As, Bs, acc, ty, tx);
        __syncthreads();
    }
    for (int i = 0; i < 4; i++) {
        int rr = r0 + ty * 4 + i;
        if (rr < r1) *(float4*)(Y + (size_t)rr * OC + n0 + tx * 4) = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
    }
}

// dX[r, c0:c0+64] (=/+=) sum_n dY[r, n] W[e][n, c]
__global__ void __launch_bounds__(256) gg_backward_dx_kernel3(float* dX, const float* dY, const float* W, const int* offs,
                                                              int E, int IC, int OC, int accumulate) {
    __shared__ __align__(16) float As[G3_BK][GG_TILE + G3_PAD]; // As[n][row]
    __shared__ __align__(16) float Bs[G3_BK][GG_TILE + G3_PAD]; // Bs[n][col]
    int e, r0, r1;
    if (!gg_row_tile(offs, E, blockIdx.y, &e, &r0, &r1)) return;
    int c0 = blockIdx.x * GG_TILE;
    int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    int lr = tid / 4, lk = (tid % 4) * 4;     // A: row lr, n lk..lk+3
    int bn = tid / 16, bc = (tid % 16) * 4;   // B: n bn, columns bc..bc+3
    int r = r0 + lr;
    const float* dyrow = r < r1 ? dY + (size_t)r * OC : NULL;
    const float* We = W + (size_t)e * OC * IC;
    float acc[4][4] = {};
    for (int n0 = 0; n0 < OC; n0 += G3_BK) {
        float4 a = dyrow ? *(const float4*)(dyrow + n0 + lk) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        As[lk][lr] = a.x; As[lk + 1][lr] = a.y; As[lk + 2][lr] = a.z; As[lk + 3][lr] = a.w;
        *(float4*)&Bs[bn][bc] = *(const float4*)(We + (size_t)(n0 + bn) * IC + c0 + bc);
        __syncthreads();
        g3_mma(As, Bs, acc, ty, tx);
        __syncthreads();
    }
    for (int i = 0; i < 4; i++) {
        int rr = r0 + ty * 4 + i;
        if (rr >= r1) continue;
        float4* o = (float4*)(dX + (size_t)rr * IC + c0 + tx * 4);
        float4 v = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        if (accumulate) { float4 old = *o; v.x += old.x; v.y += old.y; v.z += old.z; v.w += old.w; }
        *o = v;
    }
}

// dW[e][m0:m0+64, c0:c0+64] += sum over the expert's rows r of dY[r, n] X[row of r, c]
// grid (IC/64, OC/64, E): one block per output tile, looping over all of its expert's rows
// (no atomics: the result does not depend on scheduling)
__global__ void __launch_bounds__(256) gg_backward_dw_kernel3(float* dW, const float* dY, const float* X, const int* offs,
                                                              const int* gather, int IC, int OC) {
    __shared__ __align__(16) float As[G3_BK][GG_TILE + G3_PAD]; // As[r][n]
    __shared__ __align__(16) float Bs[G3_BK][GG_TILE + G3_PAD]; // Bs[r][c]
    int e = blockIdx.z;
    int rb = offs[e], re = offs[e + 1];
    if (rb == re) return; // no rows: the gradient is unchanged
    int m0 = blockIdx.y * GG_TILE, c0 = blockIdx.x * GG_TILE;
    int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    int lr = tid / 16, lc = (tid % 16) * 4; // both tiles: row (an expert row) lr, columns lc..lc+3
    float acc[4][4] = {};
    for (int k0 = rb; k0 < re; k0 += G3_BK) {
        int r = k0 + lr;
        float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f), b = a;
        if (r < re) {
            a = *(const float4*)(dY + (size_t)r * OC + m0 + lc);
            b = *(const float4*)(X + (size_t)(gather ? gather[r] : r) * IC + c0 + lc);
        }
        *(float4*)&As[lr][lc] = a;
        *(float4*)&Bs[lr][lc] = b;
        __syncthreads();
        g3_mma(As, Bs, acc, ty, tx);
        __syncthreads();
    }
    float* We = dW + (size_t)e * OC * IC;
    for (int i = 0; i < 4; i++) {
        float4* o = (float4*)(We + (size_t)(m0 + ty * 4 + i) * IC + c0 + tx * 4);
        float4 v = *o;
        v.x += acc[i][0]; v.y += acc[i][1]; v.z += acc[i][2]; v.w += acc[i][3];
        *o = v;
    }
}

// ----------------------------------------------------------------------------
// version 6: bf16 tensor cores through WMMA. 128 threads = 4 warps in a 2x2 grid, each warp a
// 32x32 piece of the 64x64 tile = 2x2 fragments of 16x16; k-slices of 32 staged in shared memory.
// The fp32 accumulators go through shared memory on the way out (bf16 rows of 8 per store).

using namespace nvcuda;

#define G6_BK 32
#define G6_SK (G6_BK + 8)   // row stride (elements) of k-contiguous tiles
#define G6_SN (GG_TILE + 8) // row stride of n- or c-contiguous tiles
#define G6_SC (GG_TILE + 4) // row stride of the fp32 output staging tile

union G6Pack { uint4 u; bf16 h[8]; };

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> G6Acc;

// the warp's 2x2 accumulators -> Cs (fp32, row-major [64][G6_SC])
__device__ __forceinline__ void g6_stage(float (*Cs)[G6_SC], G6Acc (*acc)[2], int wm, int wn) {
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            wmma::store_matrix_sync(&Cs[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], G6_SC, wmma::mem_row_major);
}

__global__ void __launch_bounds__(128) gg_forward_kernel6(bf16* Y, const bf16* X, const bf16* W, const int* offs,
                                                          const int* gather, int E, int IC, int OC) {
    __shared__ __align__(32) bf16 As[GG_TILE][G6_SK]; // As[row][k]
    __shared__ __align__(32) bf16 Bs[GG_TILE][G6_SK]; // Bs[n][k]
    __shared__ __align__(32) float Cs[GG_TILE][G6_SC];
    int e, r0, r1;
    if (!gg_row_tile(offs, E, blockIdx.y, &e, &r0, &r1)) return;
    int n0 = blockIdx.x * GG_TILE;
    int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;
    G6Acc acc[2][2];
    for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);
    const bf16* We = W + (size_t)e * OC * IC;
    for (int k0 = 0; k0 < IC; k0 += G6_BK) {
        for (int i = tid; i < GG_TILE * G6_BK / 8; i += blockDim.x) { // 8 bf16 per 128-bit load
            int row = i / (G6_BK / 8), c8 = (i % (G6_BK / 8)) * 8;
            int r = r0 + row;
            uint4 a = make_uint4(0, 0, 0, 0);
            if (r < r1) a = *(const uint4*)(X + (size_t)(gather ? gather[r] : r) * IC + k0 + c8);
            *(uint4*)&As[row][c8] = a;
            *(uint4*)&Bs[row][c8] = *(const uint4*)(We + (size_t)(n0 + row) * IC + k0 + c8);
        }
        __syncthreads();
        for (int kk = 0; kk < G6_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b[2]; // B(k,n) = Bs[n][k]
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(a[i], &As[wm * 32 + i * 16][kk], G6_SK);
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(b[j], &Bs[wn * 32 + j * 16][kk], G6_SK);
            for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    g6_stage(Cs, acc, wm, wn);
    __syncthreads();
    for (int i = tid; i < GG_TILE * GG_TILE / 8; i += blockDim.x) {
        int row = i / (GG_TILE / 8), c8 = (i % (GG_TILE / 8)) * 8;
        if (r0 + row >= r1) continue;
        G6Pack o;
        for (int k = 0; k < 8; k++) o.h[k] = __float2bfloat16(Cs[row][c8 + k]);
        *(uint4*)(Y + (size_t)(r0 + row) * OC + n0 + c8) = o.u;
    }
}

__global__ void __launch_bounds__(128) gg_backward_dx_kernel6(bf16* dX, const bf16* dY, const bf16* W, const int* offs,
                                                              int E, int IC, int OC, int accumulate) {
    __shared__ __align__(32) bf16 As[GG_TILE][G6_SK]; // As[row][n]
    __shared__ __align__(32) bf16 Bs[G6_BK][G6_SN];   // Bs[n][c]
    __shared__ __align__(32) float Cs[GG_TILE][G6_SC];
    int e, r0, r1;
    if (!gg_row_tile(offs, E, blockIdx.y, &e, &r0, &r1)) return;
    int c0 = blockIdx.x * GG_TILE;
    int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;
    G6Acc acc[2][2];
    for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);
    const bf16* We = W + (size_t)e * OC * IC;
    for (int n0 = 0; n0 < OC; n0 += G6_BK) {
        for (int i = tid; i < GG_TILE * G6_BK / 8; i += blockDim.x) {
            int row = i / (G6_BK / 8), c8 = (i % (G6_BK / 8)) * 8; // A: 64 rows x 32 n
            int r = r0 + row;
            uint4 a = make_uint4(0, 0, 0, 0);
            if (r < r1) a = *(const uint4*)(dY + (size_t)r * OC + n0 + c8);
            *(uint4*)&As[row][c8] = a;
            int bn = i / (GG_TILE / 8), bc = (i % (GG_TILE / 8)) * 8; // B: 32 n x 64 columns
            *(uint4*)&Bs[bn][bc] = *(const uint4*)(We + (size_t)(n0 + bn) * IC + c0 + bc);
        }
        __syncthreads();
        for (int kk = 0; kk < G6_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b[2];
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(a[i], &As[wm * 32 + i * 16][kk], G6_SK);
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(b[j], &Bs[kk][wn * 32 + j * 16], G6_SN);
            for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    g6_stage(Cs, acc, wm, wn);
    __syncthreads();
    for (int i = tid; i < GG_TILE * GG_TILE / 8; i += blockDim.x) {
        int row = i / (GG_TILE / 8), c8 = (i % (GG_TILE / 8)) * 8;
        if (r0 + row >= r1) continue;
        uint4* dst = (uint4*)(dX + (size_t)(r0 + row) * IC + c0 + c8);
        G6Pack old, o;
        if (accumulate) old.u = *dst;
        for (int k = 0; k < 8; k++) o.h[k] = __float2bfloat16(Cs[row][c8 + k] + (accumulate ? __bfloat162float(old.h[k]) : 0.0f));
        *dst = o.u;
    }
}

__global__ void __launch_bounds__(128) gg_backward_dw_kernel6(float* dW, const bf16* dY, const bf16* X, const int* offs,
                                                              const int* gather, int IC, int OC) {
    __shared__ __align__(32) bf16 As[G6_BK][G6_SN]; // As[r][n]: A(n, r) column-major
    __shared__ __align__(32) bf16 Bs[G6_BK][G6_SN]; // Bs[r][c]
    __shared__ __align__(32) float Cs[GG_TILE][G6_SC];
    int e = blockIdx.z;
    int rb = offs[e], re = offs[e + 1];
    if (rb == re) return;
    int m0 = blockIdx.y * GG_TILE, c0 = blockIdx.x * GG_TILE;
    int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;
    G6Acc acc[2][2];
    for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int k0 = rb; k0 < re; k0 += G6_BK) {
        for (int i = tid; i < G6_BK * GG_TILE / 8; i += blockDim.x) {
            int row = i / (GG_TILE / 8), c8 = (i % (GG_TILE / 8)) * 8;
            int r = k0 + row;
            uint4 a = make_uint4(0, 0, 0, 0), b = a;
            if (r < re) {
                a = *(const uint4*)(dY + (size_t)r * OC + m0 + c8);
                b = *(const uint4*)(X + (size_t)(gather ? gather[r] : r) * IC + c0 + c8);
            }
            *(uint4*)&As[row][c8] = a;
            *(uint4*)&Bs[row][c8] = b;
        }
        __syncthreads();
        for (int kk = 0; kk < G6_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b[2];
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(a[i], &As[kk][wm * 32 + i * 16], G6_SN);
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(b[j], &Bs[kk][wn * 32 + j * 16], G6_SN);
            for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    g6_stage(Cs, acc, wm, wn);
    __syncthreads();
    float* We = dW + (size_t)e * OC * IC; // fp32: the tile's fp32 sums are added, never rounded to bf16
    for (int i = tid; i < GG_TILE * GG_TILE / 4; i += blockDim.x) {
        int row = i / (GG_TILE / 4), c4 = (i % (GG_TILE / 4)) * 4;
        float4* dst = (float4*)(We + (size_t)(m0 + row) * IC + c0 + c4);
        float4 o = *dst;
        o.x += Cs[row][c4]; o.y += Cs[row][c4 + 1]; o.z += Cs[row][c4 + 2]; o.w += Cs[row][c4 + 3];
        *dst = o;
    }
}

// ----------------------------------------------------------------------------
// dispatchers of the three GEMM kinds

static void check_dims(int v, int IC, int OC) {
    if (reads_permutation(v) && (IC % GG_TILE || OC % GG_TILE)) {
        fprintf(stderr, "grouped_gemm v%d: IC and OC must be multiples of %d (got %d, %d)\n", v, GG_TILE, IC, OC);
        exit(EXIT_FAILURE);
    }
}
static dim3 row_tiled_grid(const GGPlan& p, int cols) { return dim3(cols / GG_TILE, ceil_div(p.NK, GG_TILE) + p.E); }

void gg_forward(int v, void* Y, const void* X, const void* W, const GGPlan& p, int IC, int OC) {
    check_dims(v, IC, OC);
    if (v == 3) gg_forward_kernel3<<<row_tiled_grid(p, OC), 256>>>((float*)Y, (const float*)X, (const float*)W, p.offs, p.gather, p.E, IC, OC);
    else if (v == 6) gg_forward_kernel6<<<row_tiled_grid(p, OC), 128>>>((bf16*)Y, (const bf16*)X, (const bf16*)W, p.offs, p.gather, p.E, IC, OC);
    else gg_forward_cublas(v, Y, X, W, p, IC, OC);
    cudaCheckLast();
}
void gg_backward_dx(int v, void* dX, const void* dY, const void* W, const GGPlan& p, int IC, int OC, int accumulate) {
    check_dims(v, IC, OC);
    if (v == 3) gg_backward_dx_kernel3<<<row_tiled_grid(p, IC), 256>>>((float*)dX, (const float*)dY, (const float*)W, p.offs, p.E, IC, OC, accumulate);
    else if (v == 6) gg_backward_dx_kernel6<<<row_tiled_grid(p, IC), 128>>>((bf16*)dX, (const bf16*)dY, (const bf16*)W, p.offs, p.E, IC, OC, accumulate);
    else gg_backward_dx_cublas(v, dX, dY, W, p, IC, OC, accumulate);
    cudaCheckLast();
}
void gg_backward_dw(int v, float* dW, const void* dY, const void* X, const GGPlan& p, int IC, int OC) {
    check_dims(v, IC, OC);
    dim3 grid(IC / GG_TILE, OC / GG_TILE, p.E);
    if (v == 3) gg_backward_dw_kernel3<<<grid, 256>>>(dW, (const float*)dY, (const float*)X, p.offs, p.gather, IC, OC);
    else if (v == 6) gg_backward_dw_kernel6<<<grid, 128>>>(dW, (const bf16*)dY, (const bf16*)X, p.offs, p.gather, IC, OC);
    else gg_backward_dw_cublas(v, dW, dY, X, p, IC, OC);
    cudaCheckLast();
}

// ----------------------------------------------------------------------------
// the rest of an expert layer, plainly (swiglu.cu and permute.cu hold the tuned versions)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void from_f(float* p, float x) { *p = x; }
__device__ __forceinline__ void from_f(bf16* p, float x) { *p = __float2bfloat16(x); }

template<class T>
__global__ void gather_rows_kernel(T* xe, const T* m, const int* tok_of, int NK, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)NK * C) xe[i] = m[(size_t)tok_of[i / C] * C + i % C];
}
template<class T>
__global__ void swiglu_forward_kernel(T* act, const T* h1, const T* h3, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = to_f(h1[i]);
    from_f(&act[i], g / (1.0f + expf(-g)) * to_f(h3[i]));
}
template<class T>
__global__ void swiglu_backward_kernel(T* dh1, T* dh3, const T* dact, const T* h1, const T* h3, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = to_f(h1[i]), u = to_f(h3[i]), da = to_f(dact[i]);
    float sg = 1.0f / (1.0f + expf(-g));
    from_f(&dh3[i], da * (g * sg));
    from_f(&dh1[i], da * u * sg * (1.0f + g * (1.0f - sg)));
}

// device buffers of one expert layer; element type fp32 or bf16 by version
struct ExpertBufs {
    int N, NK, E, C, F;
    void *m, *xe, *w1, *w3, *w2, *h1, *h3, *act, *ye;    // forward
    void *dye, *dact, *dh1, *dh3, *dxe;                   // backward
    float *dw1, *dw3, *dw2;                               // fp32 in every version
    GGPlan plan;                                          // gather = NULL
    const int* tok_of;
};

void experts_forward_gpu(int v, const ExpertBufs* b) {
    size_t nf = (size_t)b->NK * b->F;
    GGPlan p = b->plan;
    const void* xin = b->xe;
    if (reads_permutation(v)) { xin = b->m; p.gather = b->tok_of; }
    else if (is_bf16(v)) gather_rows_kernel<<<ceil_div((long long)b->NK * b->C, 256), 256>>>((bf16*)b->xe, (const bf16*)b->m, b->tok_of, b->NK, b->C);
    else gather_rows_kernel<<<ceil_div((long long)b->NK * b->C, 256), 256>>>((float*)b->xe, (const float*)b->m, b->tok_of, b->NK, b->C);
    cudaCheckLast();
    gg_forward(v, b->h1, xin, b->w1, p, b->C, b->F);
    gg_forward(v, b->h3, xin, b->w3, p, b->C, b->F);
    if (is_bf16(v)) swiglu_forward_kernel<<<ceil_div(nf, 256), 256>>>((bf16*)b->act, (const bf16*)b->h1, (const bf16*)b->h3, nf);
    else swiglu_forward_kernel<<<ceil_div(nf, 256), 256>>>((float*)b->act, (const float*)b->h1, (const float*)b->h3, nf);
    cudaCheckLast();
    gg_forward(v, b->ye, b->act, b->w2, b->plan, b->F, b->C);
}

void experts_backward_gpu(int v, const ExpertBufs* b) {
    size_t nf = (size_t)b->NK * b->F;
    GGPlan p = b->plan;
    const void* xin = b->xe; // saved by the forward
    if (reads_permutation(v)) { xin = b->m; p.gather = b->tok_of; }
    gg_backward_dx(v, b->dact, b->dye, b->w2, b->plan, b->F, b->C, 0);
    gg_backward_dw(v, b->dw2, b->dye, b->act, b->plan, b->F, b->C);
    if (is_bf16(v)) swiglu_backward_kernel<<<ceil_div(nf, 256), 256>>>((bf16*)b->dh1, (bf16*)b->dh3, (const bf16*)b->dact, (const bf16*)b->h1, (const bf16*)b->h3, nf);
    else swiglu_backward_kernel<<<ceil_div(nf, 256), 256>>>((float*)b->dh1, (float*)b->dh3, (const float*)b->dact, (const float*)b->h1, (const float*)b->h3, nf);
    cudaCheckLast();
    gg_backward_dx(v, b->dxe, b->dh1, b->w1, b->plan, b->C, b->F, 0);
    gg_backward_dx(v, b->dxe, b->dh3, b->w3, b->plan, b->C, b->F, 1);
    gg_backward_dw(v, b->dw1, b->dh1, xin, p, b->C, b->F);
    gg_backward_dw(v, b->dw3, b->dh3, xin, p, b->C, b->F);
}

// ----------------------------------------------------------------------------
// test problems

// one routed batch: its plan (host) and its inputs (host, values exactly representable in bf16)
struct Batch {
    int N, NK;
    int *counts, *offs, *row_of, *tok_of;
    float *m, *dye;
};
Batch make_batch(int N, int C, int E, int K, int skew) {
    Batch bt;
    bt.N = N; bt.NK = N * K;
    float* z = make_router_logits(N, E, K, skew);
    int* topi = (int*)mallocCheck((size_t)bt.NK * sizeof(int));
    float* gate = (float*)mallocCheck((size_t)bt.NK * sizeof(float));
    topk_forward(topi, gate, z, N, E, K);
    bt.counts = (int*)mallocCheck(E * sizeof(int));
    bt.offs = (int*)mallocCheck((E + 1) * sizeof(int));
    bt.row_of = (int*)mallocCheck((size_t)bt.NK * sizeof(int));
    bt.tok_of = (int*)mallocCheck((size_t)bt.NK * sizeof(int));
    permute_plan(bt.counts, bt.offs, bt.row_of, bt.tok_of, topi, N, E, K);
    bt.m = make_random_float((size_t)N * C);
    bt.dye = make_random_float((size_t)bt.NK * C);
    round_to_bf16(bt.m, (size_t)N * C);
    round_to_bf16(bt.dye, (size_t)bt.NK * C);
    free(z); free(topi); free(gate);
    return bt;
}
void free_batch(Batch* bt) {
    free(bt->counts); free(bt->offs); free(bt->row_of); free(bt->tok_of); free(bt->m); free(bt->dye);
}

void* upload(int v, const float* x, size_t n) {
    return is_bf16(v) ? (void*)cuda_malloc_copy_bf16(x, n) : (void*)cuda_malloc_copy(x, n);
}
void* alloc_zero(int v, size_t n) {
    void* p;
    cudaCheck(cudaMalloc(&p, (n ? n : 1) * elem_size(v)));
    cudaCheck(cudaMemset(p, 0, (n ? n : 1) * elem_size(v)));
    return p;
}
// device buffers for one batch; the weights are shared (w1, w3, w2, dw1, dw3, dw2 given)
ExpertBufs make_bufs(int v, const Batch& bt, int E, int C, int F, void* w[3], float* dw[3], int** d_plan) {
    ExpertBufs b;
    b.N = bt.N; b.NK = bt.NK; b.E = E; b.C = C; b.F = F;
    size_t nc = (size_t)bt.NK * C, nf = (size_t)bt.NK * F;
    b.m = upload(v, bt.m, (size_t)bt.N * C);
    b.dye = upload(v, bt.dye, nc);
    b.xe = alloc_zero(v, nc); b.ye = alloc_zero(v, nc); b.dxe = alloc_zero(v, nc);
    b.h1 = alloc_zero(v, nf); b.h3 = alloc_zero(v, nf); b.act = alloc_zero(v, nf);
    b.dact = alloc_zero(v, nf); b.dh1 = alloc_zero(v, nf); b.dh3 = alloc_zero(v, nf);
    b.w1 = w[0]; b.w3 = w[1]; b.w2 = w[2]; b.dw1 = dw[0]; b.dw3 = dw[1]; b.dw2 = dw[2];
    int* d_offs = cuda_malloc_copy(bt.offs, E + 1);
    int* d_tok = cuda_malloc_copy(bt.tok_of, bt.NK);
    d_plan[0] = d_offs; d_plan[1] = d_tok;
    b.plan = {E, bt.NK, bt.offs, d_offs, NULL};
    b.tok_of = d_tok;
    return b;
}
void free_bufs(ExpertBufs* b, int** d_plan) {
    void* p[] = {b->m, b->dye, b->xe, b->ye, b->dxe, b->h1, b->h3, b->act, b->dact, b->dh1, b->dh3};
    for (void* q : p) cudaCheck(cudaFree(q));
    cudaCheck(cudaFree(d_plan[0])); cudaCheck(cudaFree(d_plan[1]));
}

int check(int v, const void* d, const float* ref, const char* name, size_t n) {
    double mx = lab_max_abs(ref, n);
    if (is_bf16(v)) return validate_result_tol((const bf16*)d, ref, name, n, 1e-2 * mx, 2e-2);
    return validate_result_tol((const float*)d, ref, name, n, 1e-4 * mx, 1e-4);
}
// a weight gradient (fp32 in every version) against the CPU's, with the version's tolerance
int check_dw(int v, const float* d, const float* ref, const char* name, size_t n) {
    double mx = lab_max_abs(ref, n);
    return validate_result_tol(d, ref, name, n, (is_bf16(v) ? 1e-2 : 1e-4) * mx, is_bf16(v) ? 2e-2 : 1e-4);
}

// device bf16[n] -> host float[n]
std::vector<float> download_bf16(const void* d, size_t n) {
    std::vector<bf16> h(n ? n : 1);
    cuda_to_host(h.data(), (const bf16*)d, n);
    std::vector<float> f(n ? n : 1);
    for (size_t i = 0; i < n; i++) f[i] = __bfloat162float(h[i]);
    return f;
}
// a bf16 version's dW[E][OC][IC] (fp32, += from zero once) at `samples` entries of experts with rows,
// against the sum in double over the expert's rows r of dY[r][o] * X[row of r][i], from the values the
// GEMM read: dY[NK][OC] and X (rows gather[r] of it, or r when gather is NULL). Passes when the relative
// RMS error over the entries is <= 1e-4: fp32 accumulation gives ~1e-6, a gradient rounded to bf16 on
// its way ~1e-3 (8 significant bits).
int check_dw_sums(const float* d_dw, const float* dY, const float* X, const int* gather, const int* offs, int E, int IC,
                  int OC, const char* name, int samples) {
    std::vector<float> dw((size_t)E * OC * IC);
    cuda_to_host(dw.data(), d_dw, dw.size());
    double err2 = 0.0, ref2 = 0.0;
    int tried = 0, finite = 1;
    for (int s = 0; tried < samples && s < 64 * samples; s++) {
        uint64_t h = hash3(0x6D57, (uint64_t)s, (uint64_t)E * OC * IC);
        int e = (int)(h % E), o = (int)((h >> 20) % OC), i = (int)((h >> 40) % IC);
        if (offs[e + 1] == offs[e]) continue; // no rows: dW[e] stays zero (the CPU comparison checks it)
        tried++;
        double sum = 0.0;
        for (int r = offs[e]; r < offs[e + 1]; r++) sum += (double)dY[(size_t)r * OC + o] * X[(size_t)(gather ? gather[r] : r) * IC + i];
        double got = dw[((size_t)e * OC + o) * IC + i];
        finite &= isfinite(got) != 0;
        err2 += (got - sum) * (got - sum);
        ref2 += sum * sum;
    }
    double rel = sqrt(err2 / (ref2 > 0 ? ref2 : 1.0));
    int pass = finite && rel <= 1e-4;
    printf("  %-14s %d entries vs sums in double of the bf16 operands: relative RMS error %.3e (<= 1e-4)  %s\n", name,
           tried, rel, pass ? "OK" : "FAIL");
    if (!pass) lab_failures++;
    return pass;
}

int main(int argc, char** argv) {
    lab_seed(42);
    lab_device_init();
    int want = lab_version_arg(argc, argv);
    struct { int C, E, K, skew; } cases[] = {
        {512, 16, 2, 0}, {1024, 8, 2, 0}, {1024, 32, 8, 0}, {1024, 32, 8, 1}, {512, 128, 8, 0}};
    const int N = 8192, NV = 512; // benchmark and validation tokens
    for (const auto& cs : cases) {
        int C = cs.C, E = cs.E, K = cs.K, F = 2 * C;
        char name[64];
        snprintf(name, sizeof(name), "N%d_C%d_F%d_E%d_K%d_%s", N, C, F, E, K, cs.skew ? "skew" : "bal");
        printf("\n== grouped_gemm %s\n", name);
        // weights ~ U(-a, a) with a = 0.02 * sqrt(3) (std 0.02), rounded to bf16
        size_t nw = (size_t)E * F * C;
        float* w[3];
        for (int i = 0; i < 3; i++) {
            w[i] = make_random_float(nw);
            for (size_t j = 0; j < nw; j++) w[i][j] *= 0.0346f;
            round_to_bf16(w[i], nw);
        }
        // validation batch and its CPU reference
        Batch vb = make_batch(NV, C, E, K, cs.skew);
        Batch bb = make_batch(N, C, E, K, cs.skew);
        printf("validation batch (%d tokens) ", NV); lab_print_load(vb.counts, E);
        printf("benchmark batch (%d tokens) ", N); lab_print_load(bb.counts, E);
        size_t nc = (size_t)vb.NK * C, nf = (size_t)vb.NK * F;
        float* xe = (float*)mallocCheck(nc * sizeof(float));
        float* ye = (float*)mallocCheck(nc * sizeof(float));
        float* dxe = (float*)mallocCheck(nc * sizeof(float));
        float* h1 = (float*)mallocCheck(nf * sizeof(float));
        float* h3 = (float*)mallocCheck(nf * sizeof(float));
        float* act = (float*)mallocCheck(nf * sizeof(float));
        float* dact = (float*)mallocCheck(nf * sizeof(float));
        float* dh1 = (float*)mallocCheck(nf * sizeof(float));
        float* dh3 = (float*)mallocCheck(nf * sizeof(float));
        float* dw[3];
        for (int i = 0; i < 3; i++) dw[i] = (float*)callocCheck(nw, sizeof(float));
        double t0 = now_ms();
        permute_forward(xe, vb.m, vb.tok_of, vb.NK, C);
        experts_forward(ye, h1, h3, act, xe, w[0], w[1], w[2], vb.offs, E, C, F);
        experts_backward(dxe, dw[0], dw[1], dw[2], dact, dh1, dh3, vb.dye, xe, h1, h3, act, w[0], w[1], w[2], vb.offs, E, C, F);
        printf("CPU reference: %.1f s\n", (now_ms() - t0) / 1000.0);

        for (int v = 1; v <= NUM_VERSIONS; v++) {
            if (want && v != want) continue;
            printf("version %d\n", v);
            void* d_w[3];
            float* d_dw[3];
            for (int i = 0; i < 3; i++) { d_w[i] = upload(v, w[i], nw); d_dw[i] = cuda_calloc<float>(nw); }
            int* d_plan[2];
            // validation
            ExpertBufs b = make_bufs(v, vb, E, C, F, d_w, d_dw, d_plan);
            experts_forward_gpu(v, &b);
            experts_backward_gpu(v, &b);
            cudaCheck(cudaDeviceSynchronize());
            int ok = check(v, b.h1, h1, "h1", nf);
            ok &= check(v, b.h3, h3, "h3", nf);
            ok &= check(v, b.act, act, "act", nf);
            ok &= check(v, b.ye, ye, "ye", nc);
            ok &= check(v, b.dact, dact, "dact", nf);
            ok &= check(v, b.dh1, dh1, "dh1", nf);
            ok &= check(v, b.dh3, dh3, "dh3", nf);
            ok &= check(v, b.dxe, dxe, "dxe", nc);
            ok &= check_dw(v, b.dw1, dw[0], "dw1", nw);
            ok &= check_dw(v, b.dw3, dw[1], "dw3", nw);
            ok &= check_dw(v, b.dw2, dw[2], "dw2", nw);
            if (is_bf16(v)) { // the fp32 accumulation itself, on the version's own bf16 dh1, dh3 and act
                std::vector<float> gdh1 = download_bf16(b.dh1, nf), gdh3 = download_bf16(b.dh3, nf), gact = download_bf16(b.act, nf);
                ok &= check_dw_sums(b.dw1, gdh1.data(), vb.m, vb.tok_of, vb.offs, E, C, F, "dw1 (fp32 sum)", 4096);
                ok &= check_dw_sums(b.dw3, gdh3.data(), vb.m, vb.tok_of, vb.offs, E, C, F, "dw3 (fp32 sum)", 4096);
                ok &= check_dw_sums(b.dw2, vb.dye, gact.data(), NULL, vb.offs, E, F, C, "dw2 (fp32 sum)", 4096);
            }
            free_bufs(&b, d_plan);
            // benchmark
            b = make_bufs(v, bb, E, C, F, d_w, d_dw, d_plan);
            const ExpertBufs* bp = &b;
            double nkcf = (double)bb.NK * C * F;
            LabPeak peak = is_bf16(v) ? PEAK_BF16 : PEAK_FP32;
            char cname[96];
            float t = ok ? benchmark_kernel(10, experts_forward_gpu, v, bp) : 0.0f;
            snprintf(cname, sizeof(cname), "fwd_%s", name);
            print_result("grouped_gemm", v, cname, ok, t, 0, 6.0 * nkcf, peak);
            t = ok ? benchmark_kernel(10, experts_backward_gpu, v, bp) : 0.0f;
            snprintf(cname, sizeof(cname), "bwd_%s", name);
            print_result("grouped_gemm", v, cname, ok, t, 0, 12.0 * nkcf, peak);
            free_bufs(&b, d_plan);
            for (int i = 0; i < 3; i++) { cudaCheck(cudaFree(d_w[i])); cudaCheck(cudaFree(d_dw[i])); }
        }
        free_batch(&vb); free_batch(&bb);
        free(xe); free(ye); free(dxe); free(h1); free(h3); free(act); free(dact); free(dh1); free(dh3);
        for (int i = 0; i < 3; i++) { free(w[i]); free(dw[i]); }
    }
    return lab_exit_code();
}
