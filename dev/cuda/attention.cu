/*
Causal self-attention with grouped-query heads, forward and backward.
    q[B,T,H,D], k,v[B,T,Hkv,D] -> out[B,T,H,D]      query head h reads kv head h / (H/Hkv)
    out = softmax(q.k^T / sqrt(D) + causal mask) . v
The CPU references are train_moe.c's attention_forward / attention_backward.

Build: nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fopenmp -DOMP attention.cu -o attention -lcublas -lcublasLt
Run:   ./attention [version]          (no version: every version)

version 1: naive. Forward: the scores into att[B,H,T,T], a softmax per row, then att.v. Backward: dS[B,H,T,T]
           (one thread per row), then one thread per element of dq, dk, dv. O(T^2) memory: small T only.
version 2: flash-style, fp32 on the CUDA cores. Forward: a block per (b, h, 64 query rows) keeps its Q tile in
           shared memory and streams 64-key tiles of K and V past it with an online softmax; it never stores the
           T x T scores and saves the logsumexp of each row. Backward: Dsum = rowsum(dO * O), then a block per
           (b, kv head, 64 keys) loops over the query heads of its group and the query tiles at or after its keys
           (dK, dV: no atomics, a fixed order), and a block per (b, h, 64 query rows) loops over the key tiles
           for dQ. P is recomputed from q, k and the logsumexp. D in {64, 128}; any T (the last tile is partial:
           rows past the end are loaded as zeros and never stored).
version 3: version 2's tiles and loops on the bf16 tensor cores (WMMA 16x16x16, fp32 accumulation), with bf16
           q, k, v, out, dout, dq, dk, dv (as the trainer's bf16 build keeps them) and fp32 lse. 4 warps per block,
           each owning a 16-row strip; the softmax and dS are computed in fp32 from a shared-memory copy of the
           strip, then rounded to bf16 for the next product. Validated on bf16-rounded inputs, bf16 tolerances.

Every version writes (=) dq, dk and dv: no zeroing needed (the CPU reference adds into zeroed dk, dv).

Validation: every version against the CPU at T <= 512 (D = 128 with and without grouped kv heads, and D = 64),
plus a rerun that must give the same bits; versions 2 and 3 also against version 1 on the GPU at T = 1024.
Tolerances |gpu - cpu| <= atol + rtol |cpu|: versions 1, 2: out, att 1e-4 + 1e-3, dq/dk/dv 5e-4 + 5e-3;
version 3 (bf16): out 1e-2 + 1e-2, dq/dk/dv 2e-2 + 2e-2; lse (fp32 in all) 1e-4 + 1e-4.
Benchmarks: every version at B=8 T=1024 (8192 tokens), versions 2 and 3 also at the paper's T = 4096 (B=2).
LAB_VALIDATE_ONLY=1 in the environment skips the benchmarks (for compute-sanitizer runs).
*/
#pragma GCC diagnostic ignored "-Wunused-function" // train_moe.c's static helpers that this file does not call
#define TESTING
#define MOE_LAYERS_ONLY // the layers, the model and AdamW of train_moe.c: nothing after them
#include "../../train_moe.c"
#include "common.h"
#include <mma.h>

// ----------------------------------------------------------------------------
// version 1: naive, the T x T matrices in global memory

// att[b,h,t,t2] = q[b,t,h,:].k[b,t2,hk,:] * scale for t2 <= t: one thread per entry
__global__ void attn_scores_v1(float* att, const float* q, const float* k, int B, int T, int H, int Hkv, int D,
                               float scale) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * H * T * T) return;
    int t2 = (int)(idx % T), t = (int)((idx / T) % T), h = (int)((idx / ((size_t)T * T)) % H);
    int b = (int)(idx / ((size_t)H * T * T));
    if (t2 > t) { att[idx] = 0.0f; return; } // masked (the softmax below never reads it)
    int hk = h / (H / Hkv);
    const float* qt = q + (((size_t)b * T + t) * H + h) * D;   // seek to q[b,t,h,:]
    const float* kt = k + (((size_t)b * T + t2) * Hkv + hk) * D; // seek to k[b,t2,hk,:]
    float s = 0.0f;
    for (int i = 0; i < D; i++) s += qt[i] * kt[i];
    att[idx] = s * scale;
}

// softmax over t2 <= t of each row att[b,h,t,:], in place: one thread per row
__global__ void attn_softmax_v1(float* att, int B, int H, int T) {
    size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (size_t)B * H * T) return;
    int t = (int)(row % T);
    float* p = att + row * T;
    float maxv = -INFINITY;
    for (int t2 = 0; t2 <= t; t2++) maxv = fmaxf(maxv, p[t2]);
    float sum = 0.0f;
    for (int t2 = 0; t2 <= t; t2++) { p[t2] = expf(p[t2] - maxv); sum += p[t2]; }
    float inv = 1.0f / sum;
    for (int t2 = 0; t2 <= t; t2++) p[t2] *= inv;
}

// out[b,t,h,i] = sum_{t2 <= t} att[b,h,t,t2] v[b,t2,hk,i]: one thread per output element
__global__ void attn_av_v1(float* out, const float* att, const float* v, int B, int T, int H, int Hkv, int D) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * T * H * D) return;
    int i = (int)(idx % D), h = (int)((idx / D) % H), t = (int)((idx / ((size_t)D * H)) % T);
    int b = (int)(idx / ((size_t)D * H * T));
    int hk = h / (H / Hkv);
    const float* p = att + (((size_t)b * H + h) * T + t) * T;
    float acc = 0.0f;
    for (int t2 = 0; t2 <= t; t2++) acc += p[t2] * v[(((size_t)b * T + t2) * Hkv + hk) * D + i];
    out[idx] = acc;
}

// dS[b,h,t,t2] = P (dP - sum_t2 P dP) * scale with dP = dout[b,t,h,:].v[b,t2,hk,:]: one thread per row
__global__ void attn_dscores_v1(float* dS, const float* att, const float* dout, const float* v, int B, int T, int H,
                                int Hkv, int D, float scale) {
    size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (size_t)B * H * T) return;
    int t = (int)(row % T), h = (int)((row / T) % H), b = (int)(row / ((size_t)T * H));
    int hk = h / (H / Hkv);
    const float* p = att + row * T;
    const float* dot = dout + (((size_t)b * T + t) * H + h) * D;
    float* ds = dS + row * T;
    float pdp = 0.0f;
    for (int t2 = 0; t2 <= t; t2++) {
        const float* vt = v + (((size_t)b * T + t2) * Hkv + hk) * D;
        float s = 0.0f;
        for (int i = 0; i < D; i++) s += dot[i] * vt[i];
        ds[t2] = s; // dP for now
        pdp += p[t2] * s;
    }
    for (int t2 = 0; t2 <= t; t2++) ds[t2] = p[t2] * (ds[t2] - pdp) * scale;
    for (int t2 = t + 1; t2 < T; t2++) ds[t2] = 0.0f;
}

// dq[b,t,h,i] = sum_{t2 <= t} dS[b,h,t,t2] k[b,t2,hk,i]: one thread per element
__global__ void attn_dq_v1(float* dq, const float* dS, const float* k, int B, int T, int H, int Hkv, int D) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * T * H * D) return;
    int i = (int)(idx % D), h = (int)((idx / D) % H), t = (int)((idx / ((size_t)D * H)) % T);
    int b = (int)(idx / ((size_t)D * H * T));
    int hk = h / (H / Hkv);
    const float* ds = dS + (((size_t)b * H + h) * T + t) * T;
    float acc = 0.0f;
    for (int t2 = 0; t2 <= t; t2++) acc += ds[t2] * k[(((size_t)b * T + t2) * Hkv + hk) * D + i];
    dq[idx] = acc;
}

// dk[b,t2,hk,i] = sum_{h in group} sum_{t >= t2} dS[b,h,t,t2] q[b,t,h,i], dv likewise with P and dout:
// one thread per element, the heads of the group and the rows in a fixed order
__global__ void attn_dkdv_v1(float* dk, float* dv, const float* dS, const float* att, const float* q,
                             const float* dout, int B, int T, int H, int Hkv, int D) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * T * Hkv * D) return;
    int i = (int)(idx % D), hk = (int)((idx / D) % Hkv), t2 = (int)((idx / ((size_t)D * Hkv)) % T);
    int b = (int)(idx / ((size_t)D * Hkv * T));
    int group = H / Hkv;
    float dka = 0.0f, dva = 0.0f;
    for (int h = hk * group; h < (hk + 1) * group; h++)
        for (int t = t2; t < T; t++) {
            size_t a = (((size_t)b * H + h) * T + t) * T + t2;
            size_t qo = (((size_t)b * T + t) * H + h) * D + i;
            dka += dS[a] * q[qo];
            dva += att[a] * dout[qo];
        }
    dk[idx] = dka;
    dv[idx] = dva;
}

void attention_forward_v1(float* out, float* att, const float* q, const float* k, const float* v,
                          int B, int T, int H, int Hkv, int D) {
    const int bs = 256;
    float scale = 1.0f / sqrtf((float)D);
    attn_scores_v1<<<ceil_div((long long)B * H * T * T, bs), bs>>>(att, q, k, B, T, H, Hkv, D, scale);
    attn_softmax_v1<<<ceil_div((long long)B * H * T, bs), bs>>>(att, B, H, T);
    attn_av_v1<<<ceil_div((long long)B * T * H * D, bs), bs>>>(out, att, v, B, T, H, Hkv, D);
    cudaCheckLast();
}

void attention_backward_v1(float* dq, float* dk, float* dv, float* dS, const float* dout, const float* att,
                           const float* q, const float* k, const float* v, int B, int T, int H, int Hkv, int D) {
    const int bs = 256;
    float scale = 1.0f / sqrtf((float)D);
    attn_dscores_v1<<<ceil_div((long long)B * H * T, bs), bs>>>(dS, att, dout, v, B, T, H, Hkv, D, scale);
    attn_dq_v1<<<ceil_div((long long)B * T * H * D, bs), bs>>>(dq, dS, k, B, T, H, Hkv, D);
    attn_dkdv_v1<<<ceil_div((long long)B * T * Hkv * D, bs), bs>>>(dk, dv, dS, att, q, dout, B, T, H, Hkv, D);
    cudaCheckLast();
}

// ----------------------------------------------------------------------------
// version 2: flash-style tiles in shared memory (fp32, CUDA cores)
//
// A block has 256 threads seen as a 16 x 16 grid: ty = tid / 16, tx = tid % 16. In a 64 x 64 score tile the
// thread owns rows ty*4 + i (i < 4, contiguous) and columns tx + 16*j (j < 4, strided, so that the 16 threads of
// a row read 16 different rows of the other operand). The 16 threads sharing a row are one half-warp, so row
// reductions are 4 shuffles. In a 64 x D output tile it owns the same 4 rows and the columns g*64 + tx*4 + e
// (g < D/64, e < 4): float4 reads that are contiguous across tx. Tiles of q/k/v/dout are stored row-major with
// the row padded to D+4 floats (16-byte aligned, spreads the banks); score tiles are stored transposed
// (column-major, padded to 68) so that the 4 contiguous rows of a thread are one float4.

#define FA_TILE 64      // query rows per tile = keys per tile
#define FA_THREADS 256
#define FA_LDS (FA_TILE + 4)

__host__ __device__ constexpr int fa_ld(int D) { return D + 4; }

// dst[64][D+4] <- 64 rows of D floats starting at src, consecutive rows `stride` floats apart; the rows from
// `nrows` on (past the end of the sequence, in its last tile) are zeros
template<int D>
__device__ inline void fa_load_tile(float* dst, const float* src, int stride, int nrows) {
    constexpr int V4 = D / 4;
    for (int e = threadIdx.x; e < FA_TILE * V4; e += FA_THREADS) {
        int r = e / V4, c = (e % V4) * 4;
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r < nrows) x = *(const float4*)&src[(size_t)r * stride + c];
        *(float4*)&dst[r * fa_ld(D) + c] = x;
    }
}

__device__ inline float fa_dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

// acc[i][j] += A[arow_i, :] . B[brow_j, :] over D, for the thread's rows arow_i = ty*4 + i and brow_j = tx + 16*j
template<int D>
__device__ inline void fa_tile_dot(float acc[4][4], const float* A, const float* Bt, int ty, int tx) {
    #pragma unroll 2
    for (int d = 0; d < D; d += 4) {
        float4 a[4], b[4];
        #pragma unroll
        for (int i = 0; i < 4; i++) a[i] = *(const float4*)&A[(ty * 4 + i) * fa_ld(D) + d];
        #pragma unroll
        for (int j = 0; j < 4; j++) b[j] = *(const float4*)&Bt[(tx + 16 * j) * fa_ld(D) + d];
        #pragma unroll
        for (int i = 0; i < 4; i++)
            #pragma unroll
            for (int j = 0; j < 4; j++) acc[i][j] += fa_dot4(a[i], b[j]);
    }
}

// acc[i][g*4+e] += sum_c P[c][ty*4+i] * X[c][g*64 + tx*4 + e]: P a transposed 64 x 64 score tile, X a 64 x D tile
template<int D>
__device__ inline void fa_tile_pv(float acc[4][D / 16], const float* P, const float* X, int ty, int tx) {
    #pragma unroll 4
    for (int c = 0; c < FA_TILE; c++) {
        float4 p = *(const float4*)&P[c * FA_LDS + ty * 4];
        float pv[4] = {p.x, p.y, p.z, p.w};
        #pragma unroll
        for (int g = 0; g < D / 64; g++) {
            float4 x = *(const float4*)&X[c * fa_ld(D) + g * 64 + tx * 4];
            #pragma unroll
            for (int i = 0; i < 4; i++) {
                acc[i][g * 4 + 0] += pv[i] * x.x;
                acc[i][g * 4 + 1] += pv[i] * x.y;
                acc[i][g * 4 + 2] += pv[i] * x.z;
                acc[i][g * 4 + 3] += pv[i] * x.w;
            }
        }
    }
}

// store the thread's 4 x 4 score values s[i][j] (row ty*4+i, column tx+16j) transposed: P[col][row]
__device__ inline void fa_store_scores_t(float* P, const float s[4][4], int ty, int tx) {
    #pragma unroll
    for (int j = 0; j < 4; j++)
        *(float4*)&P[(tx + 16 * j) * FA_LDS + ty * 4] = make_float4(s[0][j], s[1][j], s[2][j], s[3][j]);
}

// write the thread's 64 x D output values acc[i][*] (rows ty*4+i) times rowscale[i] to dst (row stride `stride`),
// rows below nrows only
template<int D>
__device__ inline void fa_store_out(float* dst, int stride, const float acc[4][D / 16], const float rowscale[4],
                                    int ty, int tx, int nrows) {
    #pragma unroll
    for (int i = 0; i < 4; i++)
        #pragma unroll
        for (int g = 0; g < D / 64; g++) {
            if (ty * 4 + i >= nrows) continue;
            float r = rowscale[i];
            float4 o = make_float4(acc[i][g * 4] * r, acc[i][g * 4 + 1] * r, acc[i][g * 4 + 2] * r, acc[i][g * 4 + 3] * r);
            *(float4*)&dst[(size_t)(ty * 4 + i) * stride + g * 64 + tx * 4] = o;
        }
}

template<int D> constexpr size_t fa_forward_smem() { return (3 * FA_TILE * fa_ld(D) + FA_TILE * FA_LDS) * sizeof(float); }
template<int D> constexpr size_t fa_dkdv_smem() { return (4 * FA_TILE * fa_ld(D) + 2 * FA_TILE * FA_LDS + 2 * FA_TILE) * sizeof(float); }
template<int D> constexpr size_t fa_dq_smem() { return (4 * FA_TILE * fa_ld(D) + FA_TILE * FA_LDS) * sizeof(float); }

// forward: grid (ceil(T/64), B*H); out[B,T,H,D] and lse[B,H,T] (natural log, of the scaled scores)
template<int D>
__global__ void __launch_bounds__(FA_THREADS)
attn_flash_forward_v2(float* out, float* lse, const float* q, const float* k, const float* v, int T, int H, int Hkv,
                      float scale) {
    extern __shared__ float4 fa_smem_f4[];
    float* Qs = (float*)fa_smem_f4;              // [64][D+4]   query rows q0..q0+63
    float* Ks = Qs + FA_TILE * fa_ld(D);         // [64][D+4]   keys k0..k0+63
    float* Vs = Ks + FA_TILE * fa_ld(D);         // [64][D+4]
    float* Ps = Vs + FA_TILE * fa_ld(D);         // [64][68]    probabilities, transposed: Ps[key][query]
    int ntiles = (T + FA_TILE - 1) / FA_TILE;
    int qt = ntiles - 1 - blockIdx.x;            // the longest rows start first
    int b = blockIdx.y / H, h = blockIdx.y % H, hk = h / (H / Hkv);
    int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    int q0 = qt * FA_TILE;
    fa_load_tile<D>(Qs, q + (((size_t)b * T + q0) * H + h) * D, H * D, T - q0);
    float o[4][D / 16];
    float mrow[4], lrow[4]; // running max and sum of exp of the thread's 4 rows
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        mrow[i] = -INFINITY;
        lrow[i] = 0.0f;
        #pragma unroll
        for (int e = 0; e < D / 16; e++) o[i][e] = 0.0f;
    }
    for (int kt = 0; kt <= qt; kt++) {
        int k0 = kt * FA_TILE;
        __syncthreads(); // every thread is done with the previous Ks, Vs, Ps
        fa_load_tile<D>(Ks, k + (((size_t)b * T + k0) * Hkv + hk) * D, Hkv * D, T - k0);
        fa_load_tile<D>(Vs, v + (((size_t)b * T + k0) * Hkv + hk) * D, Hkv * D, T - k0);
        __syncthreads();
        float s[4][4] = {};
        fa_tile_dot<D>(s, Qs, Ks, ty, tx);
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            int r = q0 + ty * 4 + i;
            float mx = -INFINITY;
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                int c = k0 + tx + 16 * j;
                s[i][j] = c <= r ? s[i][j] * scale : -INFINITY; // causal mask
                mx = fmaxf(mx, s[i][j]);
            }
            #pragma unroll
            for (int off = 8; off >= 1; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            // key 0 is never masked, so mx is finite from the first tile on
            float mnew = fmaxf(mrow[i], mx);
            float corr = expf(mrow[i] - mnew); // 0 on the first tile (mrow = -inf)
            float sum = 0.0f;
            #pragma unroll
            for (int j = 0; j < 4; j++) { s[i][j] = expf(s[i][j] - mnew); sum += s[i][j]; }
            #pragma unroll
            for (int off = 8; off >= 1; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            lrow[i] = lrow[i] * corr + sum;
            mrow[i] = mnew;
            #pragma unroll
            for (int e = 0; e < D / 16; e++) o[i][e] *= corr;
        }
        fa_store_scores_t(Ps, s, ty, tx);
        __syncthreads();
        fa_tile_pv<D>(o, Ps, Vs, ty, tx);
    }
    float inv[4];
    #pragma unroll
    for (int i = 0; i < 4; i++) inv[i] = 1.0f / lrow[i];
    fa_store_out<D>(out + (((size_t)b * T + q0) * H + h) * D, H * D, o, inv, ty, tx, T - q0);
    if (tx == 0) {
        #pragma unroll
        for (int i = 0; i < 4; i++)
            if (q0 + ty * 4 + i < T) lse[((size_t)b * H + h) * T + q0 + ty * 4 + i] = mrow[i] + logf(lrow[i]);
    }
}

// backward, step 1: Dsum[b,h,t] = dout[b,t,h,:] . out[b,t,h,:]  (= sum_t2 P dP): one warp per row
template<int D>
__global__ void attn_flash_bwd_dsum_v2(float* Dsum, const float* dout, const float* out, int B, int T, int H) {
    size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; // row = (b*T + t)*H + h
    int lane = threadIdx.x % 32;
    if (row >= (size_t)B * T * H) return;
    const float* a = dout + row * D;
    const float* o = out + row * D;
    float s = 0.0f;
    for (int i = lane * 4; i < D; i += 128) s += fa_dot4(*(const float4*)&a[i], *(const float4*)&o[i]);
    for (int off = 16; off >= 1; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) {
        int h = (int)(row % H), t = (int)((row / H) % T), b = (int)(row / ((size_t)H * T));
        Dsum[((size_t)b * H + h) * T + t] = s;
    }
}

// backward, step 2: dk, dv of 64 keys. grid (ceil(T/64), B*Hkv). Loops over the query heads of the kv head's group,
// then over the query tiles at or after the key tile: a fixed order, no atomics. Here the thread's 4 contiguous
// rows of a score tile are keys (ty*4+i) and its 4 strided columns are queries (tx+16j).
template<int D>
__global__ void __launch_bounds__(FA_THREADS)
attn_flash_bwd_dkdv_v2(float* dk, float* dv, const float* dout, const float* q, const float* k, const float* v,
                       const float* lse, const float* Dsum, int T, int H, int Hkv, float scale) {
    extern __shared__ float4 fa_smem_f4[];
    float* Ks = (float*)fa_smem_f4;        // [64][D+4]  keys k0..k0+63 (for the whole block)
    float* Vs = Ks + FA_TILE * fa_ld(D);   // [64][D+4]
    float* Qs = Vs + FA_TILE * fa_ld(D);   // [64][D+4]  query rows q0..q0+63 of head h
    float* dOs = Qs + FA_TILE * fa_ld(D);  // [64][D+4]
    float* Ps = dOs + FA_TILE * fa_ld(D);  // [64][68]   P[query][key] (the key-major tile, transposed)
    float* dSs = Ps + FA_TILE * FA_LDS;    // [64][68]   dS[query][key]
    float* lse_s = dSs + FA_TILE * FA_LDS; // [64]
    float* dsum_s = lse_s + FA_TILE;       // [64]
    int ntiles = (T + FA_TILE - 1) / FA_TILE;
    int kt = blockIdx.x;                   // the first keys have the most queries: they start first
    int b = blockIdx.y / Hkv, hk = blockIdx.y % Hkv, group = H / Hkv;
    int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    int k0 = kt * FA_TILE;
    fa_load_tile<D>(Ks, k + (((size_t)b * T + k0) * Hkv + hk) * D, Hkv * D, T - k0);
    fa_load_tile<D>(Vs, v + (((size_t)b * T + k0) * Hkv + hk) * D, Hkv * D, T - k0);
    float dka[4][D / 16], dva[4][D / 16];
    #pragma unroll
    for (int i = 0; i < 4; i++)
        #pragma unroll
        for (int e = 0; e < D / 16; e++) { dka[i][e] = 0.0f; dva[i][e] = 0.0f; }
    for (int h = hk * group; h < (hk + 1) * group; h++)
        for (int qt = kt; qt < ntiles; qt++) {
            int q0 = qt * FA_TILE;
            __syncthreads(); // every thread is done with the previous Qs, dOs, Ps, dSs
            fa_load_tile<D>(Qs, q + (((size_t)b * T + q0) * H + h) * D, H * D, T - q0);
            fa_load_tile<D>(dOs, dout + (((size_t)b * T + q0) * H + h) * D, H * D, T - q0);
            if (threadIdx.x < FA_TILE) { // queries past the end: lse = inf makes their P zero
                int t = q0 + threadIdx.x;
                lse_s[threadIdx.x] = t < T ? lse[((size_t)b * H + h) * T + t] : INFINITY;
                dsum_s[threadIdx.x] = t < T ? Dsum[((size_t)b * H + h) * T + t] : 0.0f;
            }
            __syncthreads();
            float s[4][4] = {}, dp[4][4] = {};
            fa_tile_dot<D>(s, Ks, Qs, ty, tx);   // S^T[key][query] = k . q
            fa_tile_dot<D>(dp, Vs, dOs, ty, tx); // dP^T[key][query] = v . dout
            #pragma unroll
            for (int i = 0; i < 4; i++)
                #pragma unroll
                for (int j = 0; j < 4; j++) {
                    int c = k0 + ty * 4 + i, rr = tx + 16 * j; // key c, query q0 + rr
                    float p = c <= q0 + rr ? expf(s[i][j] * scale - lse_s[rr]) : 0.0f;
                    s[i][j] = p;
                    dp[i][j] = p * (dp[i][j] - dsum_s[rr]) * scale; // dS, through the softmax and the scale
                }
            fa_store_scores_t(Ps, s, ty, tx);
            fa_store_scores_t(dSs, dp, ty, tx);
            __syncthreads();
            fa_tile_pv<D>(dva, Ps, dOs, ty, tx); // dV[key] += sum_query P dout
            fa_tile_pv<D>(dka, dSs, Qs, ty, tx); // dK[key] += sum_query dS q
        }
    const float one[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    fa_store_out<D>(dk + (((size_t)b * T + k0) * Hkv + hk) * D, Hkv * D, dka, one, ty, tx, T - k0);
    fa_store_out<D>(dv + (((size_t)b * T + k0) * Hkv + hk) * D, Hkv * D, dva, one, ty, tx, T - k0);
}

// backward, step 3: dq of 64 query rows. grid (ceil(T/64), B*H). Loops over the key tiles up to the diagonal.
template<int D>
__global__ void __launch_bounds__(FA_THREADS)
attn_flash_bwd_dq_v2(float* dq, const float* dout, const float* q, const float* k, const float* v,
                     const float* lse, const float* Dsum, int T, int H, int Hkv, float scale) {
    extern __shared__ float4 fa_smem_f4[];
    float* Qs = (float*)fa_smem_f4;        // [64][D+4]  query rows q0..q0+63 (for the whole block)
    float* dOs = Qs + FA_TILE * fa_ld(D);  // [64][D+4]
    float* Ks = dOs + FA_TILE * fa_ld(D);  // [64][D+4]  keys k0..k0+63
    float* Vs = Ks + FA_TILE * fa_ld(D);   // [64][D+4]
    float* dSs = Vs + FA_TILE * fa_ld(D);  // [64][68]   dS transposed: dS[key][query]
    int ntiles = (T + FA_TILE - 1) / FA_TILE;
    int qt = ntiles - 1 - blockIdx.x;      // the longest rows start first
    int b = blockIdx.y / H, h = blockIdx.y % H, hk = h / (H / Hkv);
    int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    int q0 = qt * FA_TILE;
    fa_load_tile<D>(Qs, q + (((size_t)b * T + q0) * H + h) * D, H * D, T - q0);
    fa_load_tile<D>(dOs, dout + (((size_t)b * T + q0) * H + h) * D, H * D, T - q0);
    float lse_r[4], dsum_r[4];
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        int t = q0 + ty * 4 + i; // rows past the end are computed but never stored
        lse_r[i] = t < T ? lse[((size_t)b * H + h) * T + t] : 0.0f;
        dsum_r[i] = t < T ? Dsum[((size_t)b * H + h) * T + t] : 0.0f;
    }
    float dqa[4][D / 16];
    #pragma unroll
    for (int i = 0; i < 4; i++)
        #pragma unroll
        for (int e = 0; e < D / 16; e++) dqa[i][e] = 0.0f;
    for (int kt = 0; kt <= qt; kt++) {
        int k0 = kt * FA_TILE;
        __syncthreads(); // every thread is done with the previous Ks, Vs, dSs
        fa_load_tile<D>(Ks, k + (((size_t)b * T + k0) * Hkv + hk) * D, Hkv * D, T - k0);
        fa_load_tile<D>(Vs, v + (((size_t)b * T + k0) * Hkv + hk) * D, Hkv * D, T - k0);
        __syncthreads();
        float s[4][4] = {}, dp[4][4] = {};
        fa_tile_dot<D>(s, Qs, Ks, ty, tx);   // S[query][key]
        fa_tile_dot<D>(dp, dOs, Vs, ty, tx); // dP[query][key]
        #pragma unroll
        for (int i = 0; i < 4; i++)
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                int r = q0 + ty * 4 + i, c = k0 + tx + 16 * j;
                float p = c <= r ? expf(s[i][j] * scale - lse_r[i]) : 0.0f;
                dp[i][j] = p * (dp[i][j] - dsum_r[i]) * scale;
            }
        fa_store_scores_t(dSs, dp, ty, tx);
        __syncthreads();
        fa_tile_pv<D>(dqa, dSs, Ks, ty, tx); // dQ[query] += sum_key dS k
    }
    const float one[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    fa_store_out<D>(dq + (((size_t)b * T + q0) * H + h) * D, H * D, dqa, one, ty, tx, T - q0);
}

// the kernels above need more than 48 KB of shared memory: raise their limits once
template<int D>
void attention_v2_setup() {
    cudaCheck(cudaFuncSetAttribute(attn_flash_forward_v2<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)fa_forward_smem<D>()));
    cudaCheck(cudaFuncSetAttribute(attn_flash_bwd_dkdv_v2<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)fa_dkdv_smem<D>()));
    cudaCheck(cudaFuncSetAttribute(attn_flash_bwd_dq_v2<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)fa_dq_smem<D>()));
}

static void attention_flash_check(int T, int D) {
    if (T < 1 || (D != 64 && D != 128)) {
        fprintf(stderr, "Error: attention versions 2, 3 need D in {64, 128} (got T=%d D=%d)\n", T, D);
        exit(EXIT_FAILURE);
    }
}

template<int D>
void attention_forward_v2_d(float* out, float* lse, const float* q, const float* k, const float* v,
                            int B, int T, int H, int Hkv) {
    dim3 grid(ceil_div(T, FA_TILE), B * H);
    attn_flash_forward_v2<D><<<grid, FA_THREADS, fa_forward_smem<D>()>>>(out, lse, q, k, v, T, H, Hkv,
                                                                          1.0f / sqrtf((float)D));
    cudaCheckLast();
}
void attention_forward_v2(float* out, float* lse, const float* q, const float* k, const float* v,
                          int B, int T, int H, int Hkv, int D) {
    attention_flash_check(T, D);
    if (D == 64) attention_forward_v2_d<64>(out, lse, q, k, v, B, T, H, Hkv);
    else attention_forward_v2_d<128>(out, lse, q, k, v, B, T, H, Hkv);
}

template<int D>
void attention_backward_v2_d(float* dq, float* dk, float* dv, float* Dsum, const float* dout, const float* out,
                             const float* lse, const float* q, const float* k, const float* v,
                             int B, int T, int H, int Hkv) {
    float scale = 1.0f / sqrtf((float)D);
    attn_flash_bwd_dsum_v2<D><<<ceil_div((long long)B * T * H, 8), 256>>>(Dsum, dout, out, B, T, H);
    attn_flash_bwd_dkdv_v2<D><<<dim3(ceil_div(T, FA_TILE), B * Hkv), FA_THREADS, fa_dkdv_smem<D>()>>>(
        dk, dv, dout, q, k, v, lse, Dsum, T, H, Hkv, scale);
    attn_flash_bwd_dq_v2<D><<<dim3(ceil_div(T, FA_TILE), B * H), FA_THREADS, fa_dq_smem<D>()>>>(
        dq, dout, q, k, v, lse, Dsum, T, H, Hkv, scale);
    cudaCheckLast();
}
void attention_backward_v2(float* dq, float* dk, float* dv, float* Dsum, const float* dout, const float* out,
                           const float* lse, const float* q, const float* k, const float* v,
                           int B, int T, int H, int Hkv, int D) {
    attention_flash_check(T, D);
    if (D == 64) attention_backward_v2_d<64>(dq, dk, dv, Dsum, dout, out, lse, q, k, v, B, T, H, Hkv);
    else attention_backward_v2_d<128>(dq, dk, dv, Dsum, dout, out, lse, q, k, v, B, T, H, Hkv);
}

// ----------------------------------------------------------------------------
// version 3: flash-style with bf16 tensor cores (WMMA 16x16x16, fp32 accumulators), bf16 q/k/v/out/dout/dq/dk/dv
//
// The same tiles and loops as version 2, with 4 warps per block; warp w owns the 16-row strip 16w..16w+15 of the
// block's 64 rows (queries in the forward and dq kernels, keys in the dk/dv kernel). The products go through
// WMMA; everything row-wise (masking, the softmax, exp, dS) is done by the warp's lanes on an fp32 copy of its
// strip in shared memory: lane l takes row l/2 and the half (l%2) of its 64 columns. The accumulator layout of a
// WMMA fragment is unspecified, so the forward's running output is kept in shared memory (fp32) and rescaled there.

#define FB_TILE 64
#define FB_WARPS 4
#define FB_THREADS (32 * FB_WARPS)
#define FB_LDS (FB_TILE + 4) // fp32 score strips [16][68]
#define FB_LDP (FB_TILE + 8) // bf16 score strips [16][72]

namespace wmma = nvcuda::wmma;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fb_frag_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb_frag_b_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb_frag_b_col;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> fb_frag_acc;

__host__ __device__ constexpr int fb_ldh(int D) { return D + 8; }  // bf16 tiles [64][D+8]
__host__ __device__ constexpr int fb_ldo(int D) { return D + 4; }  // fp32 strips [16][D+4]

// dst[64][D+8] <- 64 rows of D bf16 starting at src, rows `stride` elements apart (16-byte copies); the rows
// from `nrows` on (past the end of the sequence) are zeros
template<int D>
__device__ inline void fb_load_tile(bf16* dst, const bf16* src, int stride, int nrows) {
    constexpr int V8 = D / 8;
    for (int e = threadIdx.x; e < FB_TILE * V8; e += FB_THREADS) {
        int r = e / V8, c = (e % V8) * 8;
        uint4 x = make_uint4(0u, 0u, 0u, 0u);
        if (r < nrows) x = *(const uint4*)&src[(size_t)r * stride + c];
        *(uint4*)&dst[r * fb_ldh(D) + c] = x;
    }
}

// S[16][64] (fp32, ld FB_LDS) = A[a0..a0+15][:] . B[0..63][:]^T: both bf16 tiles of row length D
template<int D>
__device__ inline void fb_strip_dot(float* S, const bf16* A, const bf16* B) {
    for (int n = 0; n < FB_TILE / 16; n++) {
        fb_frag_acc acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int kk = 0; kk < D / 16; kk++) {
            fb_frag_a a;
            fb_frag_b_col b; // B^T, read from the row-major tile as column-major
            wmma::load_matrix_sync(a, A + kk * 16, fb_ldh(D));
            wmma::load_matrix_sync(b, B + (size_t)(n * 16) * fb_ldh(D) + kk * 16, fb_ldh(D));
            wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(S + n * 16, acc, FB_LDS, wmma::mem_row_major);
    }
}

// acc[n] += P[16][64] (bf16, ld FB_LDP) . X[64][D] (bf16 tile), for the D/16 column blocks n of the result
template<int D>
__device__ inline void fb_strip_pv(fb_frag_acc* acc, const bf16* P, const bf16* X) {
    for (int kk = 0; kk < FB_TILE / 16; kk++) {
        fb_frag_a a;
        wmma::load_matrix_sync(a, P + kk * 16, FB_LDP);
        for (int n = 0; n < D / 16; n++) {
            fb_frag_b_row b;
            wmma::load_matrix_sync(b, X + (size_t)(kk * 16) * fb_ldh(D) + n * 16, fb_ldh(D));
            wmma::mma_sync(acc[n], a, b, acc[n]);
        }
    }
}

// the warp's 16 x D strip of fp32 (in shared memory, ld D+4) times rowscale -> bf16 rows of dst (row stride
// `stride`), rows below nrows only; lane l writes row l/2, columns (l%2)*D/2 ..
template<int D>
__device__ inline void fb_write_strip(bf16* dst, int stride, const float* O, float rowscale, int nrows) {
    int lane = threadIdx.x % 32, r = lane / 2, c0 = (lane % 2) * (D / 2);
    if (r >= nrows) return;
    for (int c = c0; c < c0 + D / 2; c += 2) {
        __nv_bfloat162 v = __floats2bfloat162_rn(O[r * fb_ldo(D) + c] * rowscale, O[r * fb_ldo(D) + c + 1] * rowscale);
        *(__nv_bfloat162*)&dst[(size_t)r * stride + c] = v;
    }
}

template<int D> constexpr size_t fb_forward_smem() {
    return 3 * FB_TILE * fb_ldh(D) * sizeof(bf16)                  // Qs, Ks, Vs
         + FB_WARPS * 16 * (FB_LDS * sizeof(float) + FB_LDP * sizeof(bf16) + fb_ldo(D) * sizeof(float)); // S, P, O
}
template<int D> constexpr size_t fb_dkdv_smem() {
    return 4 * FB_TILE * fb_ldh(D) * sizeof(bf16)                  // Ks, Vs, Qs, dOs
         + 2 * FB_TILE * sizeof(float)                             // lse, Dsum of the query tile
         + FB_WARPS * 16 * (2 * FB_LDS * sizeof(float) + 2 * FB_LDP * sizeof(bf16)) // S, dP, P, dS strips
         + FB_WARPS * 16 * fb_ldo(D) * sizeof(float);              // staging of dk, dv
}
template<int D> constexpr size_t fb_dq_smem() {
    return 4 * FB_TILE * fb_ldh(D) * sizeof(bf16)                  // Qs, dOs, Ks, Vs
         + FB_WARPS * 16 * (2 * FB_LDS * sizeof(float) + FB_LDP * sizeof(bf16)) // S, dP, dS strips
         + FB_WARPS * 16 * fb_ldo(D) * sizeof(float);              // staging of dq
}

// forward: grid (ceil(T/64), B*H), 128 threads
template<int D>
__global__ void __launch_bounds__(FB_THREADS)
attn_flash_forward_v3(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int T, int H, int Hkv,
                      float scale) {
    extern __shared__ __align__(128) float4 fb_smem_f4[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    bf16* Qs = (bf16*)fb_smem_f4;                  // [64][D+8]
    bf16* Ks = Qs + FB_TILE * fb_ldh(D);           // [64][D+8]
    bf16* Vs = Ks + FB_TILE * fb_ldh(D);           // [64][D+8]
    float* S = (float*)(Vs + FB_TILE * fb_ldh(D)) + warp * 16 * FB_LDS;                     // this warp's [16][68]
    bf16* P = (bf16*)((float*)(Vs + FB_TILE * fb_ldh(D)) + FB_WARPS * 16 * FB_LDS) + warp * 16 * FB_LDP; // [16][72]
    float* O = (float*)((bf16*)((float*)(Vs + FB_TILE * fb_ldh(D)) + FB_WARPS * 16 * FB_LDS) + FB_WARPS * 16 * FB_LDP)
             + warp * 16 * fb_ldo(D);                                                         // [16][D+4]
    int ntiles = (T + FB_TILE - 1) / FB_TILE;
    int qt = ntiles - 1 - blockIdx.x;              // the longest rows start first
    int b = blockIdx.y / H, h = blockIdx.y % H, hk = h / (H / Hkv);
    int q0 = qt * FB_TILE;
    int r = lane / 2, c0 = (lane % 2) * 32;        // this lane's row of the strip and its 32 columns
    int row = q0 + warp * 16 + r;                  // the query of that row
    fb_load_tile<D>(Qs, q + (((size_t)b * T + q0) * H + h) * D, H * D, T - q0);
    for (int c = (lane % 2) * (D / 2); c < (lane % 2 + 1) * (D / 2); c++) O[r * fb_ldo(D) + c] = 0.0f;
    float m = -INFINITY, l = 0.0f;                 // the row's running max and sum (the same in both lanes)
    for (int kt = 0; kt <= qt; kt++) {
        int k0 = kt * FB_TILE;
        __syncthreads(); // every warp is done with the previous Ks, Vs
        fb_load_tile<D>(Ks, k + (((size_t)b * T + k0) * Hkv + hk) * D, Hkv * D, T - k0);
        fb_load_tile<D>(Vs, v + (((size_t)b * T + k0) * Hkv + hk) * D, Hkv * D, T - k0);
        __syncthreads();
        fb_strip_dot<D>(S, Qs + warp * 16 * fb_ldh(D), Ks);
        __syncwarp();
        // online softmax of the row: max over both halves, rescale, exp
        float mx = -INFINITY;
        for (int c = c0; c < c0 + 32; c++) {
            float s = k0 + c <= row ? S[r * FB_LDS + c] * scale : -INFINITY; // causal mask
            S[r * FB_LDS + c] = s;
            mx = fmaxf(mx, s);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1)); // key 0 is never masked: finite from the first tile
        float mnew = fmaxf(m, mx), corr = expf(m - mnew);
        float sum = 0.0f;
        for (int c = c0; c < c0 + 32; c++) {
            float p = expf(S[r * FB_LDS + c] - mnew);
            sum += p;
            P[r * FB_LDP + c] = __float2bfloat16(p);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * corr + sum;
        m = mnew;
        for (int c = (lane % 2) * (D / 2); c < (lane % 2 + 1) * (D / 2); c++) O[r * fb_ldo(D) + c] *= corr;
        __syncwarp();
        // O += P V, through the fragments
        fb_frag_acc acc[D / 16];
        for (int n = 0; n < D / 16; n++) wmma::load_matrix_sync(acc[n], O + n * 16, fb_ldo(D), wmma::mem_row_major);
        fb_strip_pv<D>(acc, P, Vs);
        __syncwarp(); // every lane has read O before it is overwritten
        for (int n = 0; n < D / 16; n++) wmma::store_matrix_sync(O + n * 16, acc[n], fb_ldo(D), wmma::mem_row_major);
        __syncwarp();
    }
    fb_write_strip<D>(out + (((size_t)b * T + q0 + warp * 16) * H + h) * D, H * D, O, 1.0f / l, T - q0 - warp * 16);
    if (lane % 2 == 0 && row < T) lse[((size_t)b * H + h) * T + row] = m + logf(l);
}

// backward, step 1: Dsum[b,h,t] = dout . out in fp32, from bf16: one warp per row
template<int D>
__global__ void attn_flash_bwd_dsum_v3(float* Dsum, const bf16* dout, const bf16* out, int B, int T, int H) {
    size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; // row = (b*T + t)*H + h
    int lane = threadIdx.x % 32;
    if (row >= (size_t)B * T * H) return;
    const bf16* a = dout + row * D;
    const bf16* o = out + row * D;
    float s = 0.0f;
    for (int i = lane * 2; i < D; i += 64) {
        float2 x = __bfloat1622float2(*(const __nv_bfloat162*)&a[i]), y = __bfloat1622float2(*(const __nv_bfloat162*)&o[i]);
        s += x.x * y.x + x.y * y.y;
    }
    for (int off = 16; off >= 1; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) {
        int h = (int)(row % H), t = (int)((row / H) % T), b = (int)(row / ((size_t)H * T));
        Dsum[((size_t)b * H + h) * T + t] = s;
    }
}

// backward, step 2: dk, dv of 64 keys. grid (ceil(T/64), B*Hkv), 128 threads; warp w owns keys 16w..16w+15.
// The heads of the group, then the query tiles at or after the keys: a fixed order, no atomics.
template<int D>
__global__ void __launch_bounds__(FB_THREADS)
attn_flash_bwd_dkdv_v3(bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k, const bf16* v,
                       const float* lse, const float* Dsum, int T, int H, int Hkv, float scale) {
    extern __shared__ __align__(128) float4 fb_smem_f4[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    bf16* Ks = (bf16*)fb_smem_f4;                  // [64][D+8] keys k0.. (for the whole block)
    bf16* Vs = Ks + FB_TILE * fb_ldh(D);
    bf16* Qs = Vs + FB_TILE * fb_ldh(D);           // [64][D+8] queries q0.. of head h
    bf16* dOs = Qs + FB_TILE * fb_ldh(D);
    float* lse_s = (float*)(dOs + FB_TILE * fb_ldh(D)); // [64]
    float* dsum_s = lse_s + FB_TILE;                    // [64]
    float* St = dsum_s + FB_TILE + warp * 16 * FB_LDS;                       // [16 keys][68 queries] fp32
    float* dPt = dsum_s + FB_TILE + FB_WARPS * 16 * FB_LDS + warp * 16 * FB_LDS;
    bf16* Pt = (bf16*)(dsum_s + FB_TILE + 2 * FB_WARPS * 16 * FB_LDS) + warp * 16 * FB_LDP; // [16][72] bf16
    bf16* dSt = (bf16*)(dsum_s + FB_TILE + 2 * FB_WARPS * 16 * FB_LDS) + FB_WARPS * 16 * FB_LDP + warp * 16 * FB_LDP;
    float* stage = (float*)((bf16*)(dsum_s + FB_TILE + 2 * FB_WARPS * 16 * FB_LDS) + 2 * FB_WARPS * 16 * FB_LDP)
                 + warp * 16 * fb_ldo(D);          // [16][D+4]
    int ntiles = (T + FB_TILE - 1) / FB_TILE;
    int kt = blockIdx.x;                           // the first keys have the most queries: they start first
    int b = blockIdx.y / Hkv, hk = blockIdx.y % Hkv, group = H / Hkv;
    int k0 = kt * FB_TILE;
    int r = lane / 2, c0 = (lane % 2) * 32;        // this lane's key row of the strip and its 32 query columns
    int key = k0 + warp * 16 + r;
    fb_load_tile<D>(Ks, k + (((size_t)b * T + k0) * Hkv + hk) * D, Hkv * D, T - k0);
    fb_load_tile<D>(Vs, v + (((size_t)b * T + k0) * Hkv + hk) * D, Hkv * D, T - k0);
    fb_frag_acc dka[D / 16], dva[D / 16];
    for (int n = 0; n < D / 16; n++) { wmma::fill_fragment(dka[n], 0.0f); wmma::fill_fragment(dva[n], 0.0f); }
    for (int h = hk * group; h < (hk + 1) * group; h++)
        for (int qt = kt; qt < ntiles; qt++) {
            int q0 = qt * FB_TILE;
            __syncthreads(); // every warp is done with the previous Qs, dOs, lse_s, dsum_s
            fb_load_tile<D>(Qs, q + (((size_t)b * T + q0) * H + h) * D, H * D, T - q0);
            fb_load_tile<D>(dOs, dout + (((size_t)b * T + q0) * H + h) * D, H * D, T - q0);
            if (threadIdx.x < FB_TILE) { // queries past the end: lse = inf makes their P zero
                int t = q0 + threadIdx.x;
                lse_s[threadIdx.x] = t < T ? lse[((size_t)b * H + h) * T + t] : INFINITY;
                dsum_s[threadIdx.x] = t < T ? Dsum[((size_t)b * H + h) * T + t] : 0.0f;
            }
            __syncthreads();
            fb_strip_dot<D>(St, Ks + warp * 16 * fb_ldh(D), Qs);   // S^T[key][query] = k . q
            fb_strip_dot<D>(dPt, Vs + warp * 16 * fb_ldh(D), dOs); // dP^T[key][query] = v . dout
            __syncwarp();
            for (int c = c0; c < c0 + 32; c++) {
                float p = key <= q0 + c ? expf(St[r * FB_LDS + c] * scale - lse_s[c]) : 0.0f;
                float ds = p * (dPt[r * FB_LDS + c] - dsum_s[c]) * scale;
                Pt[r * FB_LDP + c] = __float2bfloat16(p);
                dSt[r * FB_LDP + c] = __float2bfloat16(ds);
            }
            __syncwarp();
            fb_strip_pv<D>(dva, Pt, dOs); // dV[key] += sum_query P dout
            fb_strip_pv<D>(dka, dSt, Qs); // dK[key] += sum_query dS q
        }
    for (int n = 0; n < D / 16; n++) wmma::store_matrix_sync(stage + n * 16, dka[n], fb_ldo(D), wmma::mem_row_major);
    __syncwarp();
    fb_write_strip<D>(dk + (((size_t)b * T + k0 + warp * 16) * Hkv + hk) * D, Hkv * D, stage, 1.0f, T - k0 - warp * 16);
    __syncwarp();
    for (int n = 0; n < D / 16; n++) wmma::store_matrix_sync(stage + n * 16, dva[n], fb_ldo(D), wmma::mem_row_major);
    __syncwarp();
    fb_write_strip<D>(dv + (((size_t)b * T + k0 + warp * 16) * Hkv + hk) * D, Hkv * D, stage, 1.0f, T - k0 - warp * 16);
}

// backward, step 3: dq of 64 query rows. grid (ceil(T/64), B*H), 128 threads; warp w owns queries 16w..16w+15.
template<int D>
__global__ void __launch_bounds__(FB_THREADS)
attn_flash_bwd_dq_v3(bf16* dq, const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* lse,
                     const float* Dsum, int T, int H, int Hkv, float scale) {
    extern __shared__ __align__(128) float4 fb_smem_f4[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    bf16* Qs = (bf16*)fb_smem_f4;                  // [64][D+8] queries q0.. (for the whole block)
    bf16* dOs = Qs + FB_TILE * fb_ldh(D);
    bf16* Ks = dOs + FB_TILE * fb_ldh(D);          // [64][D+8] keys k0..
    bf16* Vs = Ks + FB_TILE * fb_ldh(D);
    float* S = (float*)(Vs + FB_TILE * fb_ldh(D)) + warp * 16 * FB_LDS;      // [16 queries][68 keys]
    float* dP = (float*)(Vs + FB_TILE * fb_ldh(D)) + FB_WARPS * 16 * FB_LDS + warp * 16 * FB_LDS;
    bf16* dS = (bf16*)((float*)(Vs + FB_TILE * fb_ldh(D)) + 2 * FB_WARPS * 16 * FB_LDS) + warp * 16 * FB_LDP;
    float* stage = (float*)((bf16*)((float*)(Vs + FB_TILE * fb_ldh(D)) + 2 * FB_WARPS * 16 * FB_LDS) + FB_WARPS * 16 * FB_LDP)
                 + warp * 16 * fb_ldo(D);
    int ntiles = (T + FB_TILE - 1) / FB_TILE;
    int qt = ntiles - 1 - blockIdx.x;              // the longest rows start first
    int b = blockIdx.y / H, h = blockIdx.y % H, hk = h / (H / Hkv);
    int q0 = qt * FB_TILE;
    int r = lane / 2, c0 = (lane % 2) * 32;
    int row = q0 + warp * 16 + r;
    float lse_r = row < T ? lse[((size_t)b * H + h) * T + row] : 0.0f; // rows past the end: never stored
    float dsum_r = row < T ? Dsum[((size_t)b * H + h) * T + row] : 0.0f;
    fb_load_tile<D>(Qs, q + (((size_t)b * T + q0) * H + h) * D, H * D, T - q0);
    fb_load_tile<D>(dOs, dout + (((size_t)b * T + q0) * H + h) * D, H * D, T - q0);
    fb_frag_acc dqa[D / 16];
    for (int n = 0; n < D / 16; n++) wmma::fill_fragment(dqa[n], 0.0f);
    for (int kt = 0; kt <= qt; kt++) {
        int k0 = kt * FB_TILE;
        __syncthreads(); // every warp is done with the previous Ks, Vs
        fb_load_tile<D>(Ks, k + (((size_t)b * T + k0) * Hkv + hk) * D, Hkv * D, T - k0);
        fb_load_tile<D>(Vs, v + (((size_t)b * T + k0) * Hkv + hk) * D, Hkv * D, T - k0);
        __syncthreads();
        fb_strip_dot<D>(S, Qs + warp * 16 * fb_ldh(D), Ks);    // S[query][key]
        fb_strip_dot<D>(dP, dOs + warp * 16 * fb_ldh(D), Vs);  // dP[query][key]
        __syncwarp();
        for (int c = c0; c < c0 + 32; c++) {
            float p = k0 + c <= row ? expf(S[r * FB_LDS + c] * scale - lse_r) : 0.0f;
            dS[r * FB_LDP + c] = __float2bfloat16(p * (dP[r * FB_LDS + c] - dsum_r) * scale);
        }
        __syncwarp();
        fb_strip_pv<D>(dqa, dS, Ks); // dQ[query] += sum_key dS k
    }
    for (int n = 0; n < D / 16; n++) wmma::store_matrix_sync(stage + n * 16, dqa[n], fb_ldo(D), wmma::mem_row_major);
    __syncwarp();
    fb_write_strip<D>(dq + (((size_t)b * T + q0 + warp * 16) * H + h) * D, H * D, stage, 1.0f, T - q0 - warp * 16);
}

template<int D>
void attention_v3_setup() {
    cudaCheck(cudaFuncSetAttribute(attn_flash_forward_v3<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)fb_forward_smem<D>()));
    cudaCheck(cudaFuncSetAttribute(attn_flash_bwd_dkdv_v3<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)fb_dkdv_smem<D>()));
    cudaCheck(cudaFuncSetAttribute(attn_flash_bwd_dq_v3<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)fb_dq_smem<D>()));
}

void attention_forward_v3(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                          int B, int T, int H, int Hkv, int D) {
    attention_flash_check(T, D);
    dim3 grid(ceil_div(T, FB_TILE), B * H);
    float scale = 1.0f / sqrtf((float)D);
    if (D == 64) attn_flash_forward_v3<64><<<grid, FB_THREADS, fb_forward_smem<64>()>>>(out, lse, q, k, v, T, H, Hkv, scale);
    else attn_flash_forward_v3<128><<<grid, FB_THREADS, fb_forward_smem<128>()>>>(out, lse, q, k, v, T, H, Hkv, scale);
    cudaCheckLast();
}

template<int D>
void attention_backward_v3_d(bf16* dq, bf16* dk, bf16* dv, float* Dsum, const bf16* dout, const bf16* out,
                             const float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T, int H, int Hkv) {
    float scale = 1.0f / sqrtf((float)D);
    attn_flash_bwd_dsum_v3<D><<<ceil_div((long long)B * T * H, 8), 256>>>(Dsum, dout, out, B, T, H);
    attn_flash_bwd_dkdv_v3<D><<<dim3(ceil_div(T, FB_TILE), B * Hkv), FB_THREADS, fb_dkdv_smem<D>()>>>(
        dk, dv, dout, q, k, v, lse, Dsum, T, H, Hkv, scale);
    attn_flash_bwd_dq_v3<D><<<dim3(ceil_div(T, FB_TILE), B * H), FB_THREADS, fb_dq_smem<D>()>>>(
        dq, dout, q, k, v, lse, Dsum, T, H, Hkv, scale);
    cudaCheckLast();
}
void attention_backward_v3(bf16* dq, bf16* dk, bf16* dv, float* Dsum, const bf16* dout, const bf16* out,
                           const float* lse, const bf16* q, const bf16* k, const bf16* v,
                           int B, int T, int H, int Hkv, int D) {
    attention_flash_check(T, D);
    if (D == 64) attention_backward_v3_d<64>(dq, dk, dv, Dsum, dout, out, lse, q, k, v, B, T, H, Hkv);
    else attention_backward_v3_d<128>(dq, dk, dv, Dsum, dout, out, lse, q, k, v, B, T, H, Hkv);
}

// ----------------------------------------------------------------------------
// dispatch: the buffers every version may use

#define NUM_VERSIONS 3

typedef struct {
    float *q, *k, *v, *out, *dout, *dq, *dk, *dv;         // fp32 tensors (versions 1, 2)
    bf16 *qh, *kh, *vh, *outh, *douth, *dqh, *dkh, *dvh;  // bf16 tensors (version 3)
    float *att, *dS;                                      // [B,H,T,T]: version 1 only
    float *lse, *Dsum;                                    // [B,H,T]: versions 2, 3
} AttnBuffers;

void attention_forward_gpu(int version, AttnBuffers* a, int B, int T, int H, int Hkv, int D) {
    switch (version) {
        case 1: attention_forward_v1(a->out, a->att, a->q, a->k, a->v, B, T, H, Hkv, D); break;
        case 2: attention_forward_v2(a->out, a->lse, a->q, a->k, a->v, B, T, H, Hkv, D); break;
        case 3: attention_forward_v3(a->outh, a->lse, a->qh, a->kh, a->vh, B, T, H, Hkv, D); break;
        default: fprintf(stderr, "Error: attention has no version %d\n", version); exit(EXIT_FAILURE);
    }
}
void attention_backward_gpu(int version, AttnBuffers* a, int B, int T, int H, int Hkv, int D) {
    switch (version) {
        case 1: attention_backward_v1(a->dq, a->dk, a->dv, a->dS, a->dout, a->att, a->q, a->k, a->v, B, T, H, Hkv, D); break;
        case 2: attention_backward_v2(a->dq, a->dk, a->dv, a->Dsum, a->dout, a->out, a->lse, a->q, a->k, a->v,
                                      B, T, H, Hkv, D); break;
        case 3: attention_backward_v3(a->dqh, a->dkh, a->dvh, a->Dsum, a->douth, a->outh, a->lse, a->qh, a->kh, a->vh,
                                      B, T, H, Hkv, D); break;
        default: fprintf(stderr, "Error: attention has no version %d\n", version); exit(EXIT_FAILURE);
    }
}

// ----------------------------------------------------------------------------
// main: validate every version against the CPU on reduced shapes, then benchmark

typedef struct { int B, T, H, Hkv, D; } AttnShape;

static void shape_name(char* s, size_t n, AttnShape c) {
    snprintf(s, n, "B%d_T%d_H%d_Hkv%d_D%d", c.B, c.T, c.H, c.Hkv, c.D);
}

// the buffers of `version` for shape c, inputs copied in (as bf16 for version 3)
static AttnBuffers attn_alloc(int version, AttnShape c, const float* q, const float* k, const float* v,
                              const float* dout) {
    size_t nq = (size_t)c.B * c.T * c.H * c.D, nkv = (size_t)c.B * c.T * c.Hkv * c.D;
    size_t nrow = (size_t)c.B * c.H * c.T;
    AttnBuffers a;
    memset(&a, 0, sizeof(a));
    if (version == 3) {
        a.qh = cuda_malloc_copy_bf16(q, nq);
        a.kh = cuda_malloc_copy_bf16(k, nkv);
        a.vh = cuda_malloc_copy_bf16(v, nkv);
        a.douth = cuda_malloc_copy_bf16(dout, nq);
        a.outh = cuda_calloc<bf16>(nq);
        a.dqh = cuda_calloc<bf16>(nq);
        a.dkh = cuda_calloc<bf16>(nkv);
        a.dvh = cuda_calloc<bf16>(nkv);
    } else {
        a.q = cuda_malloc_copy(q, nq);
        a.k = cuda_malloc_copy(k, nkv);
        a.v = cuda_malloc_copy(v, nkv);
        a.dout = cuda_malloc_copy(dout, nq);
        a.out = cuda_calloc<float>(nq);
        a.dq = cuda_calloc<float>(nq);
        a.dk = cuda_calloc<float>(nkv);
        a.dv = cuda_calloc<float>(nkv);
    }
    if (version == 1) {
        a.att = cuda_calloc<float>(nrow * c.T);
        a.dS = cuda_calloc<float>(nrow * c.T);
    }
    a.lse = cuda_calloc<float>(nrow);
    a.Dsum = cuda_calloc<float>(nrow);
    return a;
}
static void attn_free(AttnBuffers* a) {
    void* ptrs[] = {a->q, a->k, a->v, a->dout, a->out, a->dq, a->dk, a->dv, a->qh, a->kh, a->vh, a->douth, a->outh,
                    a->dqh, a->dkh, a->dvh, a->att, a->dS, a->lse, a->Dsum};
    for (size_t i = 0; i < sizeof(ptrs) / sizeof(ptrs[0]); i++) if (ptrs[i]) cudaCheck(cudaFree(ptrs[i]));
}

// lse[b,h,t] = log sum_{t2<=t} exp(q.k*scale): the CPU reference does not keep it, so it is recomputed here
static void attention_lse_cpu(float* lse, const float* q, const float* k, int B, int T, int H, int Hkv, int D) {
    float scale = 1.0f / sqrtf((float)D);
    #pragma omp parallel for collapse(3)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                int hk = h / (H / Hkv);
                const float* qt = q + (((size_t)b * T + t) * H + h) * D;
                double mx = -INFINITY, sum = 0.0;
                for (int pass = 0; pass < 2; pass++)
                    for (int t2 = 0; t2 <= t; t2++) {
                        const float* kt = k + (((size_t)b * T + t2) * Hkv + hk) * D;
                        double s = 0.0;
                        for (int i = 0; i < D; i++) s += (double)qt[i] * kt[i];
                        s *= scale;
                        if (pass == 0) mx = s > mx ? s : mx; else sum += exp(s - mx);
                    }
                lse[((size_t)b * H + h) * T + t] = (float)(mx + log(sum));
            }
}

// tolerances |gpu - cpu| <= atol + rtol |cpu|. fp32 versions: sums of up to T terms in another order.
// version 3 is compared on inputs rounded to bf16 (the CPU sees exactly what the kernel reads); its P and dS are
// rounded to bf16 before their products and its outputs are stored in bf16 (2^-9 relative each)
typedef struct { double atol_fwd, rtol_fwd, atol_bwd, rtol_bwd; } AttnTol;
static AttnTol attn_tol(int version) {
    if (version == 3) return AttnTol{1e-2, 1e-2, 2e-2, 2e-2};
    return AttnTol{1e-4, 1e-3, 5e-4, 5e-3};
}

// compare the layer's outputs (of either precision) with host references
static int attn_compare(int version, AttnBuffers* a, AttnShape c, const float* out, const float* dq, const float* dk,
                        const float* dv) {
    size_t nq = (size_t)c.B * c.T * c.H * c.D, nkv = (size_t)c.B * c.T * c.Hkv * c.D;
    AttnTol tol = attn_tol(version);
    int ok;
    if (version == 3) {
        ok = validate_result_tol(a->outh, out, "out", nq, tol.atol_fwd, tol.rtol_fwd);
        ok &= validate_result_tol(a->dqh, dq, "dq", nq, tol.atol_bwd, tol.rtol_bwd);
        ok &= validate_result_tol(a->dkh, dk, "dk", nkv, tol.atol_bwd, tol.rtol_bwd);
        ok &= validate_result_tol(a->dvh, dv, "dv", nkv, tol.atol_bwd, tol.rtol_bwd);
    } else {
        ok = validate_result_tol(a->out, out, "out", nq, tol.atol_fwd, tol.rtol_fwd);
        ok &= validate_result_tol(a->dq, dq, "dq", nq, tol.atol_bwd, tol.rtol_bwd);
        ok &= validate_result_tol(a->dk, dk, "dk", nkv, tol.atol_bwd, tol.rtol_bwd);
        ok &= validate_result_tol(a->dv, dv, "dv", nkv, tol.atol_bwd, tol.rtol_bwd);
    }
    return ok;
}

// random inputs of shape c: q, k, v, dout ~ N(0, 1) (scores q.k/sqrt(D) ~ N(0, 1)); rounded to bf16 for version 3
static void attn_inputs(int version, AttnShape c, float** q, float** k, float** v, float** dout) {
    size_t nq = (size_t)c.B * c.T * c.H * c.D, nkv = (size_t)c.B * c.T * c.Hkv * c.D;
    *q = make_random_normal(nq, 1.0f);
    *k = make_random_normal(nkv, 1.0f);
    *v = make_random_normal(nkv, 1.0f);
    *dout = make_random_normal(nq, 1.0f);
    if (version == 3) { round_to_bf16(*q, nq); round_to_bf16(*k, nkv); round_to_bf16(*v, nkv); round_to_bf16(*dout, nq); }
}

// validate `version` at shape c against train_moe.c's attention_forward / attention_backward
static int validate_case(int version, AttnShape c) {
    int B = c.B, T = c.T, H = c.H, Hkv = c.Hkv, D = c.D;
    size_t nq = (size_t)B * T * H * D, nkv = (size_t)B * T * Hkv * D, nrow = (size_t)B * H * T;
    float *q, *k, *v, *dout;
    attn_inputs(version, c, &q, &k, &v, &dout);
    float* out = make_zeros_float(nq);
    float* att = make_zeros_float(nrow * T);
    float* dq = make_zeros_float(nq);
    float* dk = make_zeros_float(nkv);
    float* dv = make_zeros_float(nkv);
    float* lse = make_zeros_float(nrow);
    attention_forward(out, att, q, k, v, B, T, H, Hkv, D);
    attention_backward(dq, dk, dv, dout, att, q, k, v, B, T, H, Hkv, D);
    attention_lse_cpu(lse, q, k, B, T, H, Hkv, D);

    char name[128];
    shape_name(name, sizeof(name), c);
    printf("attention v%d, %s:\n", version, name);
    AttnBuffers a = attn_alloc(version, c, q, k, v, dout);
    attention_forward_gpu(version, &a, B, T, H, Hkv, D);
    attention_backward_gpu(version, &a, B, T, H, Hkv, D);
    cudaCheck(cudaDeviceSynchronize());
    int ok = attn_compare(version, &a, c, out, dq, dk, dv);
    if (version == 1) ok &= validate_result_tol(a.att, att, "att", nrow * T, 1e-4, 1e-3);
    else ok &= validate_result_tol(a.lse, lse, "lse", nrow, 1e-4, 1e-4); // fp32 scores in every version
    // determinism: a second backward gives the same bits
    float* dk1 = make_zeros_float(nkv);
    if (version == 3) {
        std::vector<bf16> h(nkv);
        cuda_to_host(h.data(), a.dkh, nkv);
        for (size_t i = 0; i < nkv; i++) dk1[i] = __bfloat162float(h[i]);
        attention_backward_gpu(version, &a, B, T, H, Hkv, D);
        ok &= validate_result_tol(a.dkh, dk1, "dk (rerun)", nkv, 0.0, 0.0);
    } else {
        cuda_to_host(dk1, a.dk, nkv);
        attention_backward_gpu(version, &a, B, T, H, Hkv, D);
        ok &= validate_result_tol(a.dk, dk1, "dk (rerun)", nkv, 0.0, 0.0);
    }
    attn_free(&a);
    float* ptrs[] = {q, k, v, dout, out, att, dq, dk, dv, lse, dk1};
    for (size_t i = 0; i < sizeof(ptrs) / sizeof(ptrs[0]); i++) free(ptrs[i]);
    return ok;
}

// `version` against version 1 on the GPU, at a T too large for a quick CPU reference
static int cross_check(int version, AttnShape c) {
    int B = c.B, T = c.T, H = c.H, Hkv = c.Hkv, D = c.D;
    size_t nq = (size_t)B * T * H * D, nkv = (size_t)B * T * Hkv * D;
    float *q, *k, *v, *dout;
    attn_inputs(version, c, &q, &k, &v, &dout);
    float* ref_out = make_zeros_float(nq);
    float* ref_dq = make_zeros_float(nq);
    float* ref_dk = make_zeros_float(nkv);
    float* ref_dv = make_zeros_float(nkv);
    AttnBuffers r = attn_alloc(1, c, q, k, v, dout);
    attention_forward_gpu(1, &r, B, T, H, Hkv, D);
    attention_backward_gpu(1, &r, B, T, H, Hkv, D);
    cuda_to_host(ref_out, r.out, nq);
    cuda_to_host(ref_dq, r.dq, nq);
    cuda_to_host(ref_dk, r.dk, nkv);
    cuda_to_host(ref_dv, r.dv, nkv);
    attn_free(&r);
    AttnBuffers a = attn_alloc(version, c, q, k, v, dout);
    attention_forward_gpu(version, &a, B, T, H, Hkv, D);
    attention_backward_gpu(version, &a, B, T, H, Hkv, D);
    cudaCheck(cudaDeviceSynchronize());
    char name[128];
    shape_name(name, sizeof(name), c);
    printf("attention v%d against v1 (GPU), %s:\n", version, name);
    int ok = attn_compare(version, &a, c, ref_out, ref_dq, ref_dk, ref_dv);
    attn_free(&a);
    float* ptrs[] = {q, k, v, dout, ref_out, ref_dq, ref_dk, ref_dv};
    for (size_t i = 0; i < sizeof(ptrs) / sizeof(ptrs[0]); i++) free(ptrs[i]);
    return ok;
}

// LAB_VALIDATE_ONLY=1 skips the timed runs (validation still runs; RESULT lines then carry no time)
static int attn_benchmarks_on() {
    const char* s = getenv("LAB_VALIDATE_ONLY");
    return s == NULL || s[0] == '\0' || strcmp(s, "0") == 0;
}

static double causal_pairs(AttnShape c) { return (double)c.B * c.H * c.T * (c.T + 1) / 2.0; }

static void benchmark_case(int version, AttnShape c, int ok) {
    int B = c.B, T = c.T, H = c.H, Hkv = c.Hkv, D = c.D;
    size_t nq = (size_t)B * T * H * D, nkv = (size_t)B * T * Hkv * D;
    char name[128];
    shape_name(name, sizeof(name), c);
    LabPeak peak = version == 3 ? PEAK_BF16 : PEAK_FP32;
    if (!ok || !attn_benchmarks_on()) {
        print_result("attention_forward", version, name, ok, 0.0f, 0, 0, peak);
        print_result("attention_backward", version, name, ok, 0.0f, 0, 0, peak);
        return;
    }
    float *q, *k, *v, *dout;
    attn_inputs(version, c, &q, &k, &v, &dout);
    AttnBuffers a = attn_alloc(version, c, q, k, v, dout);
    // useful flops over the causal half: forward q.k^T and p.v (2 matmuls); backward dP, dV, dQ, dK (4 matmuls;
    // versions 2 and 3 also recompute S, and dP in their dq kernel: work done but not counted)
    double fwd_flops = 2.0 * 2.0 * causal_pairs(c) * D;
    double bwd_flops = 4.0 * 2.0 * causal_pairs(c) * D;
    double bytes = (2.0 * nq + 2.0 * nkv) * (version == 3 ? sizeof(bf16) : sizeof(float));
    float ms = benchmark_kernel(10, attention_forward_gpu, version, &a, B, T, H, Hkv, D);
    print_result("attention_forward", version, name, 1, ms, bytes, fwd_flops, peak);
    attention_forward_gpu(version, &a, B, T, H, Hkv, D);
    ms = benchmark_kernel(10, attention_backward_gpu, version, &a, B, T, H, Hkv, D);
    print_result("attention_backward", version, name, 1, ms, 2 * bytes, bwd_flops, peak);
    attn_free(&a);
    free(q); free(k); free(v); free(dout);
}

int main(int argc, char** argv) {
    lab_seed(42);
    lab_device_init();
    int want = lab_version_arg(argc, argv);
    attention_v2_setup<64>();
    attention_v2_setup<128>();
    attention_v3_setup<64>();
    attention_v3_setup<128>();
    // validation against the CPU: the paper's D = 128 (C = 1024 with 8 heads), plain and grouped-query heads,
    // and D = 64; T reduced so that the CPU reference (and its T x T matrix) stays quick
    // (T = 200 and 100 end in a partial tile)
    AttnShape val[] = {{2, 256, 8, 8, 128}, {2, 256, 8, 2, 128}, {1, 512, 4, 4, 128}, {2, 200, 8, 4, 64},
                       {1, 100, 4, 2, 128}};
    // benchmarks: a shape every version runs (N = B*T = 8192 tokens; versions 2, 3 are also checked against
    // version 1 there), then the paper's T = 4096 for versions 2 and 3: C = 1024 (H = 8) and C = 512 (H = 4)
    AttnShape common_shape = {8, 1024, 8, 8, 128};
    AttnShape full[] = {{2, 4096, 8, 8, 128}, {2, 4096, 4, 4, 128}};
    for (int version = 1; version <= NUM_VERSIONS; version++) {
        if (want && version != want) continue;
        int ok = 1;
        for (size_t i = 0; i < sizeof(val) / sizeof(val[0]); i++) ok &= validate_case(version, val[i]);
        if (version >= 2 && attn_benchmarks_on()) ok &= cross_check(version, common_shape);
        benchmark_case(version, common_shape, ok);
        if (version >= 2)
            for (size_t i = 0; i < sizeof(full) / sizeof(full[0]); i++) benchmark_case(version, full[i], ok);
    }
    return lab_exit_code();
}
