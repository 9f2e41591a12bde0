/*
Mixture-of-experts language-model training in one C file: a Mixtral-style sparse Transformer
(RMSNorm, RoPE attention with grouped-query heads, a top-k router over E SwiGLU experts), its
hand-written backward pass, AdamW, the data loader, checkpoints and the eval loop.
The math is the contract in dev/MODEL.md; dev/moe_ref.py is the independent PyTorch twin that
test_moe.c checks this file against, tensor by tensor.

The MoE layer reads as a pipeline:  router -> topk -> permute -> experts -> unpermute
Only the K chosen experts of a token are computed (dropless): every buffer of the expert path has
N*K rows (N = B*T tokens), never N*E.

Where things happen: a token is routed in moe_block_forward (line 987: router_forward, topk_forward,
permute_plan); the experts' weight gradients are formed in experts_backward (line 510); AdamW runs
in model_update (line 1231), called from training_step (line 2181); main (line 2222) is the training
loop.

Build: make train_moe          Run: ./train_moe -h
Reading map (line ranges of this file):
    51-151   utilities: checked I/O (dev/moe/utils.h), RNG, clock, vector helpers
   152-184   matmul: the reference loop, the fast GEMM (dev/moe/gemm.h)
   185-373   layers: embedding, RMSNorm, RoPE, causal attention (forward, backward)
   374-616   the MoE layer: router -> topk -> permute -> experts -> unpermute, aux and z losses
   617-675   classifier: softmax cross-entropy
   676-1190  the model: parameters, activations, forward and backward by blocks (attention, MoE)
  1191-1258  optimizer: global-norm clipping, AdamW, the lr schedule
  1259-1420  checkpoints: save, check, load
  1421-1594  data loader: token shards, shuffled or in order, exact position
  1595-1691  tokenizer (decode only) and sampler
  1692-1821  the eval loop: val loss, router diagnostics, task loss and accuracy (dev/moe/tasks.h)
  1822-2031  flags
  2032-2217  main's helpers: start, log, checkpoints, evals, one training step; GRPO (dev/moe/grpo.h)
  2218-2341  main: the training loop
*/
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <errno.h>
#include <stdarg.h>
#include <glob.h>
#include <unistd.h>
#include <sys/stat.h>
#include <dirent.h>
#ifdef OMP
#include <omp.h>
#endif

// ----------------------------------------------------------------------------
// utilities: checked I/O and allocation, RNG, clock

// fopenCheck, freadCheck, mallocCheck, callocCheck: exit with an error naming the file or the size;
// read_error, fopen_report, fread_report: the file readers' report-and-return; file_size; mkdir_p
#include "dev/moe/utils.h"

// splitmix64: small, fast, and its whole state is one uint64 (easy to checkpoint)
static uint64_t rng_u64(uint64_t* state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static float rng_f32(uint64_t* state) { return (rng_u64(state) >> 40) / 16777216.0f; } // [0,1)
static float rng_normal(uint64_t* state) {
    float u1 = ((rng_u64(state) >> 40) + 1.0f) / 16777217.0f; // (0,1]
    float u2 = rng_f32(state);
    return sqrtf(-2.0f * logf(u1)) * cosf(2.0f * (float)M_PI * u2);
}
static uint64_t hash3(uint64_t a, uint64_t b, uint64_t c) {
    uint64_t s = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull) * 0xD6E8FEB86659FD93ull ^ c;
    rng_u64(&s);
    return rng_u64(&s);
}
// Fisher-Yates permutation of 0..n-1 from a seed
static void random_permutation(int* perm, int n, uint64_t seed) {
    for (int i = 0; i < n; i++) perm[i] = i;
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(rng_u64(&seed) % (uint64_t)(i + 1));
        int t = perm[i]; perm[i] = perm[j]; perm[j] = t;
    }
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

#include "dev/moe/profile.h" // -pf: where a step's time goes (phase_mark in forward and backward)


// dot product with 16 running partial sums: the compiler turns it into vector code (a plain
// `s += a[i]*b[i]` is a serial chain it may not reorder). Fixed order, so deterministic.
static inline float vdot(const float* a, const float* b, int n) {
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += acc[j];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline float vsum(const float* a, int n) {
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j];
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += acc[j];
    for (; i < n; i++) s += a[i];
    return s;
}
static inline float vmax(const float* a, int n) {
    float acc[16];
    for (int j = 0; j < 16; j++) acc[j] = -INFINITY;
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] = a[i + j] > acc[j] ? a[i + j] : acc[j];
    float m = -INFINITY;
    for (int j = 0; j < 16; j++) m = acc[j] > m ? acc[j] : m;
    for (; i < n; i++) m = a[i] > m ? a[i] : m;
    return m;
}
// exp(x) without branches or calls, so loops over it vectorise (libm's expf does not, here):
// x = n*ln2 + r with |r| <= ln2/2, exp(r) by Cephes' degree-6 polynomial, 2^n put in the exponent bits.
// Relative error ~2e-7 (a few ulp); inputs are clamped to [-87, 88] (exp(-87) ~ 1.6e-38 stands for 0).
static inline float vexpf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    // + 1.5*2^23 rounds x/ln2 to an integer in t's low bits
    float t = x * 1.44269504088896341f + 12582912.0f;
    float n = t - 12582912.0f;
    int32_t ti;
    memcpy(&ti, &t, 4);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f; // x - n*ln2 in two parts
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = (ti - 0x4B400000 + 127) << 23;       // 2^n
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

// ----------------------------------------------------------------------------
// matmul: every product of the model is c[M,N] (= or +=) A.B with strided operands,
//   A(i,k) = a[i*sai + k*sak], B(k,j) = b[k*sbk + j*sbj]
// so one routine serves x.W^T (forward), dy.W (input gradient) and dy^T.x (weight gradient).

// The definition, as a plain loop summed in double precision. The trainer never calls it: it is
// what the fast routines below are tested against (test_moe.c, test_gemm).
void matmul_reference(double* c, const float* a, const float* b, int M, int N, int K,
                      size_t sai, size_t sak, size_t sbk, size_t sbj, int accumulate) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = accumulate ? c[(size_t)i * N + j] : 0.0;
            for (int k = 0; k < K; k++) s += (double)a[i * sai + k * sak] * b[k * sbk + j * sbj];
            c[(size_t)i * N + j] = s;
        }
}

// The same products, fast: gemm (one product), gemm_grouped (many, e.g. one per expert) and
// gemm_serial (on the calling thread, for attention) in packed, cache-blocked form, or through
// cblas_sgemm in USE_BLAS=1 builds.
#include "dev/moe/gemm.h"

// out[N,OC] = inp[N,IC] . weight[OC,IC]^T
void matmul_forward(float* out, const float* inp, const float* weight, int N, int IC, int OC) {
    gemm(out, inp, weight, N, OC, IC, IC, 1, 1, IC, 0);
}
// dinp[N,IC] += dout[N,OC] . weight[OC,IC];  dweight[OC,IC] += dout^T . inp
void matmul_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                     const float* weight, int N, int IC, int OC) {
    if (dinp) gemm(dinp, dout, weight, N, IC, OC, OC, 1, IC, 1, 1);
    gemm(dweight, dout, inp, OC, IC, N, 1, OC, IC, 1, 1);
}

// ----------------------------------------------------------------------------
// layers: embedding, RMSNorm, RoPE, attention

// out[N,C] = wte[tokens[n], :]
void encoder_forward(float* out, const int* tokens, const float* wte, int N, int C) {
    for (int n = 0; n < N; n++)
        memcpy(out + (size_t)n * C, wte + (size_t)tokens[n] * C, C * sizeof(float));
}
// Threads split the channels, 16 at a time; each adds its channels over the tokens in token order,
// so repeated tokens add in a fixed order and the result does not depend on the thread count.
void encoder_backward(float* dwte, const float* dout, const int* tokens, int N, int C) {
    #pragma omp parallel for
    for (int c0 = 0; c0 < C; c0 += 16) {
        int c1 = c0 + 16 < C ? c0 + 16 : C;
        for (int n = 0; n < N; n++) {
            float* dw = dwte + (size_t)tokens[n] * C;
            const float* d = dout + (size_t)n * C;
            for (int c = c0; c < c1; c++) dw[c] += d[c];
        }
    }
}

// out[N,C] = inp / sqrt(mean(inp^2) + eps) * w ; rstd[N] saved for the backward
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C,
                     float eps) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C;
        float r = 1.0f / sqrtf(vdot(x, x, C) / C + eps);
        float* o = out + (size_t)n * C;
        for (int c = 0; c < C; c++) o[c] = x[c] * r * w[c];
        rstd[n] = r;
    }
}
// dinp[N,C] += d/dinp ; dw[C] += sum_n dout * inp * rstd
void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                      const float* rstd, int N, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C;
        const float* dy = dout + (size_t)n * C;
        float r = rstd[n];
        float dot = 0.0f; // sum_c dy*w*x
        for (int c = 0; c < C; c++) dot += dy[c] * w[c] * x[c];
        float k = dot * r * r * r / C;
        float* dx = dinp + (size_t)n * C;
        for (int c = 0; c < C; c++) dx[c] += dy[c] * w[c] * r - x[c] * k;
    }
    #pragma omp parallel for // channels split as in encoder_backward: each sums over tokens in order
    for (int c0 = 0; c0 < C; c0 += 16) {
        int c1 = c0 + 16 < C ? c0 + 16 : C;
        for (int n = 0; n < N; n++) {
            const float* x = inp + (size_t)n * C;
            const float* dy = dout + (size_t)n * C;
            float r = rstd[n];
            for (int c = c0; c < c1; c++) dw[c] += dy[c] * x[c] * r;
        }
    }
}

// rotate-half RoPE in place on x[B,T,NH,D]; dir = +1 forward, -1 backward (the inverse rotation)
void rope_apply(float* x, const float* freqs_cos, const float* freqs_sin, int B, int T, int NH,
                int D, int dir) {
    int half = D / 2;
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float* fc = freqs_cos + (size_t)t * half;
            const float* fs = freqs_sin + (size_t)t * half;
            for (int h = 0; h < NH; h++) {
                float* v = x + (((size_t)b * T + t) * NH + h) * D;
                for (int i = 0; i < half; i++) {
                    float c = fc[i], s = dir * fs[i];
                    float x0 = v[i], x1 = v[i + half];
                    v[i] = x0 * c - x1 * s;
                    v[i + half] = x1 * c + x0 * s;
                }
            }
        }
}
// cos/sin tables [T, D/2]: angle = t * theta^(-2i/D)
void rope_tables(float* fcos, float* fsin, int T, int D, float theta) {
    for (int t = 0; t < T; t++)
        for (int i = 0; i < D / 2; i++) {
            double w = pow((double)theta, -2.0 * i / D);
            fcos[t * (D / 2) + i] = (float)cos(t * w);
            fsin[t * (D / 2) + i] = (float)sin(t * w);
        }
}

// Attention per (batch, head) is a few small products on the thread that owns the head (gemm_serial),
// skipping what the causal mask makes zero (its modes CAUSAL_TILES, K_UPTO_ROW, K_FROM_ROW).

// per-thread scratch of attention: apack, bpack for gemm_serial on T x D operands, and a T x T block
static float* attention_scratch(int T, int D, float** apack, float** bpack, float** tt) {
    size_t pa = (size_t)GEMM_MR * (T > D ? T : D);
    size_t pb1 = (size_t)(T + GEMM_NR - 1) / GEMM_NR * GEMM_NR * D,
           pb2 = (size_t)(D + GEMM_NR - 1) / GEMM_NR * GEMM_NR * T;
    size_t pb = pb1 > pb2 ? pb1 : pb2;
    float* mem = (float*)mallocCheck((pa + pb + (tt ? (size_t)T * T : 0)) * sizeof(float));
    *apack = mem;
    *bpack = mem + pa;
    if (tt) *tt = mem + pa + pb;
    return mem;
}

// causal attention with grouped-query heads: q, out [B,T,H,D]; k, v [B,T,Hkv,D]; att [B,H,T,T] keeps
// the probabilities (zero above the diagonal) for the backward. Query head h reads kv head h/(H/Hkv).
void attention_forward(float* out, float* att, const float* q, const float* k, const float* v,
                       int B, int T, int H, int Hkv, int D) {
    float scale = 1.0f / sqrtf((float)D);
    int group = H / Hkv;
    size_t HD = (size_t)H * D, KD = (size_t)Hkv * D;
    #pragma omp parallel
    {
        float *apack, *bpack;
        float* mem = attention_scratch(T, D, &apack, &bpack, NULL);
        #pragma omp for collapse(2)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++) { // seek to q[b,:,h,:], k and v [b,:,h/group,:], att[b,h]
                const float* qb = q + (size_t)b * T * HD + (size_t)h * D;
                const float* kb = k + (size_t)b * T * KD + (size_t)(h / group) * D;
                const float* vb = v + (size_t)b * T * KD + (size_t)(h / group) * D;
                float* p = att + ((size_t)b * H + h) * T * T;
                // scores S = Q.K^T on and below the diagonal
                gemm_serial(p, T, qb, HD, 1, kb, 1, KD, T, T, D, CAUSAL_TILES, 0, apack, bpack);
                for (int t = 0; t < T; t++) { // P = softmax(scale * S) over t2 <= t, zero beyond
                    float* pt = p + (size_t)t * T;
                    float maxv = vmax(pt, t + 1);
                    for (int t2 = 0; t2 <= t; t2++) pt[t2] = vexpf((pt[t2] - maxv) * scale);
                    float inv = 1.0f / vsum(pt, t + 1);
                    for (int t2 = 0; t2 <= t; t2++) pt[t2] *= inv;
                    for (int t2 = t + 1; t2 < T; t2++) pt[t2] = 0.0f;
                }
                // out = P.V
                gemm_serial(out + (size_t)b * T * HD + (size_t)h * D, HD, p, T, 1, vb, KD, 1, T, D,
                            T, K_UPTO_ROW, 0, apack, bpack);
            }
        free(mem);
    }
}
// gradients into dq, dk, dv (all overwritten). Parallel over (b, kv head): the query heads sharing a
// kv head add into its dk/dv in a fixed order, so the bits do not depend on the thread count.
//   dP = dO.V^T   dS = P * (dP - rowsum(P * dP)) * scale   dQ = dS.K   dK += dS^T.Q   dV += P^T.dO
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* att,
                        const float* q, const float* k, const float* v, int B, int T, int H,
                        int Hkv, int D) {
    float scale = 1.0f / sqrtf((float)D);
    int group = H / Hkv;
    size_t HD = (size_t)H * D, KD = (size_t)Hkv * D;
    #pragma omp parallel
    {
        float *apack, *bpack, *ds;
        float* mem = attention_scratch(T, D, &apack, &bpack, &ds);
        #pragma omp for collapse(2)
        for (int b = 0; b < B; b++)
            for (int hk = 0; hk < Hkv; hk++) {
                const float* kb = k + (size_t)b * T * KD + (size_t)hk * D;
                const float* vb = v + (size_t)b * T * KD + (size_t)hk * D;
                float* dkb = dk + (size_t)b * T * KD + (size_t)hk * D;
                float* dvb = dv + (size_t)b * T * KD + (size_t)hk * D;
                for (int h = hk * group; h < (hk + 1) * group; h++) {
                    const float* p = att + ((size_t)b * H + h) * T * T;
                    const float* dob = dout + (size_t)b * T * HD + (size_t)h * D;
                    const float* qb = q + (size_t)b * T * HD + (size_t)h * D;
                    gemm_serial(ds, T, dob, HD, 1, vb, 1, KD, T, T, D, CAUSAL_TILES, 0, apack,
                                bpack); // dP
                    for (int t = 0; t < T; t++) {
                        // dS through the softmax and the scale, zero above the diagonal
                        const float* pt = p + (size_t)t * T;
                        float* dst = ds + (size_t)t * T;
                        float pdp = vdot(pt, dst, t + 1);
                        for (int t2 = 0; t2 <= t; t2++) dst[t2] = pt[t2] * (dst[t2] - pdp) * scale;
                        for (int t2 = t + 1; t2 < T; t2++) dst[t2] = 0.0f;
                    }
                    gemm_serial(dq + (size_t)b * T * HD + (size_t)h * D, HD, ds, T, 1, kb, KD, 1, T,
                                D, T, K_UPTO_ROW, 0, apack, bpack);
                    // the first head of the group writes dK, dV; the others add
                    int first = h == hk * group;
                    gemm_serial(dkb, KD, ds, 1, T, qb, HD, 1, T, D, T, K_FROM_ROW, !first, apack,
                                bpack);
                    gemm_serial(dvb, KD, p, 1, T, dob, HD, 1, T, D, T, K_FROM_ROW, !first, apack,
                                bpack);
                }
            }
        free(mem);
    }
}

// ----------------------------------------------------------------------------
// the MoE layer: router -> topk -> permute -> experts -> unpermute, and the auxiliary losses

// router logits z[N,E] = m[N,C] . wr[E,C]^T (fp32) and their logsumexp lse[N]
void router_forward(float* z, float* lse, const float* m, const float* wr, int N, int C, int E) {
    matmul_forward(z, m, wr, N, C, E);
    for (int n = 0; n < N; n++) {
        const float* zn = z + (size_t)n * E;
        float mx = zn[0];
        for (int e = 1; e < E; e++) if (zn[e] > mx) mx = zn[e];
        float s = 0.0f;
        for (int e = 0; e < E; e++) s += expf(zn[e] - mx);
        lse[n] = mx + logf(s);
    }
}

// the K largest router logits of each token (larger first; equal logits: the lower expert index
// first) and their gates (softmax over those K). A NaN logit counts as -inf, so an index is always
// chosen; returns the number of tokens whose logits are not all finite, which the caller turns into
// an error (router_check).
int topk_forward(int* topi, float* gate, const float* z, int N, int E, int K) {
    int nonfinite = 0;
    #pragma omp parallel for reduction(+:nonfinite)
    for (int n = 0; n < N; n++) {
        const float* zn = z + (size_t)n * E;
        int* ti = topi + (size_t)n * K;
        int finite = 1;
        for (int e = 0; e < E; e++) finite &= isfinite(zn[e]) != 0;
        nonfinite += !finite;
        for (int j = 0; j < K; j++) { // selection: j-th pass takes the best expert not yet taken
            int best = -1;
            float bestz = 0.0f;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int jj = 0; jj < j; jj++) if (ti[jj] == e) { taken = 1; break; }
                if (taken) continue;
                float ze = isnan(zn[e]) ? -INFINITY : zn[e];
                // strict '>' keeps the lower index on ties
                if (best < 0 || ze > bestz) { best = e; bestz = ze; }
            }
            ti[j] = best;
        }
        float* g = gate + (size_t)n * K;
        float mx = zn[ti[0]], s = 0.0f;
        for (int j = 0; j < K; j++) { g[j] = expf(zn[ti[j]] - mx); s += g[j]; }
        for (int j = 0; j < K; j++) g[j] /= s;
    }
    return nonfinite;
}

// group the N*K token slots by expert (counting sort: within an expert, by token order).
// counts[E], offs[E+1] (row range of expert e), row_of[n*K+j] = row of slot j of token n,
// tok_of[row] = token of that row
void permute_plan(int* counts, int* offs, int* row_of, int* tok_of, const int* topi, int N, int E,
                  int K) {
    for (int e = 0; e < E; e++) counts[e] = 0;
    for (int s = 0; s < N * K; s++) counts[topi[s]]++;
    offs[0] = 0;
    for (int e = 0; e < E; e++) offs[e + 1] = offs[e] + counts[e];
    int* fill = (int*)mallocCheck((size_t)E * sizeof(int));
    memcpy(fill, offs, E * sizeof(int));
    for (int s = 0; s < N * K; s++) {
        int row = fill[topi[s]]++;
        row_of[s] = row;
        tok_of[row] = s / K;
    }
    free(fill);
}
// xe[NK,C] = m[tok_of[row], :]: tokens into expert-contiguous rows
void permute_forward(float* xe, const float* m, const int* tok_of, int NK, int C) {
    #pragma omp parallel for
    for (int r = 0; r < NK; r++)
        memcpy(xe + (size_t)r * C, m + (size_t)tok_of[r] * C, C * sizeof(float));
}
// dm[n,:] += sum_j dxe[row_of[n,j], :]  (a token's K slots add in slot order)
void permute_backward(float* dm, const float* dxe, const int* row_of, int N, int K, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++)
        for (int j = 0; j < K; j++) {
            const float* d = dxe + (size_t)row_of[n * K + j] * C;
            float* o = dm + (size_t)n * C;
            for (int c = 0; c < C; c++) o[c] += d[c];
        }
}

// the experts: rows offs[e]..offs[e+1] of xe[NK,C] belong to expert e (counting-sort order).
// h1 = x.w1^T, h3 = x.w3^T, act = silu(h1) * h3, ye = act.w2^T, each product one grouped GEMM over
// the experts that got rows (an expert with none costs nothing)
static int expert_problems(GemmProblem* p, const int* offs, int E, float* c, size_t c_row,
                           const float* a, size_t a_row, const float* b, size_t b_expert, int N,
                           int K) {
    int g = 0;
    for (int e = 0; e < E; e++) {
        int r0 = offs[e], n = offs[e + 1] - offs[e];
        if (n == 0) continue;
        GemmProblem q = {
                c + (size_t)r0 * c_row, a + (size_t)r0 * a_row, b + (size_t)e * b_expert, n, N, K};
        p[g++] = q;
    }
    return g;
}

// the weight gradients of the experts that got rows: dw_e[M,N] += dy_e^T . x_e, summed over the n_e
// rows
static int expert_wgrad_problems(GemmProblem* p, const int* offs, int E, float* dw, const float* dy,
                                 size_t dy_row, const float* x, size_t x_row, int M, int N) {
    int g = 0;
    for (int e = 0; e < E; e++) {
        int r0 = offs[e], n = offs[e + 1] - offs[e];
        if (n == 0) continue;
        GemmProblem q = {
                dw + (size_t)e * M * N, dy + (size_t)r0 * dy_row, x + (size_t)r0 * x_row, M, N, n};
        p[g++] = q;
    }
    return g;
}

void experts_forward(float* ye, float* h1, float* h3, float* act, const float* xe, const float* w1,
                     const float* w3, const float* w2, const int* offs, int E, int C, int F) {
    GemmProblem* p = (GemmProblem*)callocCheck(2 * (size_t)E, sizeof(GemmProblem));
    // h1 and h3 of every expert: c[n,F] = x[n,C] . w[F,C]^T
    int g = expert_problems(p, offs, E, h1, F, xe, C, w1, (size_t)F * C, F, C);
    g += expert_problems(p + g, offs, E, h3, F, xe, C, w3, (size_t)F * C, F, C);
    gemm_grouped(p, g, C, 1, 1, C, 0);
    size_t n = (size_t)offs[E] * F;
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float x = h1[i];
        act[i] = x / (1.0f + vexpf(-x)) * h3[i];
    }
    // ye[n,C] = act[n,F] . w2[C,F]^T
    g = expert_problems(p, offs, E, ye, C, act, F, w2, (size_t)C * F, C, F);
    gemm_grouped(p, g, F, 1, 1, F, 0);
    free(p);
}
// given dye[NK,C]: dxe[NK,C] (=), dw1,dw3,dw2 (+=); dact, dh1, dh3 are scratch [NK,F]
void experts_backward(float* dxe, float* dw1, float* dw3, float* dw2, float* dact, float* dh1,
                      float* dh3, const float* dye, const float* xe, const float* h1,
                      const float* h3, const float* act, const float* w1, const float* w3,
                      const float* w2, const int* offs, int E, int C, int F) {
    GemmProblem* p = (GemmProblem*)callocCheck(2 * (size_t)E, sizeof(GemmProblem));
    // dact[n,F] = dy[n,C] . w2[C,F]
    int g = expert_problems(p, offs, E, dact, F, dye, C, w2, (size_t)C * F, F, C);
    gemm_grouped(p, g, C, 1, F, 1, 0);
    g = expert_wgrad_problems(p, offs, E, dw2, dye, C, act, F, C, F); // dw2[C,F] += dy^T . act
    gemm_grouped(p, g, 1, C, F, 1, 1);
    size_t n = (size_t)offs[E] * F;
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float x = h1[i];
        float sg = 1.0f / (1.0f + vexpf(-x));
        float silu = x * sg;
        dh3[i] = dact[i] * silu;
        dh1[i] = dact[i] * h3[i] * sg * (1.0f + x * (1.0f - sg));
    }
    // dx[n,C] = dh1[n,F] . w1[F,C] + dh3 . w3
    g = expert_problems(p, offs, E, dxe, C, dh1, F, w1, (size_t)F * C, C, F);
    gemm_grouped(p, g, F, 1, C, 1, 0);
    g = expert_problems(p, offs, E, dxe, C, dh3, F, w3, (size_t)F * C, C, F);
    gemm_grouped(p, g, F, 1, C, 1, 1);
    // dw1[F,C] += dh1^T . x and dw3 alike
    g = expert_wgrad_problems(p, offs, E, dw1, dh1, F, xe, C, F, C);
    g += expert_wgrad_problems(p + g, offs, E, dw3, dh3, F, xe, C, F, C);
    gemm_grouped(p, g, 1, F, C, 1, 1);
    free(p);
}

// combine: out[n,:] = res[n,:] + sum_j gate[n,j] * ye[row_of[n,j], :]
void unpermute_forward(float* out, const float* res, const float* ye, const float* gate,
                       const int* row_of, int N, int K, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float* o = out + (size_t)n * C;
        memcpy(o, res + (size_t)n * C, C * sizeof(float));
        for (int j = 0; j < K; j++) {
            float g = gate[n * K + j];
            const float* y = ye + (size_t)row_of[n * K + j] * C;
            for (int c = 0; c < C; c++) o[c] += g * y[c];
        }
    }
}
// dye[row,:] = gate * dout[n,:]; dgate[n,j] = <dout[n,:], ye[row,:]>
void unpermute_backward(float* dye, float* dgate, const float* dout, const float* ye, const float* gate,
                        const int* row_of, int N, int K, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* d = dout + (size_t)n * C;
        for (int j = 0; j < K; j++) {
            int row = row_of[n * K + j];
            const float* y = ye + (size_t)row * C;
            float* dy = dye + (size_t)row * C;
            float g = gate[n * K + j], dot = 0.0f;
            for (int c = 0; c < C; c++) { dy[c] = g * d[c]; dot += d[c] * y[c]; }
            dgate[n * K + j] = dot;
        }
    }
}

// aux_l = E * sum_e f_e * P_e  (f_e = counts_e/(Nc*K), no gradient; P_e = mean_n softmax(z_n)_e)
// zl_l = mean_n lse_n^2. counts are over Nc tokens: this batch's N, or across processes the whole
// batch of every rank (f global, as Megatron-Core's load balancing; P and zl stay this rank's means)
void router_losses(float* aux, float* zl, const float* z, const float* lse, const int* counts,
                   int Nc, int N, int E, int K) {
    double* P = (double*)callocCheck(E, sizeof(double));
    double zs = 0.0;
    for (int n = 0; n < N; n++) {
        const float* zn = z + (size_t)n * E;
        for (int e = 0; e < E; e++) P[e] += expf(zn[e] - lse[n]);
        zs += (double)lse[n] * lse[n];
    }
    double a = 0.0;
    for (int e = 0; e < E; e++) a += ((double)counts[e] / ((double)Nc * K)) * (P[e] / N);
    *aux = (float)(E * a);
    *zl = (float)(zs / N);
    free(P);
}
// dz[N,E] (=) from the gates (dgate), the aux loss (scaled by daux) and the z-loss (scaled by dzl);
// counts over Nc tokens as in router_losses
void router_backward(float* dz, const float* dgate, const float* z, const float* lse,
                     const int* topi, const float* gate, const int* counts, int Nc, float daux,
                     float dzl, int N, int E, int K) {
    float* f = (float*)mallocCheck((size_t)E * sizeof(float));
    for (int e = 0; e < E; e++) f[e] = (float)counts[e] / ((float)Nc * K);
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* zn = z + (size_t)n * E;
        float* d = dz + (size_t)n * E;
        float fp = 0.0f; // sum_e f_e p_e
        for (int e = 0; e < E; e++) fp += f[e] * expf(zn[e] - lse[n]);
        for (int e = 0; e < E; e++) {
            float p = expf(zn[e] - lse[n]);
            d[e] = daux * E / N * p * (f[e] - fp) + dzl * 2.0f / N * lse[n] * p;
        }
        // gates are a softmax over the chosen logits: dz_j = g_j (dg_j - sum_i g_i dg_i)
        const float* g = gate + (size_t)n * K;
        const float* dg = dgate + (size_t)n * K;
        float gdg = 0.0f;
        for (int j = 0; j < K; j++) gdg += g[j] * dg[j];
        for (int j = 0; j < K; j++) d[topi[n * K + j]] += g[j] * (dg[j] - gdg);
    }
    free(f);
}

// ----------------------------------------------------------------------------
// classifier: softmax cross-entropy with an ignore index (target -1)

// losses[N] = -log softmax(logits[n])[target] (0 where ignored); probs[N,V] = softmax(logits), kept
// for the backward. Returns the mean over counted targets.
// With dloss > 0 the same pass also does crossentropy_backward(probs, targets, NULL, dloss, N, V):
// probs become the dlogits of dloss * mean ce. Each element gets the same two roundings in the same
// order (x inv, then x scale), so the result is bit for bit that of the two calls, with one pass
// less over the N x V logits (the training step's; evals and GRPO keep the probabilities).
float crossentropy_forward(float* losses, float* probs, const float* logits, const int* targets,
                           int N, int V, float dloss) {
    int counted = 0;
    for (int n = 0; n < N; n++) counted += targets[n] >= 0;
    float mean_scale = counted ? dloss / counted : 0.0f;
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* l = logits + (size_t)n * V;
        float* p = probs + (size_t)n * V;
        float mx = vmax(l, V);
        float acc[16] = {0}; // exp and vsum's 16-lane sum in one pass, in vsum's order
        int i = 0;
        for (; i + 16 <= V; i += 16)
            for (int j = 0; j < 16; j++) { p[i + j] = vexpf(l[i + j] - mx); acc[j] += p[i + j]; }
        float s = 0.0f;
        for (int j = 0; j < 16; j++) s += acc[j];
        for (; i < V; i++) { p[i] = vexpf(l[i] - mx); s += p[i]; }
        float inv = 1.0f / s;
        losses[n] = targets[n] < 0 ? 0.0f : mx + logf(s) - l[targets[n]];
        if (dloss <= 0.0f) {
            for (int k = 0; k < V; k++) p[k] *= inv;
        } else if (targets[n] < 0) {
            memset(p, 0, V * sizeof(float));
        } else {
            for (int k = 0; k < V; k++) { float q = p[k] * inv; p[k] = q * mean_scale; }
            p[targets[n]] -= mean_scale;
        }
    }
    double sum = 0.0;
    for (int n = 0; n < N; n++) if (targets[n] >= 0) sum += losses[n];
    return counted ? (float)(sum / counted) : 0.0f;
}
// in place: probs[N,V] becomes dlogits = dloss * (softmax - onehot) / counted; zero rows for
// ignored targets. With per-token weights (GRPO's objective), token n's loss enters as weights[n] *
// loss_n instead of loss_n / counted: dlogits = dloss * weights[n] * (softmax - onehot).
void crossentropy_backward(float* probs, const int* targets, const float* weights, float dloss,
                           int N, int V) {
    int counted = 0;
    for (int n = 0; n < N; n++) counted += targets[n] >= 0;
    float mean_scale = counted ? dloss / counted : 0.0f;
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float* d = probs + (size_t)n * V;
        if (targets[n] < 0) { memset(d, 0, V * sizeof(float)); continue; }
        float scale = weights ? dloss * weights[n] : mean_scale;
        for (int i = 0; i < V; i++) d[i] *= scale;
        d[targets[n]] -= scale;
    }
}

// ----------------------------------------------------------------------------
// the model: configuration, parameters (one block), activations (one block), forward, backward

typedef struct {
    int V, T, L, C, H, Hkv, E, K, F; // T: the sequence length it was built for
    float theta, eps, aux_coef, z_coef;
} MoEConfig;

#define NUM_PARAM_TENSORS 13
typedef struct {
    float *wte, *attn_norm, *wq, *wk, *wv, *wo, *moe_norm, *wr, *w1, *w3, *w2, *final_norm, *lm_head;
} ParamTensors;
const char* param_names[NUM_PARAM_TENSORS] = {
    "wte", "attn_norm", "wq", "wk", "wv", "wo", "moe_norm", "wr", "w1", "w3", "w2", "final_norm", "lm_head"};
static const int param_is_matrix[NUM_PARAM_TENSORS] = {1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1};

void fill_param_sizes(size_t* s, const MoEConfig* c) {
    size_t L = c->L, C = c->C, D = c->C / c->H, HD = c->H * D, KD = c->Hkv * D, E = c->E, F = c->F,
           V = c->V;
    s[0] = V * C;          // wte
    s[1] = L * C;          // attn_norm
    s[2] = L * HD * C;     // wq
    s[3] = L * KD * C;     // wk
    s[4] = L * KD * C;     // wv
    s[5] = L * C * HD;     // wo
    s[6] = L * C;          // moe_norm
    s[7] = L * E * C;      // wr
    s[8] = L * E * F * C;  // w1
    s[9] = L * E * F * C;  // w3
    s[10] = L * E * C * F; // w2
    s[11] = C;             // final_norm
    s[12] = V * C;         // lm_head
}
static void point_params(ParamTensors* p, float* mem, const size_t* sizes) {
    float** ptrs[NUM_PARAM_TENSORS] = {&p->wte, &p->attn_norm,  &p->wq,     &p->wk, &p->wv,
                                       &p->wo,  &p->moe_norm,   &p->wr,     &p->w1, &p->w3,
                                       &p->w2,  &p->final_norm, &p->lm_head};
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) { *ptrs[i] = mem; mem += sizes[i]; }
}

// activations kept for the backward pass, for at most B*T = N tokens. Per layer l (outermost):
#define NUM_ACT_TENSORS 20
typedef struct {
    float* resid;    // (L+1) x N x C   input of each layer, then the last layer's output
    float* resid_mid;// L x N x C       after attention
    float* a;        // L x N x C       attn rmsnorm output
    float* a_rstd;   // L x N
    float* q;        // L x N x H*D     after RoPE
    float* k;        // L x N x Hkv*D   after RoPE
    float* v;        // L x N x Hkv*D
    float* att;      // L x B x H x T x T
    float* atty;     // L x N x H*D     attention output before wo
    float* m;        // L x N x C       moe rmsnorm output
    float* m_rstd;   // L x N
    float* z;        // L x N x E       router logits (fp32)
    float* lse;      // L x N           logsumexp of z
    float* gate;     // L x N x K
    float* xe;       // L x NK x C      tokens permuted into expert-contiguous rows
    float* h1;       // L x NK x F      w1 . xe
    float* h3;       // L x NK x F      w3 . xe
    float* act;      // L x NK x F      silu(h1) * h3
    float* ye;       // L x NK x C      expert outputs
    float* xf;       // N x C           final rmsnorm output   (+ f_rstd, logits, losses below)
} ActTensors;

typedef struct {
    MoEConfig config;
    ParamTensors params, grads, m_state, v_state;
    size_t param_sizes[NUM_PARAM_TENSORS];
    size_t num_params;
    float *params_memory, *grads_memory, *m_memory, *v_memory;
    // activations
    int maxB, maxT;   // allocated for B*T <= maxB*maxT and T <= maxT
    int B, T;         // of the last forward
    ActTensors acts;
    float* acts_memory;
    float *f_rstd, *logits, *losses;
    int *topi, *counts, *offs, *row_of, *tok_of; // L x N x K, L x E, L x (E+1), L x NK, L x NK
    float *freqs_cos, *freqs_sin;
    // backward scratch (one layer at a time)
    float *dres, *dbuf, *dq, *dk, *dv, *datty, *dz, *dgate, *dxe, *dye, *dact, *dh1, *dh3, *dlogits;
    // results of the last forward
    const int* inputs;
    const int* targets;
    float ce, loss;
    float *aux, *zl; // L each
    int step;        // the step being trained (1-based, as printed), for error messages; -1: none
    const float* token_weights; // NULL: the backward is of the mean ce; else of sum_n w[n]*ce_n (GRPO)
    // > 0: model_forward with targets also writes the dlogits of model_backward(fused_dloss)
    float fused_dloss;
    // the fused_dloss of the last forward (0: none): model_backward skips crossentropy_backward
    float dlogits_dloss;
    // across processes (dev/moe/dist.h); one process holds every expert and takes no part in a
    // collective
    int E_local, e_first; // the experts of each layer held here: [e_first, e_first + E_local)
    // 1: forward and backward are one rank's part of a step of every rank (all take part)
    int collective;
    int* gcounts;         // L x E  the expert counts over every rank's tokens (collective steps)
    // E_local < E (expert parallel): the counts and rows the ranks exchange; else NULL
    struct EpBuffers* ep;
} Model;

// what is wrong with a configuration (NULL: nothing); msg holds the text
static const char* model_config_error(const MoEConfig* c, char* msg, size_t n) {
    const int big = 1 << 24;
    msg[0] = 0;
    if (c->V <= 0 || c->T <= 0 || c->L <= 0 || c->C <= 0 || c->H <= 0 || c->Hkv <= 0 || c->E <= 0 ||
        c->K <= 0 || c->F <= 0)
        snprintf(msg, n, "every size must be positive (V=%d T=%d L=%d C=%d H=%d Hkv=%d E=%d K=%d F=%d)",
                 c->V, c->T, c->L, c->C, c->H, c->Hkv, c->E, c->K, c->F);
    else if (c->V > big || c->T > big || c->L > big || c->C > big || c->E > big || c->F > big)
        snprintf(msg, n, "a size above %d (V=%d T=%d L=%d C=%d E=%d F=%d)", big, c->V, c->T, c->L,
                 c->C, c->E, c->F);
    else if ((double)c->L * c->E * c->C * c->F * 3 + (double)c->V * c->C * 2 +
                     (double)c->L * c->C * c->C * 4 >
             1e12)
        snprintf(msg, n, "more than 10^12 parameters (L=%d C=%d E=%d F=%d V=%d)", c->L, c->C, c->E,
                 c->F, c->V);
    else if (c->K > c->E)
        snprintf(msg, n, "K=%d experts per token exceeds E=%d experts (flags -nk, -ne)", c->K,
                 c->E);
    else if (c->C % c->H)
        snprintf(msg, n, "C=%d is not divisible by H=%d heads (flags -nc, -nh)", c->C, c->H);
    else if (c->H % c->Hkv)
        snprintf(msg, n, "H=%d is not divisible by Hkv=%d kv heads (flags -nh, -nkv)", c->H,
                 c->Hkv);
    else if ((c->C / c->H) % 2)
        snprintf(msg, n, "head size D=C/H=%d must be even for RoPE (flags -nc, -nh)", c->C / c->H);
    else if (!(c->eps > 0) || !(c->theta > 0) || !isfinite(c->eps) || !isfinite(c->theta))
        snprintf(msg, n, "eps and theta must be positive and finite");
    else if (!(c->aux_coef >= 0) || !(c->z_coef >= 0) || !isfinite(c->aux_coef) || !isfinite(c->z_coef))
        snprintf(msg, n, "the aux and z loss coefficients must be finite and >= 0");
    return msg[0] ? msg : NULL;
}

static void model_config_check(const MoEConfig* c, const char* where) {
    char msg[256];
    if (model_config_error(c, msg, sizeof msg)) {
        fprintf(stderr, "Error: %s: %s\n", where, msg);
        exit(EXIT_FAILURE);
    }
}

// allocate parameters, gradients and the optimizer state (zeros), holding experts
// [e_first, e_first + E_local) of every layer (model_build: all of them)
void model_build_experts(Model* model, const MoEConfig* config, int e_first, int E_local) {
    memset(model, 0, sizeof(*model));
    model->config = *config;
    fill_param_sizes(model->param_sizes, config);
    for (int t = 8; t <= 10; t++)
        model->param_sizes[t] = model->param_sizes[t] / config->E * E_local; // w1, w3, w2
    model->e_first = e_first;
    model->E_local = E_local;
    size_t n = 0;
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) n += model->param_sizes[i];
    model->num_params = n;
    model->params_memory = (float*)callocCheck(n, sizeof(float));
    model->grads_memory = (float*)callocCheck(n, sizeof(float));
    model->m_memory = (float*)callocCheck(n, sizeof(float));
    model->v_memory = (float*)callocCheck(n, sizeof(float));
    point_params(&model->params, model->params_memory, model->param_sizes);
    point_params(&model->grads, model->grads_memory, model->param_sizes);
    point_params(&model->m_state, model->m_memory, model->param_sizes);
    point_params(&model->v_state, model->v_memory, model->param_sizes);
    model->aux = (float*)callocCheck(config->L, sizeof(float));
    model->zl = (float*)callocCheck(config->L, sizeof(float));
    model->step = -1;
}
void model_build(Model* model, const MoEConfig* config) {
    model_build_experts(model, config, 0, config->E);
}
static int is_expert_tensor(int t) { return t >= 8 && t <= 10; } // w1, w3, w2

// Megatron's init: every matrix ~ N(0, std), wo and w2 ~ N(0, std/sqrt(2L)), norm weights 1
void model_init_random(Model* model, uint64_t seed, float std) {
    const MoEConfig* c = &model->config;
    uint64_t rng = hash3(seed, 0x1A17, 0);
    float* p = model->params_memory;
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        size_t n = model->param_sizes[i];
        if (!param_is_matrix[i]) { for (size_t j = 0; j < n; j++) p[j] = 1.0f; }
        else {
            float s = (i == 5 || i == 10) ? std / sqrtf(2.0f * c->L) : std;
            for (size_t j = 0; j < n; j++) p[j] = s * rng_normal(&rng);
        }
        p += n;
    }
}

// processes (data and expert parallel, USE_MPI builds): the Dist state, the hooks of the MoE block
// when the experts are sharded (ep_*), and the steps around a step's collectives (dist_*)
#include "dev/moe/dist.h"

static void model_alloc_acts(Model* model, int B, int T) {
    const MoEConfig* c = &model->config;
    size_t N = (size_t)B * T, L = c->L, C = c->C, D = c->C / c->H, HD = c->H * D, KD = c->Hkv * D;
    size_t E = c->E, K = c->K, F = c->F, NK = N * K, V = c->V;
    // rows of the expert buffers: up to the group's, experts sharded
    size_t NK_exp = NK * ep_group(model);
    size_t sizes[NUM_ACT_TENSORS] = {
        (L + 1) * N * C, L * N * C, L * N * C, L * N, L * N * HD, L * N * KD, L * N * KD,
        L * B * c->H * (size_t)T * T, L * N * HD, L * N * C, L * N, L * N * E, L * N, L * N * K,
        L * NK * C, L * NK_exp * F, L * NK_exp * F, L * NK_exp * F, L * NK * C, N * C};
    size_t total = 0;
    for (int i = 0; i < NUM_ACT_TENSORS; i++) total += sizes[i];
    model->acts_memory = (float*)mallocCheck(total * sizeof(float));
    float** ptrs[NUM_ACT_TENSORS] = {
            &model->acts.resid, &model->acts.resid_mid, &model->acts.a,      &model->acts.a_rstd,
            &model->acts.q,     &model->acts.k,         &model->acts.v,      &model->acts.att,
            &model->acts.atty,  &model->acts.m,         &model->acts.m_rstd, &model->acts.z,
            &model->acts.lse,   &model->acts.gate,      &model->acts.xe,     &model->acts.h1,
            &model->acts.h3,    &model->acts.act,       &model->acts.ye,     &model->acts.xf};
    float* p = model->acts_memory;
    for (int i = 0; i < NUM_ACT_TENSORS; i++) { *ptrs[i] = p; p += sizes[i]; }
    model->f_rstd = (float*)mallocCheck(N * sizeof(float));
    model->logits = (float*)mallocCheck(N * V * sizeof(float));
    model->losses = (float*)mallocCheck(N * sizeof(float));
    model->topi = (int*)mallocCheck(L * NK * sizeof(int));
    model->counts = (int*)mallocCheck(L * E * sizeof(int));
    model->offs = (int*)mallocCheck(L * (E + 1) * sizeof(int));
    model->row_of = (int*)mallocCheck(L * NK * sizeof(int));
    model->tok_of = (int*)mallocCheck(L * NK * sizeof(int));
    model->freqs_cos = (float*)mallocCheck((size_t)T * (D / 2) * sizeof(float));
    model->freqs_sin = (float*)mallocCheck((size_t)T * (D / 2) * sizeof(float));
    rope_tables(model->freqs_cos, model->freqs_sin, T, (int)D, c->theta);
    size_t mx = C > HD ? C : HD;
    model->dres = (float*)mallocCheck(N * C * sizeof(float));
    model->dbuf = (float*)mallocCheck(N * mx * sizeof(float));
    model->dq = (float*)mallocCheck(N * HD * sizeof(float));
    model->dk = (float*)mallocCheck(N * KD * sizeof(float));
    model->dv = (float*)mallocCheck(N * KD * sizeof(float));
    model->datty = (float*)mallocCheck(N * HD * sizeof(float));
    model->dz = (float*)mallocCheck(N * E * sizeof(float));
    model->dgate = (float*)mallocCheck(N * K * sizeof(float));
    model->dxe = (float*)mallocCheck(NK * C * sizeof(float));
    model->dye = (float*)mallocCheck(NK * C * sizeof(float));
    model->dact = (float*)mallocCheck(NK_exp * F * sizeof(float));
    model->dh1 = (float*)mallocCheck(NK_exp * F * sizeof(float));
    model->dh3 = (float*)mallocCheck(NK_exp * F * sizeof(float));
    model->dlogits = (float*)mallocCheck(N * V * sizeof(float));
    if (dist.world > 1) model->gcounts = (int*)mallocCheck(L * E * sizeof(int));
    if (model->E_local < c->E) model->ep = ep_alloc(model, NK_exp);
    model->maxB = B;
    model->maxT = T;
}

static void model_free_acts(Model* model) {
    void* ptrs[] = {model->acts_memory, model->f_rstd,    model->logits,    model->losses,
                    model->topi,        model->counts,    model->offs,      model->row_of,
                    model->tok_of,      model->freqs_cos, model->freqs_sin, model->dres,
                    model->dbuf,        model->dq,        model->dk,        model->dv,
                    model->datty,       model->dz,        model->dgate,     model->dxe,
                    model->dye,         model->dact,      model->dh1,       model->dh3,
                    model->dlogits,     model->gcounts};
    for (size_t i = 0; i < sizeof(ptrs) / sizeof(ptrs[0]); i++) free(ptrs[i]);
    ep_free(model->ep);
    model->ep = NULL;
    model->acts_memory = NULL;
}

void model_free(Model* model) {
    if (model->acts_memory) model_free_acts(model);
    free(model->params_memory); free(model->grads_memory); free(model->m_memory); free(model->v_memory);
    free(model->aux); free(model->zl);
}


// stop on non-finite router logits: training on them would only spread NaN (model->step says when)
void router_check(const Model* model, int layer, int nonfinite, int N) {
    if (nonfinite == 0) return;
    if (model->step >= 0)
        fprintf(stderr,
                "Error: step %d, layer %d: non-finite router logits (NaN or Inf) for %d of %d "
                "tokens\n",
                model->step, layer, nonfinite, N);
    else
        fprintf(stderr,
                "Error: layer %d: non-finite router logits (NaN or Inf) for %d of %d tokens\n",
                layer, nonfinite, N);
    exit(EXIT_FAILURE);
}

// forward pass on inputs[B,T]; with targets (may be NULL) it computes ce, aux, zl and loss.
// Buffers are laid out for (B,T) of this call, so any B*T <= maxB*maxT with T <= maxT works.
// Each layer is an attention block and an MoE block, both residual: h += attn(h); h += moe(h).

// the attention block of layer l on the N = B*T tokens in resid[l]: resid_mid[l] = resid[l] + attention
static void attention_block_forward(Model* model, int l) {
    const MoEConfig* c = &model->config;
    int B = model->B, T = model->T, N = B * T, C = c->C, H = c->H, Hkv = c->Hkv, D = C / H;
    int HD = H * D, KD = Hkv * D;
    ParamTensors p = model->params;
    ActTensors a = model->acts;
    // seek to layer l's activations (and below, its weights)
    float *res = a.resid + (size_t)l * N * C, *res_mid = a.resid_mid + (size_t)l * N * C;
    float *q = a.q + (size_t)l * N * HD, *k = a.k + (size_t)l * N * KD, *v = a.v + (size_t)l * N * KD;
    float* an = a.a + (size_t)l * N * C;
    float* atty = a.atty + (size_t)l * N * HD;
    rmsnorm_forward(an, a.a_rstd + (size_t)l * N, res, p.attn_norm + (size_t)l * C, N, C, c->eps);
    matmul_forward(q, an, p.wq + (size_t)l * HD * C, N, C, HD);
    matmul_forward(k, an, p.wk + (size_t)l * KD * C, N, C, KD);
    matmul_forward(v, an, p.wv + (size_t)l * KD * C, N, C, KD);
    rope_apply(q, model->freqs_cos, model->freqs_sin, B, T, H, D, +1);
    rope_apply(k, model->freqs_cos, model->freqs_sin, B, T, Hkv, D, +1);
    attention_forward(atty, a.att + (size_t)l * B * H * T * T, q, k, v, B, T, H, Hkv, D);
    matmul_forward(res_mid, atty, p.wo + (size_t)l * C * HD, N, HD, C);
    for (size_t i = 0; i < (size_t)N * C; i++) res_mid[i] += res[i];
}

// the MoE block of layer l: router -> topk -> permute -> experts -> unpermute,
// resid[l+1] = resid_mid[l] + sum over the K chosen experts of gate * expert(rmsnorm(resid_mid[l]))
static void moe_block_forward(Model* model, int l) {
    const MoEConfig* c = &model->config;
    int N = model->B * model->T, C = c->C, E = c->E, K = c->K, F = c->F, NK = N * K;
    int E_local = model->E_local, NK_exp = NK * ep_group(model); // the rows the experts here may get
    ParamTensors p = model->params;
    ActTensors a = model->acts;
    // seek to layer l's weights (of the experts held here), activations and routing
    const float* w1 = p.w1 + (size_t)l * E_local * F * C;
    const float* w3 = p.w3 + (size_t)l * E_local * F * C;
    const float* w2 = p.w2 + (size_t)l * E_local * C * F;
    float* res_mid = a.resid_mid + (size_t)l * N * C;
    float* m = a.m + (size_t)l * N * C;
    float* z = a.z + (size_t)l * N * E;
    float* lse = a.lse + (size_t)l * N;
    float* gate = a.gate + (size_t)l * NK;
    int* counts = model->counts + (size_t)l * E;
    int* offs = model->offs + (size_t)l * (E + 1);
    int* row_of = model->row_of + (size_t)l * NK;
    float* xe = a.xe + (size_t)l * NK * C;
    float* ye = a.ye + (size_t)l * NK * C;
    float* h1 = a.h1 + (size_t)l * NK_exp * F;
    float* h3 = a.h3 + (size_t)l * NK_exp * F;
    float* act = a.act + (size_t)l * NK_exp * F;
    rmsnorm_forward(m, a.m_rstd + (size_t)l * N, res_mid, p.moe_norm + (size_t)l * C, N, C, c->eps);
    router_forward(z, lse, m, p.wr + (size_t)l * E * C, N, C, E);
    router_check(model, l, topk_forward(model->topi + (size_t)l * NK, gate, z, N, E, K), N);
    permute_plan(counts, offs, row_of, model->tok_of + (size_t)l * NK, model->topi + (size_t)l * NK,
                 N, E, K);
    permute_forward(xe, m, model->tok_of + (size_t)l * NK, NK, C);
    phase_mark(PH_ROUTE_FWD);
    // across ranks (dist.h)
    if (model->ep) ep_experts_forward(model, l, ye, h1, h3, act, xe, w1, w3, w2);
    else experts_forward(ye, h1, h3, act, xe, w1, w3, w2, offs, E, C, F);
    phase_mark(PH_EXPERTS_FWD);
    unpermute_forward(a.resid + (size_t)(l + 1) * N * C, res_mid, ye, gate, row_of, N, K, C);
    phase_mark(PH_UNPERM_FWD);
    // the load-balancing counts: this batch's, or in a step of every rank, the sum over the ranks
    int collective = model->collective && dist.world > 1;
    if (collective) dist_sum_counts(model->gcounts + (size_t)l * E, counts, E);
    router_losses(&model->aux[l], &model->zl[l], z, lse,
                  collective ? model->gcounts + (size_t)l * E : counts,
                  collective ? N * dist.world : N, N, E, K);
}

static void check_tokens(const int* x, int n, int V, int is_target) {
    for (int i = 0; i < n; i++)
        if (x[i] < -is_target || x[i] >= V) {
            if (is_target)
                fprintf(stderr,
                        "Error: target %d at position %d is outside [0, V=%d) (and not -1)\n", x[i],
                        i, V);
            else
                fprintf(stderr, "Error: input token %d at position %d is outside [0, V=%d)\n", x[i],
                        i, V);
            exit(EXIT_FAILURE);
        }
}

void model_forward(Model* model, const int* inputs, const int* targets, int B, int T) {
    const MoEConfig* c = &model->config;
    int L = c->L, C = c->C, V = c->V, N = B * T;
    if (model->acts_memory == NULL) model_alloc_acts(model, B, T);
    if ((size_t)B * T > (size_t)model->maxB * model->maxT || T > model->maxT) {
        fprintf(stderr, "Error: forward with B=%d T=%d exceeds the allocated B=%d T=%d\n", B, T,
                model->maxB, model->maxT);
        exit(EXIT_FAILURE);
    }
    check_tokens(inputs, N, V, 0);
    if (model->ep && !(model->collective && dist.world > 1)) {
        fprintf(stderr,
                "Error: a model holding %d of %d experts runs only as part of a step of every "
                "rank\n",
                model->E_local, c->E);
        exit(EXIT_FAILURE);
    }
    model->B = B; model->T = T; model->inputs = inputs; model->targets = targets;
    phase_mark(PH_NONE);
    encoder_forward(model->acts.resid, inputs, model->params.wte, N, C);
    phase_mark(PH_EMBED);
    for (int l = 0; l < L; l++) {
        attention_block_forward(model, l);
        phase_mark(PH_ATTN_FWD);
        moe_block_forward(model, l);
        phase_mark(PH_ROUTE_FWD);
    }
    rmsnorm_forward(model->acts.xf, model->f_rstd, model->acts.resid + (size_t)L * N * C,
                    model->params.final_norm, N, C, c->eps);
    matmul_forward(model->logits, model->acts.xf, model->params.lm_head, N, C, V);
    if (targets) {
        check_tokens(targets, N, V, 1);
        model->ce = crossentropy_forward(model->losses, model->dlogits, model->logits, targets, N,
                                         V, model->fused_dloss);
        model->dlogits_dloss = model->fused_dloss > 0.0f ? model->fused_dloss : 0.0f;
        double loss = model->ce;
        for (int l = 0; l < L; l++)
            loss += (double)c->aux_coef * model->aux[l] + (double)c->z_coef * model->zl[l];
        model->loss = (float)loss;
    }
    phase_mark(PH_CLASSIFIER_FWD);
}

void model_zero_grad(Model* model) {
    memset(model->grads_memory, 0, model->num_params * sizeof(float));
}

// the MoE block of layer l in reverse: unpermute -> experts -> permute -> topk/router. dres holds the
// gradient of resid[l+1] and, through the residual connection, becomes that of resid_mid[l]
static void moe_block_backward(Model* model, int l, float* dres, float dloss) {
    const MoEConfig* c = &model->config;
    int N = model->B * model->T, C = c->C, E = c->E, K = c->K, F = c->F, NK = N * K;
    int E_local = model->E_local, NK_exp = NK * ep_group(model);
    ParamTensors p = model->params, g = model->grads;
    ActTensors a = model->acts;
    size_t eo1 = (size_t)l * E_local * F * C, eo2 = (size_t)l * E_local * C * F; // this layer's experts
    const float* z = a.z + (size_t)l * N * E;
    const float* lse = a.lse + (size_t)l * N;
    const float* gate = a.gate + (size_t)l * NK;
    const int* counts = model->counts + (size_t)l * E;
    const int* row_of = model->row_of + (size_t)l * NK;
    const float* h1 = a.h1 + (size_t)l * NK_exp * F;
    const float* h3 = a.h3 + (size_t)l * NK_exp * F;
    const float* act = a.act + (size_t)l * NK_exp * F;
    unpermute_backward(model->dye, model->dgate, dres, a.ye + (size_t)l * NK * C, gate, row_of, N,
                       K, C);
    phase_mark(PH_UNPERM_BWD);
    if (model->ep) ep_experts_backward(model, l, h1, h3, act); // across ranks (dist.h)
    else
        experts_backward(model->dxe, g.w1 + eo1, g.w3 + eo1, g.w2 + eo2, model->dact, model->dh1,
                         model->dh3, model->dye, a.xe + (size_t)l * NK * C, h1, h3, act, p.w1 + eo1,
                         p.w3 + eo1, p.w2 + eo2, model->offs + (size_t)l * (E + 1), E, C, F);
    phase_mark(PH_EXPERTS_BWD);
    float* dm = model->dbuf;
    memset(dm, 0, (size_t)N * C * sizeof(float));
    permute_backward(dm, model->dxe, row_of, N, K, C);
    int collective = model->collective && dist.world > 1; // load balancing over every rank's counts
    router_backward(model->dz, model->dgate, z, lse, model->topi + (size_t)l * NK, gate,
                    collective ? model->gcounts + (size_t)l * E : counts,
                    collective ? N * dist.world : N, dloss * c->aux_coef, dloss * c->z_coef, N, E,
                    K);
    matmul_backward(dm, g.wr + (size_t)l * E * C, model->dz, a.m + (size_t)l * N * C,
                    p.wr + (size_t)l * E * C, N, C, E);
    rmsnorm_backward(dres, g.moe_norm + (size_t)l * C, dm, a.resid_mid + (size_t)l * N * C,
                     p.moe_norm + (size_t)l * C, a.m_rstd + (size_t)l * N, N, C);
}

// the attention block of layer l in reverse: dres, the gradient of resid_mid[l], becomes that of
// resid[l]
static void attention_block_backward(Model* model, int l, float* dres) {
    const MoEConfig* c = &model->config;
    int B = model->B, T = model->T, N = B * T, C = c->C, H = c->H, Hkv = c->Hkv, D = C / H,
        HD = H * D, KD = Hkv * D;
    ParamTensors p = model->params, g = model->grads;
    ActTensors a = model->acts;
    const float* an = a.a + (size_t)l * N * C;
    memset(model->datty, 0, (size_t)N * HD * sizeof(float));
    matmul_backward(model->datty, g.wo + (size_t)l * C * HD, dres, a.atty + (size_t)l * N * HD,
                    p.wo + (size_t)l * C * HD, N, HD, C);
    attention_backward(model->dq, model->dk, model->dv, model->datty,
                       a.att + (size_t)l * B * H * T * T, a.q + (size_t)l * N * HD,
                       a.k + (size_t)l * N * KD, a.v + (size_t)l * N * KD, B, T, H, Hkv, D);
    rope_apply(model->dq, model->freqs_cos, model->freqs_sin, B, T, H, D, -1);
    rope_apply(model->dk, model->freqs_cos, model->freqs_sin, B, T, Hkv, D, -1);
    float* da = model->dbuf;
    memset(da, 0, (size_t)N * C * sizeof(float));
    matmul_backward(da, g.wq + (size_t)l * HD * C, model->dq, an, p.wq + (size_t)l * HD * C, N, C, HD);
    matmul_backward(da, g.wk + (size_t)l * KD * C, model->dk, an, p.wk + (size_t)l * KD * C, N, C, KD);
    matmul_backward(da, g.wv + (size_t)l * KD * C, model->dv, an, p.wv + (size_t)l * KD * C, N, C, KD);
    rmsnorm_backward(dres, g.attn_norm + (size_t)l * C, da, a.resid + (size_t)l * N * C,
                     p.attn_norm + (size_t)l * C, a.a_rstd + (size_t)l * N, N, C);
}

// backward of the last forward; gradients of dloss * loss are ADDED into model->grads
// (dloss = 1/grad_accum_steps averages the micro-batches)
void model_backward(Model* model, float dloss) {
    const MoEConfig* c = &model->config;
    int N = model->B * model->T, L = c->L, C = c->C, V = c->V;
    ParamTensors p = model->params, g = model->grads;
    // classifier and final norm
    phase_mark(PH_NONE);
    if (model->dlogits_dloss > 0.0f && (dloss != model->dlogits_dloss || model->token_weights)) {
        fprintf(stderr, "Error: model_backward(%g) after a forward fused for model_backward(%g)\n",
                dloss, model->dlogits_dloss);
        exit(EXIT_FAILURE);
    }
    if (model->dlogits_dloss == 0.0f) // the forward's probs become dlogits, in place
        crossentropy_backward(model->dlogits, model->targets, model->token_weights, dloss, N, V);
    model->dlogits_dloss = 0.0f;
    memset(model->dbuf, 0, (size_t)N * C * sizeof(float));
    matmul_backward(model->dbuf, g.lm_head, model->dlogits, model->acts.xf, p.lm_head, N, C, V);
    memset(model->dres, 0, (size_t)N * C * sizeof(float));
    rmsnorm_backward(model->dres, g.final_norm, model->dbuf, model->acts.resid + (size_t)L * N * C,
                     p.final_norm, model->f_rstd, N, C);
    phase_mark(PH_CLASSIFIER_BWD);
    float* dres = model->dres; // gradient of the residual stream, flowing down
    for (int l = L - 1; l >= 0; l--) {
        moe_block_backward(model, l, dres, dloss);
        phase_mark(PH_ROUTE_BWD);
        attention_block_backward(model, l, dres);
        phase_mark(PH_ATTN_BWD);
    }
    encoder_backward(g.wte, dres, model->inputs, N, C);
    phase_mark(PH_EMBED);
}

// ----------------------------------------------------------------------------
// optimizer: global-norm clipping, AdamW, and the learning-rate schedule

// sum of squares in fixed-size chunks, added in chunk order: the same bits for any thread count
double sumsq_deterministic(const float* x, size_t n) {
    const size_t chunk = 1 << 16;
    size_t nchunks = (n + chunk - 1) / chunk;
    double* part = (double*)callocCheck(nchunks, sizeof(double));
    #pragma omp parallel for schedule(static)
    for (size_t ci = 0; ci < nchunks; ci++) {
        size_t lo = ci * chunk, hi = lo + chunk < n ? lo + chunk : n;
        // 16 running sums, one per lane, so the loop vectorises without reordering any one sum
        double lane[16] = {0};
        size_t i = lo;
        for (; i + 16 <= hi; i += 16)
            for (int j = 0; j < 16; j++) lane[j] += (double)x[i + j] * x[i + j];
        for (; i < hi; i++) lane[0] += (double)x[i] * x[i];
        double s = 0.0;
        for (int j = 0; j < 16; j++) s += lane[j];
        part[ci] = s;
    }
    double total = 0.0;
    for (size_t ci = 0; ci < nchunks; ci++) total += part[ci];
    free(part);
    return total;
}

float global_grad_norm(const Model* model) {
    return (float)sqrt(sumsq_deterministic(model->grads_memory, model->num_params));
}

float lr_schedule(int step, int steps, int warmup, float lr, float min_lr) {
    if (step < warmup) return lr * (step + 1) / warmup;
    if (steps <= warmup) return lr;
    float r = (float)(step - warmup) / (float)(steps - warmup);
    if (r > 1.0f) r = 1.0f;
    return min_lr + 0.5f * (1.0f + cosf((float)M_PI * r)) * (lr - min_lr);
}

// one AdamW step t (1-based) with gradients first scaled by grad_scale (the clipping factor)
void model_update(Model* model, float lr, float beta1, float beta2, float eps, float weight_decay,
                  int t, float grad_scale) {
    float ibc1 = 1.0f / (1.0f - powf(beta1, (float)t)),
          ibc2 = 1.0f / (1.0f - powf(beta2, (float)t)); // bias corrections
    size_t off = 0;
    for (int ti = 0; ti < NUM_PARAM_TENSORS; ti++) {
        size_t n = model->param_sizes[ti];
        float wd = param_is_matrix[ti] ? weight_decay : 0.0f;
        float* p = model->params_memory + off;
        float* g = model->grads_memory + off;
        float* m = model->m_memory + off;
        float* v = model->v_memory + off;
        #pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) {
            float gi = g[i] * grad_scale;
            m[i] = beta1 * m[i] + (1.0f - beta1) * gi;
            v[i] = beta2 * v[i] + (1.0f - beta2) * gi * gi;
            float mhat = m[i] * ibc1, vhat = v[i] * ibc2;
            p[i] -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p[i]);
        }
        off += n;
    }
}

// The kernel lab (dev/cuda) compiles this file up to here: the layers, the model and AdamW are the
// CPU references its kernels are checked against.
#ifndef MOE_LAYERS_ONLY

// ----------------------------------------------------------------------------
// checkpoints: header + parameters [+ AdamW m and v], written to NAME.tmp then renamed over NAME

#define CKPT_MAGIC 20251123
#define CKPT_VERSION 1

typedef struct { int epoch, shard, sample; } DataPos;
typedef struct { int step; DataPos pos; uint64_t rng; uint64_t seed; } TrainState;

static int f2i(float f) { int i; memcpy(&i, &f, 4); return i; }
static float i2f(int i) { float f; memcpy(&f, &i, 4); return f; }

void checkpoint_save(const Model* model, const char* path, int with_optimizer, const TrainState* st) {
    const MoEConfig* c = &model->config;
    int header[256] = {0};
    header[0] = CKPT_MAGIC; header[1] = CKPT_VERSION;
    header[2] = c->V; header[3] = c->T; header[4] = c->L; header[5] = c->C; header[6] = c->H;
    header[7] = c->Hkv; header[8] = c->E; header[9] = c->K; header[10] = c->F;
    header[11] = f2i(c->theta);
    header[12] = f2i(c->eps);
    header[13] = f2i(c->aux_coef);
    header[14] = f2i(c->z_coef);
    header[15] = with_optimizer ? 1 : 0;
    if (st) {
        header[16] = st->step;
        header[17] = st->pos.epoch; header[18] = st->pos.shard; header[19] = st->pos.sample;
        header[20] = (int)(uint32_t)st->rng; header[21] = (int)(uint32_t)(st->rng >> 32);
        header[22] = (int)(uint32_t)st->seed; header[23] = (int)(uint32_t)(st->seed >> 32);
    }
    header[24] = (int)(uint32_t)model->num_params;
    header[25] = (int)(uint32_t)((uint64_t)model->num_params >> 32);
    size_t plen = strlen(path);
    char* tmp = (char*)mallocCheck(plen + 5);
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    FILE* fp = fopenCheck(tmp, "wb");
    int ok = fwrite(header, sizeof(int), 256, fp) == 256;
    ok = ok && fwrite(model->params_memory, sizeof(float), model->num_params, fp) == model->num_params;
    if (with_optimizer) {
        ok = ok && fwrite(model->m_memory, sizeof(float), model->num_params, fp) == model->num_params;
        ok = ok && fwrite(model->v_memory, sizeof(float), model->num_params, fp) == model->num_params;
    }
    ok = ok && fflush(fp) == 0 && fsync(fileno(fp)) == 0;
    ok = (fclose(fp) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        int err = errno;
        remove(tmp);
        fprintf(stderr,
                "Error: writing checkpoint '%s' failed (%s); the previous file is untouched\n",
                path, strerror(err));
        exit(EXIT_FAILURE);
    }
    free(tmp);
}

// read a checkpoint's header and check it against the file's size; fills the config and the train
// state and returns the file positioned at the parameters (NULL after an error message)
static FILE* checkpoint_open(const char* path, MoEConfig* c, TrainState* st, int* has_opt) {
    FILE* fp = fopen_report(path);
    if (!fp) return NULL;
    int header[256];
    char msg[256];
    uint64_t nparams; // (declared before the first goto: this file also compiles as C++)
    size_t sizes[NUM_PARAM_TENSORS], n = 0;
    long expect, actual;
    if (fread_report(header, sizeof(int), 256, fp, path)) goto fail;
    if (header[0] != CKPT_MAGIC) {
        read_error("'%s' is not a moe checkpoint (magic %d, expected %d)", path, header[0], CKPT_MAGIC);
        goto fail;
    }
    if (header[1] != CKPT_VERSION) {
        read_error("'%s' has checkpoint version %d, this program reads version %d", path, header[1],
                   CKPT_VERSION);
        goto fail;
    }
    c->V = header[2]; c->T = header[3]; c->L = header[4]; c->C = header[5]; c->H = header[6];
    c->Hkv = header[7]; c->E = header[8]; c->K = header[9]; c->F = header[10];
    c->theta = i2f(header[11]);
    c->eps = i2f(header[12]);
    c->aux_coef = i2f(header[13]);
    c->z_coef = i2f(header[14]);
    if (model_config_error(c, msg, sizeof msg)) {
        read_error("checkpoint '%s': %s", path, msg);
        goto fail;
    }
    *has_opt = header[15];
    st->step = header[16];
    st->pos.epoch = header[17]; st->pos.shard = header[18]; st->pos.sample = header[19];
    st->rng = (uint64_t)(uint32_t)header[20] | ((uint64_t)(uint32_t)header[21] << 32);
    st->seed = (uint64_t)(uint32_t)header[22] | ((uint64_t)(uint32_t)header[23] << 32);
    nparams = (uint64_t)(uint32_t)header[24] | ((uint64_t)(uint32_t)header[25] << 32);
    fill_param_sizes(sizes, c);
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) n += sizes[i];
    if (nparams != n || (*has_opt != 0 && *has_opt != 1) || st->step < 0 || st->pos.epoch < 0 ||
        st->pos.shard < 0 || st->pos.sample < 0) {
        read_error("'%s' header is inconsistent: it records %llu parameters (its shape needs %zu), "
                   "optimizer flag %d, "
                   "step %d, data position (%d, %d, %d)",
                   path, (unsigned long long)nparams, n, *has_opt, st->step, st->pos.epoch,
                   st->pos.shard, st->pos.sample);
        goto fail;
    }
    expect = 1024 + (long)n * 4 * (*has_opt ? 3 : 1);
    actual = file_size(fp);
    if (actual != expect) {
        read_error("'%s' is %ld bytes but its header needs %ld (truncated or corrupt)", path,
                   actual, expect);
        goto fail;
    }
    return fp;
fail:
    fclose(fp);
    return NULL;
}

// the index of the first non-finite value of x[n] (or of a negative one, with nonneg), -1 if none
static long first_bad_value(const float* x, size_t n, int nonneg) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]) || (nonneg && x[i] < 0)) return (long)i;
    return -1;
}

// a body value no training step can produce: NaN or Inf anywhere, or a negative second moment v
static int checkpoint_check_values(const Model* model, const char* path, int with_optimizer) {
    const float* blocks[3] = {model->params_memory, model->m_memory, model->v_memory};
    const char* what[3] = {"parameter", "AdamW m", "AdamW v"};
    for (int b = 0; b < (with_optimizer ? 3 : 1); b++) {
        long i = first_bad_value(blocks[b], model->num_params, b == 2);
        if (i < 0) continue;
        int t = 0;
        size_t off = 0;
        while (off + model->param_sizes[t] <= (size_t)i) off += model->param_sizes[t++];
        return read_error("'%s' holds %s %g in tensor %s (element %zu): corrupt", path, what[b],
                          blocks[b][i], param_names[t], (size_t)i - off);
    }
    return 0;
}

// load a checkpoint into a fresh model; with_optimizer also loads m and v (the file must hold them).
// Returns 0, or -1 after an error message with nothing left allocated.
int checkpoint_load(Model* model, const char* path, TrainState* st, int with_optimizer) {
    MoEConfig c;
    int has_opt;
    FILE* fp = checkpoint_open(path, &c, st, &has_opt);
    if (!fp) return -1;
    if (with_optimizer && !has_opt) {
        fclose(fp);
        return read_error("'%s' holds no optimizer state, so training cannot resume from it (use "
                          "-e to start from its weights)",
                          path);
    }
    model_build(model, &c);
    int bad = fread_report(model->params_memory, sizeof(float), model->num_params, fp, path);
    if (!bad && with_optimizer)
        bad = fread_report(model->m_memory, sizeof(float), model->num_params, fp, path) ||
              fread_report(model->v_memory, sizeof(float), model->num_params, fp, path);
    fclose(fp);
    if (!bad) bad = checkpoint_check_values(model, path, with_optimizer);
    if (bad) { model_free(model); return -1; }
    return 0;
}

// ----------------------------------------------------------------------------
// data loader: llm.c's .bin shards (uint16 or uint32 tokens), a glob of them, sequential or shuffled.
// A batch is B samples of T+1 tokens; shard s holds (ntok-1)/T samples, sample i starts at i*T.
// Shuffling is stateless: the shard order of epoch e and the sample order of a shard are
// permutations seeded by (seed, epoch, shard), so (epoch, shard, sample) is the whole position.

#define SHARD_MAGIC_U16 20240520
#define SHARD_MAGIC_U32 20240801

typedef struct {
    glob_t glob;
    int nshards, B, T, V, shuffle;
    uint64_t seed;
    DataPos pos;
    int* shard_order;   // this epoch's order
    int cur_shard;      // index into the glob of the loaded shard (-1: none)
    int* tokens;        // the loaded shard, widened to int
    long ntok;
    int nsamples;
    int* sample_order;
    int* inputs;        // B*T
    int* targets;       // B*T
} DataLoader;

// open a shard and check its header and exact size; returns the file positioned at the tokens
// (NULL after an error message)
static FILE* shard_open(const char* path, long* ntok_out, int* width_out) {
    FILE* fp = fopen_report(path);
    if (!fp) return NULL;
    int header[256];
    if (fread_report(header, sizeof(int), 256, fp, path)) { fclose(fp); return NULL; }
    int width;
    if (header[0] == SHARD_MAGIC_U16 && header[1] == 1) width = 2;
    else if (header[0] == SHARD_MAGIC_U32 && header[1] == 7) width = 4;
    else {
        read_error("'%s' is not a token shard (magic %d version %d; expected %d v1 or %d v7)",
                   path, header[0], header[1], SHARD_MAGIC_U16, SHARD_MAGIC_U32);
        fclose(fp);
        return NULL;
    }
    long ntok = (long)(uint32_t)header[2];
    long expect = 1024 + ntok * width, actual = file_size(fp);
    if (actual != expect) {
        read_error("'%s' is %ld bytes but its header promises %ld tokens (%ld bytes): truncated or "
                   "corrupt",
                   path, actual, ntok, expect);
        fclose(fp);
        return NULL;
    }
    *ntok_out = ntok;
    *width_out = width;
    return fp;
}

// read a whole shard, checking every token id < V (NULL after an error message)
static int* shard_read(const char* path, int V, long* ntok_out) {
    long ntok;
    int width;
    FILE* fp = shard_open(path, &ntok, &width);
    if (!fp) return NULL;
    int* tokens = (int*)mallocCheck((size_t)(ntok ? ntok : 1) * sizeof(int));
    void* raw = mallocCheck((size_t)(ntok ? ntok : 1) * width);
    int bad = fread_report(raw, width, ntok, fp, path);
    fclose(fp);
    for (long i = 0; i < ntok && !bad; i++) {
        long t = width == 2 ? ((uint16_t*)raw)[i] : (long)((uint32_t*)raw)[i];
        if (t >= V)
            bad = read_error("'%s' token %ld is id %ld, outside the vocabulary (V=%d)", path, i, t,
                             V);
        tokens[i] = (int)t;
    }
    free(raw);
    if (bad) { free(tokens); return NULL; }
    *ntok_out = ntok;
    return tokens;
}

static void loader_load_shard(DataLoader* dl) {
    int idx = dl->shard_order[dl->pos.shard];
    if (idx == dl->cur_shard) return;
    free(dl->tokens);
    free(dl->sample_order);
    dl->tokens = shard_read(dl->glob.gl_pathv[idx], dl->V, &dl->ntok);
    if (!dl->tokens) exit(EXIT_FAILURE);
    dl->nsamples = dl->ntok > 1 ? (int)((dl->ntok - 1) / dl->T) : 0;
    dl->sample_order = (int*)mallocCheck((size_t)(dl->nsamples ? dl->nsamples : 1) * sizeof(int));
    if (dl->shuffle)
        random_permutation(dl->sample_order, dl->nsamples, hash3(dl->seed, dl->pos.epoch, idx + 1));
    else for (int i = 0; i < dl->nsamples; i++) dl->sample_order[i] = i;
    dl->cur_shard = idx;
}

static void loader_set_epoch(DataLoader* dl) {
    if (dl->shuffle)
        random_permutation(dl->shard_order, dl->nshards, hash3(dl->seed, dl->pos.epoch, 0));
    else for (int i = 0; i < dl->nshards; i++) dl->shard_order[i] = i;
    dl->cur_shard = -1;
}

void loader_init(DataLoader* dl, const char* pattern, const char* flag, int B, int T, int V,
                 int shuffle, uint64_t seed) {
    memset(dl, 0, sizeof(*dl));
    if (glob(pattern, 0, NULL, &dl->glob) != 0 || dl->glob.gl_pathc == 0) {
        fprintf(stderr, "Error: no data shard matches %s '%s'\n", flag, pattern);
        exit(EXIT_FAILURE);
    }
    dl->nshards = (int)dl->glob.gl_pathc;
    dl->B = B; dl->T = T; dl->V = V; dl->shuffle = shuffle; dl->seed = seed;
    dl->shard_order = (int*)mallocCheck(dl->nshards * sizeof(int));
    dl->inputs = (int*)mallocCheck((size_t)B * T * sizeof(int));
    dl->targets = (int*)mallocCheck((size_t)B * T * sizeof(int));
    long total = 0;
    for (int i = 0; i < dl->nshards; i++) {
        // every header and size up front; token ids when a shard is read
        long n;
        int width;
        FILE* fp = shard_open(dl->glob.gl_pathv[i], &n, &width);
        if (!fp) exit(EXIT_FAILURE);
        fclose(fp);
        if (n > 1) total += (n - 1) / T;
    }
    if (total < B) {
        fprintf(stderr,
                "Error: %s '%s' holds %ld samples of T+1=%d tokens, fewer than one batch (B=%d)\n",
                flag, pattern, total, T + 1, B);
        exit(EXIT_FAILURE);
    }
    dl->cur_shard = -1;
    loader_set_epoch(dl);
}

void loader_seek(DataLoader* dl, DataPos pos) {
    if (pos.epoch < 0 || pos.shard < 0 || pos.shard >= dl->nshards || pos.sample < 0) {
        fprintf(stderr,
                "Error: data position (epoch %d, shard %d, sample %d) does not fit these %d "
                "shards\n",
                pos.epoch, pos.shard, pos.sample, dl->nshards);
        exit(EXIT_FAILURE);
    }
    dl->pos = pos;
    loader_set_epoch(dl);
}

// the next B samples into inputs/targets; moves to the next shard (and epoch) when one runs out
void loader_next_batch(DataLoader* dl) {
    for (;;) {
        loader_load_shard(dl);
        if (dl->pos.sample + dl->B <= dl->nsamples) break;
        dl->pos.sample = 0;
        if (++dl->pos.shard == dl->nshards) {
            dl->pos.shard = 0;
            dl->pos.epoch++;
            loader_set_epoch(dl);
        }
    }
    for (int b = 0; b < dl->B; b++) {
        const int* src = dl->tokens + (size_t)dl->sample_order[dl->pos.sample + b] * dl->T;
        memcpy(dl->inputs + (size_t)b * dl->T, src, dl->T * sizeof(int));
        memcpy(dl->targets + (size_t)b * dl->T, src + 1, dl->T * sizeof(int));
    }
    dl->pos.sample += dl->B;
}

void loader_reset(DataLoader* dl) { DataPos zero = {0, 0, 0}; loader_seek(dl, zero); }

void loader_free(DataLoader* dl) {
    globfree(&dl->glob);
    free(dl->shard_order);
    free(dl->tokens);
    free(dl->sample_order);
    free(dl->inputs);
    free(dl->targets);
}

// ----------------------------------------------------------------------------
// tokenizer (decode only, llm.c's layout) and sampler

typedef struct { int V, eot; char** tokens; int ok; } Tokenizer;

void tokenizer_free(Tokenizer* tk) {
    for (int i = 0; i < tk->V && tk->tokens; i++) free(tk->tokens[i]);
    free(tk->tokens);
    memset(tk, 0, sizeof(*tk));
}

// read llm.c's tokenizer file: header (magic 20240328, version 2, V, eot), then per token a length
// byte and its bytes, nothing after. No file: tk->ok = 0 and samples print ids. Returns 0, or -1
// after an error message for a file that is there but wrong.
int tokenizer_init(Tokenizer* tk, const char* path) {
    memset(tk, 0, sizeof(*tk));
    FILE* fp = fopen(path, "rb");
    if (!fp) {
        fprintf(stderr, "note: no tokenizer at '%s': samples print token ids\n", path);
        return 0;
    }
    uint32_t header[256];
    long size = file_size(fp);
    int bad = fread_report(header, sizeof(uint32_t), 256, fp, path);
    if (!bad && (header[0] != 20240328 || header[1] != 2))
        bad = read_error("'%s' is not a tokenizer file (magic %u version %u)", path, header[0],
                         header[1]);
    if (!bad && (header[2] == 0 || header[2] > (uint32_t)(size - 1024) || header[3] >= header[2]))
        bad = read_error("'%s' header is inconsistent: V=%u, eot=%u for a file of %ld bytes", path,
                         header[2], header[3], size);
    if (!bad) {
        tk->V = (int)header[2];
        tk->eot = (int)header[3];
        tk->tokens = (char**)callocCheck((size_t)tk->V, sizeof(char*));
    }
    for (int i = 0; i < tk->V && !bad; i++) {
        unsigned char len;
        bad = fread_report(&len, 1, 1, fp, path);
        if (bad) break;
        tk->tokens[i] = (char*)mallocCheck(len + 1);
        bad = fread_report(tk->tokens[i], 1, len, fp, path);
        tk->tokens[i][len] = 0;
    }
    if (!bad && ftell(fp) != size)
        bad = read_error("'%s' has %ld bytes after its %d tokens: corrupt", path, size - ftell(fp),
                         tk->V);
    fclose(fp);
    if (bad) { tokenizer_free(tk); return -1; }
    tk->ok = 1;
    return 0;
}

// the bytes of token id; NULL for an id the tokenizer lacks (a model may have a larger V than its
// tokenizer: the trainer only warns) or when there is no tokenizer
const char* tokenizer_piece(const Tokenizer* tk, int id) {
    return tk->ok && id >= 0 && id < tk->V ? tk->tokens[id] : NULL;
}

// print a token, skipping bytes that would garble a terminal
void tokenizer_print(const Tokenizer* tk, int id) {
    const char* piece = tokenizer_piece(tk, id);
    if (!piece) { printf("<%d>", id); return; }
    for (const unsigned char* s = (const unsigned char*)piece; *s; s++)
        if (*s >= 32 || *s == '\n' || *s == '\t') putchar(*s);
}


// sample an index from probabilities (summing to 1) with a coin in [0,1)
int sample_mult(const float* probs, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) { cdf += probs[i]; if (coin < cdf) return i; }
    return n - 1;
}

// generate gen_len tokens after the eot token, printing them; uses and advances *rng
void generate(Model* model, const Tokenizer* tk, int eot, int gen_len, uint64_t* rng) {
    int V = model->config.V, maxT = model->maxT;
    int* toks = (int*)mallocCheck((size_t)(gen_len + 1) * sizeof(int));
    float* probs = (float*)mallocCheck((size_t)V * sizeof(float));
    toks[0] = eot;
    for (int t = 1; t <= gen_len; t++) {
        int ctx = t < maxT ? t : maxT; // a window of the last maxT tokens
        model_forward(model, toks + t - ctx, NULL, 1, ctx);
        const float* l = model->logits + (size_t)(ctx - 1) * V;
        float mx = l[0], s = 0.0f;
        for (int i = 1; i < V; i++) if (l[i] > mx) mx = l[i];
        for (int i = 0; i < V; i++) { probs[i] = expf(l[i] - mx); s += probs[i]; }
        for (int i = 0; i < V; i++) probs[i] /= s;
        toks[t] = sample_mult(probs, V, rng_f32(rng));
        tokenizer_print(tk, toks[t]);
        fflush(stdout);
    }
    printf("\n");
    free(toks);
    free(probs);
}

// ----------------------------------------------------------------------------
// the eval loop: val loss, the router's diagnostics, and the paper's task loss and task accuracy on
// eval files of prompts and reference answers

// the eval files and their reader, decoding with a KV cache, the answer checks, test-time compute
#include "dev/moe/tasks.h"

// mean ce over up to max_batches val batches (all of them if max_batches <= 0)
float eval_val_loss(Model* model, DataLoader* val, int max_batches) {
    loader_reset(val);
    double sum = 0.0;
    int n = 0;
    for (;;) {
        if (max_batches > 0 && n >= max_batches) break;
        loader_next_batch(val);
        if (val->pos.epoch > 0) break; // wrapped around: the whole val set was seen
        model_forward(model, val->inputs, val->targets, val->B, val->T);
        sum += model->ce;
        n++;
    }
    return n ? (float)(sum / n) : NAN;
}

// one layer's router: the share of token slots each expert received (as a multiple of the uniform
// share), empty experts, the mean router entropy (nats) from z[N,E] and lse[N], aux and z
// counts over Nc tokens (N, or every rank's), the entropy over the N of z and lse
void print_router_layer(FILE* logfile, int step, int l, const int* counts, int Nc, const float* z,
                        const float* lse, int N, int E, int K, float aux, float zl) {
    int mn = counts[0], mx = counts[0], empty = 0;
    for (int e = 0; e < E; e++) {
        if (counts[e] < mn) mn = counts[e];
        if (counts[e] > mx) mx = counts[e];
        empty += counts[e] == 0;
    }
    double ent = 0.0;
    for (int n = 0; n < N; n++)
        for (int e = 0; e < E; e++) {
            double p = exp(z[(size_t)n * E + e] - lse[n]);
            if (p > 0) ent -= p * log(p);
        }
    ent /= N;
    double uni = (double)Nc * K / E;
    printf("  router layer %d: load min %.2f max %.2f (x uniform), empty %d/%d, entropy %.3f (max "
           "%.3f), aux %.4f z %.4f |",
           l, mn / uni, mx / uni, empty, E, ent, log((double)E), aux, zl);
    int show = E <= 16 ? E : 16;
    for (int e = 0; e < show; e++) printf(" %.2f", counts[e] / uni);
    printf(E > 16 ? " ...\n" : "\n");
    if (logfile) {
        fprintf(logfile, "step %d router layer %d load", step, l);
        for (int e = 0; e < E; e++) fprintf(logfile, " %d", counts[e]);
        fprintf(logfile, " entropy %.5f aux %.6f z %.6f\n", ent, aux, zl);
    }
}

// every layer's router after the last forward. After a step of every rank (model->gcounts) the loads
// are over every rank's tokens and the entropy over this rank's
void print_router_stats(const Model* model, FILE* logfile, int step) {
    const MoEConfig* c = &model->config;
    int N = model->B * model->T, E = c->E, all = model->gcounts != NULL;
    for (int l = 0; l < c->L; l++)
        print_router_layer(
                logfile, step, l, (all ? model->gcounts : model->counts) + (size_t)l * E,
                all ? N * dist.world : N, model->acts.z + (size_t)l * N * E,
                model->acts.lse + (size_t)l * N, N, E, c->K, model->aux[l], model->zl[l]);
}

// task loss: the NLL of the answer tokens given the prompt, in bits per answer token and per answer
// byte (the tokenizer's bytes). Items go B at a time, each in its own row of T tokens; an answer that
// runs past T is scored on the tokens that fit (counted in *truncated).
void eval_task_loss(Model* model, const EvalSet* es, const Tokenizer* tk, int B, int T, int eot,
                    double* bits_per_token, double* bits_per_byte, int* truncated) {
    int* x = (int*)mallocCheck((size_t)B * T * sizeof(int));
    int* y = (int*)mallocCheck((size_t)B * T * sizeof(int));
    double nll = 0.0;
    long ntok = 0, nbytes = 0;
    *truncated = 0;
    for (int i0 = 0; i0 < es->n; i0 += B) {
        *truncated += task_loss_batch(es, i0, B, T, eot, x, y);
        model_forward(model, x, y, B, T);
        task_loss_add(y, model->losses, B * T, tk, &nll, &ntok, &nbytes);
    }
    *bits_per_token = ntok ? nll / ntok / log(2.0) : NAN;
    *bits_per_byte = nbytes ? nll / nbytes / log(2.0) : NAN;
    free(x);
    free(y);
}

// greedy accuracy over the first max_items items (all if max_items <= 0); right (if not NULL, room
// for es->n + 1) gets each scored item's result, '1' or '0', as a string
double eval_task_accuracy(Model* model, const EvalSet* es, const Tokenizer* tk, int eot,
                          int max_items, int* scored, char* right) {
    int n = (max_items > 0 && max_items < es->n) ? max_items : es->n, correct = 0;
    int* out = (int*)mallocCheck((size_t)(es->max_answer + 8) * sizeof(int));
    size_t cap = 1024;
    char* text = (char*)mallocCheck(cap);
    for (int i = 0; i < n; i++) {
        int k = generate_answer(model, es->toks[i], es->plen[i], es->max_answer + 8, eot,
                                es->kind == TASK_MEMORIZATION, tk, out, 0.0f, NULL);
        int ok = answer_matches(tokens_text(tk, out, k, &text, &cap), es->ref[i], es->kind);
        correct += ok;
        if (right) right[i] = ok ? '1' : '0';
    }
    if (right) right[n] = 0;
    free(out);
    free(text);
    *scored = n;
    return n ? (double)correct / n : NAN;
}

// one eval file's results on the console and in the log (both trainers); right (may be NULL): each
// scored item's '1' or '0', logged as "step S items NAME 0110..." (the paired per-item comparisons)
void report_task_eval(FILE* logf, int step, const EvalSet* es, double bpt, double bpb,
                      int truncated, double acc, int scored, const char* right) {
    if (es->loss_only) {
        printf("task %-10s | loss %.4f bits/token %.4f bits/byte (%d items, %d answers cut at T) | "
               "accuracy not scored (:loss)\n",
               es->name, bpt, bpb, es->n, truncated);
        if (logf) fprintf(logf, "step %d task %s bpt %.6f bpb %.6f\n", step, es->name, bpt, bpb);
        return;
    }
    printf("task %-10s | loss %.4f bits/token %.4f bits/byte (%d items, %d answers cut at T) | "
           "accuracy %.4f (%d items, greedy)\n",
           es->name, bpt, bpb, es->n, truncated, acc, scored);
    if (logf)
        fprintf(logf, "step %d task %s bpt %.6f bpb %.6f acc %.6f n %d\n", step, es->name, bpt, bpb,
                acc, scored);
    if (logf && right) fprintf(logf, "step %d items %s %s\n", step, es->name, right);
}

// ----------------------------------------------------------------------------
// flags

// GRPO's settings: P prompts x G samples per rollout batch, at most R response tokens, M mini-batch
// updates, the loss aggregation (0: token mean), the sampling temperature, the clip epsilon, the KL
// coefficient; 1: the router's losses in the RL loss; 1: weight decay on the matrices only.
// dev/moe/grpo.h defines their flags (-rp -rg -rr -rm -ra -rt -rc -rk -rx -rd), defaults and checks
typedef struct { int P, G, R, M, agg; float temp, clip, kl; int router_losses, decay_matrices_only; } GrpoConfig;
void grpo_usage(void);
int grpo_flag(GrpoConfig* gc, const char* flag, const char* value);
const char* grpo_flags_error(const GrpoConfig* gc);

typedef struct {
    const char *train_glob, *val_glob, *tokenizer, *out_dir, *init_ckpt, *fwd_in, *fwd_out, *eval_files;
    int resume, B, T, steps, grad_accum, warmup, val_every, val_batches, sample_every, gen_len,
            ckpt_every, shuffle;
    int acc_items, eval_only, ttc_samples;
    float ttc_temp;
    int profile_every;   // -pf: the per-phase time table every N steps (0: off)
    float lr, min_lr_frac, weight_decay, grad_clip, beta1, beta2, init_std;
    uint64_t seed;
    MoEConfig model;     // shape for a random init
    int shape_given[9];  // which of V,T,L,C,H,Hkv,E,K,F were given as flags
    const char* rl_file; // -rl: GRPO post-training on this eval-format prompt file
    GrpoConfig grpo;
    int optim_given[5];  // -l, -u, -q, -b2, -c given (else GRPO uses its own defaults)
    int ep;              // -ep: expert-parallel group size (processes, MPI build)
} Args;
void grpo_optim_defaults(Args* a);

void usage(void) {
    printf(
"usage: ./train_moe [flags]   (each flag takes one value)\n"
"data and files:\n"
"  -i  train shards (glob)            default data/default/train_*.bin\n"
"  -j  val shards (glob)              default data/default/val_*.bin\n"
"  -k  tokenizer (decode only)        default data/default/tokenizer.bin\n"
"  -o  output dir for checkpoints and log.txt (none: nothing is written)\n"
"  -e  start from this checkpoint's weights (else a random init from -sd)\n"
"  -y  1: resume from the newest checkpoint in -o (weights, AdamW, step, data position, RNG)\n"
"training:\n"
"  -b  batch size B (default 16)       -t  sequence length T (default 128)\n"
"  -x  steps (default 1500)            -ga gradient accumulation micro-batches (default 1)\n"
"  -l  learning rate (default 3e-3)    -u  warm-up steps (default 50)\n"
"  -q  min lr as a fraction of lr (default 0.1)\n"
"  -c  weight decay (default 0.1)      -gc grad clip by global norm (default 1.0, 0 = off)\n"
"  -b1 AdamW beta1 (default 0.9)       -b2 AdamW beta2 (default 0.95)\n"
"  -sd seed (default 1337)             -sh shuffle the train data 0/1 (default 1)\n"
"  -is init std (default 0.02)\n"
"eval:\n"
"  -v  val loss every N steps and at the end (default 250, 0 = never)  -m  val batches (default 20, 0 = all)\n"
"  -s  sample every N steps and at the end (default 500, 0 = never)  -g  tokens per sample (default 64)\n"
"  -n  checkpoint every N steps (default 0: only at the end, when -o is set)\n"
"  -ev eval files, comma-separated (data/tasks/*_eval.bin): task loss and greedy accuracy at every val step\n"
"      (FILE:loss: task loss only)\n"
"  -ea items per eval file scored for accuracy (default 100, 0 = all)\n"
"  -ex 1: evaluate the model (-e or -y) on the val set and the -ev files, then exit\n"
"  -tn N test-time compute: N samples per item (majority vote and pass@n, n = 1, 2, 4 .. N; default 0 = off)\n"
"  -tt temperature of those samples (default 0.8)\n"
"  -pf N: a table of where the step time goes (embedding, attention, router, experts, unpermute,\n"
"        classifier, optimizer, rest), averaged over every N training steps (default 0 = off)\n"
"model shape (random init; a checkpoint brings its own):\n"
"  -nv V vocab (default: the tokenizer's, else 4096)  -nl L layers (4)  -nc C width (128)\n"
"  -nh H heads (4)  -nkv Hkv kv heads (default H)  -ne E experts (8)  -nk K top-k (2)\n"
"  -nf F expert hidden (default 2C)  -ac aux coef (1e-2)  -zc z-loss coef (1e-3)  -th rope theta (1e4)\n"
"forward only:\n"
"  -fi FILE -fo FILE   read B*T int32 tokens from -fi, write B*T*V float32 logits to -fo, exit\n"
"GRPO post-training (dev/GRPO.md; -x counts RL steps, one rollout batch each):\n"
"  -rl FILE  RL prompts: an eval-format file (data/arith/arith_rl.bin); needs -e, the start and the reference\n");
    grpo_usage();
    printf(
"across processes (make train_moe_mpi; mpirun -np R ./train_moe_mpi ...; dev/DISTRIBUTED.md):\n"
"  -b is the global batch: each rank trains on B/R of its sequences (data parallel); rank 0 logs, evaluates\n"
"  and writes checkpoints (the one-process format)\n"
"  -ep P expert parallel: the experts of every layer sharded over groups of P ranks, tokens sent to them by\n"
"        all-to-all (P divides R and E; default 1 = data parallel only)\n");
}

int parse_int(const char* flag, const char* s) {
    char* end;
    long v = strtol(s, &end, 10);
    if (*s == 0 || *end != 0 || v < -2147483647L || v > 2147483647L) {
        fprintf(stderr, "Error: flag %s expects an integer, got '%s'\n", flag, s);
        exit(EXIT_FAILURE);
    }
    return (int)v;
}
float parse_float(const char* flag, const char* s) {
    char* end;
    float v = strtof(s, &end);
    if (*s == 0 || *end != 0 || !isfinite(v)) {
        fprintf(stderr, "Error: flag %s expects a number, got '%s'\n", flag, s);
        exit(EXIT_FAILURE);
    }
    return v;
}

const char* args_error(const Args* a);

// the flags' defaults (./train_moe -h lists them)
void args_defaults(Args* a) {
    memset(a, 0, sizeof(*a));
    a->train_glob = "data/default/train_*.bin"; a->val_glob = "data/default/val_*.bin";
    a->tokenizer = "data/default/tokenizer.bin";
    a->B = 16; a->T = 128; a->steps = 1500; a->grad_accum = 1; a->warmup = 50;
    a->val_every = 250; a->val_batches = 20; a->sample_every = 500; a->gen_len = 64; a->shuffle = 1;
    a->acc_items = 100; a->ttc_samples = 0; a->ttc_temp = 0.8f;
    a->lr = 3e-3f; a->min_lr_frac = 0.1f; a->weight_decay = 0.1f; a->grad_clip = 1.0f;
    a->beta1 = 0.9f; a->beta2 = 0.95f; a->init_std = 0.02f; a->seed = 1337;
    GrpoConfig gd = {16, 5, 64, 4, 0, 1.0f, 0.2f, 0.001f, 0, 0};
    a->grpo = gd;
    MoEConfig d = {0, 0, 4, 128, 4, 0, 8, 2, 0, 10000.0f, 1e-5f, 1e-2f, 1e-3f};
    a->model = d;
    a->ep = 1;
}

void parse_args(Args* a, int argc, char** argv) {
    args_defaults(a);
    for (int i = 1; i < argc; i++) {
        const char* f = argv[i];
        if (strcmp(f, "-h") == 0 || strcmp(f, "--help") == 0) { usage(); exit(EXIT_SUCCESS); }
        if (f[0] != '-' || i + 1 >= argc) {
            fprintf(stderr,
                    "Error: bad argument '%s' (flags come as '-flag value'; -h lists them)\n", f);
            exit(EXIT_FAILURE);
        }
        const char* v = argv[++i];
        if (!strcmp(f, "-i")) a->train_glob = v;
        else if (!strcmp(f, "-j")) a->val_glob = v;
        else if (!strcmp(f, "-k")) a->tokenizer = v;
        else if (!strcmp(f, "-o")) a->out_dir = v;
        else if (!strcmp(f, "-e")) a->init_ckpt = v;
        else if (!strcmp(f, "-y")) a->resume = parse_int(f, v);
        else if (!strcmp(f, "-b")) a->B = parse_int(f, v);
        else if (!strcmp(f, "-t")) a->T = parse_int(f, v);
        else if (!strcmp(f, "-x")) a->steps = parse_int(f, v);
        else if (!strcmp(f, "-ga")) a->grad_accum = parse_int(f, v);
        else if (!strcmp(f, "-l")) { a->lr = parse_float(f, v); a->optim_given[0] = 1; }
        else if (!strcmp(f, "-u")) { a->warmup = parse_int(f, v); a->optim_given[1] = 1; }
        else if (!strcmp(f, "-q")) { a->min_lr_frac = parse_float(f, v); a->optim_given[2] = 1; }
        else if (!strcmp(f, "-b2")) { a->beta2 = parse_float(f, v); a->optim_given[3] = 1; }
        else if (!strcmp(f, "-c")) { a->weight_decay = parse_float(f, v); a->optim_given[4] = 1; }
        else if (!strcmp(f, "-rl")) a->rl_file = v;
        else if (grpo_flag(&a->grpo, f, v)) continue; // GRPO's other flags (-rp .. -rd)
        else if (!strcmp(f, "-gc")) a->grad_clip = parse_float(f, v);
        else if (!strcmp(f, "-b1")) a->beta1 = parse_float(f, v);
        else if (!strcmp(f, "-sd")) a->seed = (uint64_t)parse_int(f, v);
        else if (!strcmp(f, "-sh")) a->shuffle = parse_int(f, v);
        else if (!strcmp(f, "-is")) a->init_std = parse_float(f, v);
        else if (!strcmp(f, "-v")) a->val_every = parse_int(f, v);
        else if (!strcmp(f, "-m")) a->val_batches = parse_int(f, v);
        else if (!strcmp(f, "-s")) a->sample_every = parse_int(f, v);
        else if (!strcmp(f, "-g")) a->gen_len = parse_int(f, v);
        else if (!strcmp(f, "-n")) a->ckpt_every = parse_int(f, v);
        else if (!strcmp(f, "-nv")) { a->model.V = parse_int(f, v); a->shape_given[0] = 1; }
        else if (!strcmp(f, "-nl")) { a->model.L = parse_int(f, v); a->shape_given[2] = 1; }
        else if (!strcmp(f, "-nc")) { a->model.C = parse_int(f, v); a->shape_given[3] = 1; }
        else if (!strcmp(f, "-nh")) { a->model.H = parse_int(f, v); a->shape_given[4] = 1; }
        else if (!strcmp(f, "-nkv")) { a->model.Hkv = parse_int(f, v); a->shape_given[5] = 1; }
        else if (!strcmp(f, "-ne")) { a->model.E = parse_int(f, v); a->shape_given[6] = 1; }
        else if (!strcmp(f, "-nk")) { a->model.K = parse_int(f, v); a->shape_given[7] = 1; }
        else if (!strcmp(f, "-nf")) { a->model.F = parse_int(f, v); a->shape_given[8] = 1; }
        else if (!strcmp(f, "-ac")) a->model.aux_coef = parse_float(f, v);
        else if (!strcmp(f, "-zc")) a->model.z_coef = parse_float(f, v);
        else if (!strcmp(f, "-th")) a->model.theta = parse_float(f, v);
        else if (!strcmp(f, "-ev")) a->eval_files = v;
        else if (!strcmp(f, "-ea")) a->acc_items = parse_int(f, v);
        else if (!strcmp(f, "-ex")) a->eval_only = parse_int(f, v);
        else if (!strcmp(f, "-tn")) a->ttc_samples = parse_int(f, v);
        else if (!strcmp(f, "-pf")) a->profile_every = parse_int(f, v);
        else if (!strcmp(f, "-tt")) a->ttc_temp = parse_float(f, v);
        else if (!strcmp(f, "-fi")) a->fwd_in = v;
        else if (!strcmp(f, "-fo")) a->fwd_out = v;
        else if (!strcmp(f, "-ep")) a->ep = parse_int(f, v);
        else { fprintf(stderr, "Error: unknown flag '%s' (-h lists them)\n", f); exit(EXIT_FAILURE); }
    }
    if (a->rl_file) grpo_optim_defaults(a); // the paper's post-training lr schedule and AdamW
    if (a->model.Hkv == 0) a->model.Hkv = a->model.H;
    if (a->model.F == 0) a->model.F = 2 * a->model.C;
    const char* bad = args_error(a);
    if (bad) { fprintf(stderr, "Error: %s\n", bad); exit(EXIT_FAILURE); }
}

// what is wrong with the flags (NULL: nothing)
const char* args_error(const Args* a) {
    const char* bad = NULL;
    if (a->B <= 0) bad = "-b (batch size) must be positive";
    else if (a->T <= 0) bad = "-t (sequence length) must be positive";
    else if (a->steps < 0) bad = "-x (steps) must be >= 0";
    else if (a->grad_accum <= 0) bad = "-ga (accumulation steps) must be positive";
    else if (!(a->lr >= 0)) bad = "-l (learning rate) must be >= 0";
    else if (a->warmup < 0) bad = "-u (warm-up) must be >= 0";
    else if (a->min_lr_frac < 0 || a->min_lr_frac > 1) bad = "-q (min lr fraction) must be in [0, 1]";
    else if (a->grad_clip < 0) bad = "-gc (grad clip) must be >= 0";
    else if (a->beta1 < 0 || a->beta1 >= 1 || a->beta2 < 0 || a->beta2 >= 1)
        bad = "-b1/-b2 must be in [0, 1)";
    else if (a->resume && !a->out_dir) bad = "-y 1 needs -o (the directory holding the checkpoints)";
    else if ((a->fwd_in == NULL) != (a->fwd_out == NULL)) bad = "-fi and -fo go together";
    else if (a->ttc_samples < 0 || a->ttc_samples > 1024)
        bad = "-tn (samples per item) must be in [0, 1024]";
    else if (a->profile_every < 0) bad = "-pf (profile every N steps) must be >= 0";
    else if (a->ttc_samples > 0 && !(a->ttc_temp > 0))
        bad = "-tt (sampling temperature) must be positive";
    else if (a->rl_file && !a->init_ckpt)
        bad = "-rl needs -e (the checkpoint GRPO starts from, also its reference model)";
    else if (a->rl_file && grpo_flags_error(&a->grpo)) bad = grpo_flags_error(&a->grpo);
    else if (a->ep < 1) bad = "-ep (expert-parallel size) must be >= 1";
    return bad;
}

// ----------------------------------------------------------------------------
// main's helpers: the model to start from, the log, checkpoints and evals during training, one step

// a checkpoint brings its own shape: any shape flag given must agree with it
void check_shape_flags(const MoEConfig* c, const Args* a, const char* ckpt) {
    int have[9] = {c->V, c->T, c->L, c->C, c->H, c->Hkv, c->E, c->K, c->F};
    int want[9] = {a->model.V,   a->model.T, a->model.L, a->model.C, a->model.H,
                   a->model.Hkv, a->model.E, a->model.K, a->model.F};
    const char* flags[9] = {"-nv", "-t", "-nl", "-nc", "-nh", "-nkv", "-ne", "-nk", "-nf"};
    for (int i = 0; i < 9; i++)
        if (a->shape_given[i] && have[i] != want[i]) {
            fprintf(stderr, "Error: checkpoint '%s' has %s %d but %s %d was given\n", ckpt,
                    flags[i], have[i], flags[i], want[i]);
            exit(EXIT_FAILURE);
        }
}

// total and active parameters: active = all but the E-K experts a token does not use
void print_model_summary(const MoEConfig* c, size_t num_params) {
    size_t active = num_params - (size_t)c->L * (c->E - c->K) * 3 * c->F * c->C;
    printf("model: V=%d L=%d C=%d H=%d Hkv=%d E=%d K=%d F=%d | params %.3fM total, %.3fM active "
           "(sparsity %.3f)\n",
           c->V, c->L, c->C, c->H, c->Hkv, c->E, c->K, c->F, num_params / 1e6, active / 1e6,
           1.0 - (double)c->K / c->E);
}


// resuming in dir: the newest model_NNNNNNNN.bin (NULL if none). A model_NNNNNNNN.bin.tmp is a
// checkpoint write that was killed before its rename (the .bin it would have replaced is intact):
// it is removed, and named.
char* resume_checkpoint(const char* dir) {
    DIR* d = opendir(dir);
    if (!d) return NULL;
    int best = -1;
    struct dirent* ent;
    while ((ent = readdir(d)) != NULL) {
        int step;
        char tail[8];
        if (sscanf(ent->d_name, "model_%8d.bi%5s", &step, tail) != 2) continue;
        size_t len = strlen(ent->d_name);
        if (strcmp(tail, "n") == 0 && len == 18 && step > best) best = step;
        if (strcmp(tail, "n.tmp") == 0 && len == 22) {
            char* tmp = (char*)mallocCheck(strlen(dir) + len + 2);
            sprintf(tmp, "%s/%s", dir, ent->d_name);
            if (dist.rank != 0) {
            } // rank 0 cleans up
            else if (remove(tmp) == 0)
                printf("resume: removed '%s', left by a checkpoint write that did not finish\n",
                       tmp);
            else
                fprintf(stderr, "warning: cannot remove the partial checkpoint '%s': %s\n", tmp,
                        strerror(errno));
            free(tmp);
        }
    }
    closedir(d);
    if (best < 0) return NULL;
    char* path = (char*)mallocCheck(strlen(dir) + 32);
    sprintf(path, "%s/model_%08d.bin", dir, best);
    return path;
}

// every -ev file: task loss (bits/token, bits/byte) and greedy accuracy, then (-tn) test-time compute,
// on the console and in the log
void run_task_evals(Model* model, EvalSet* sets, int nsets, const Tokenizer* tk, int eot, const Args* a,
                    FILE* logf, int step) {
    for (int i = 0; i < nsets; i++) {
        double bpt, bpb;
        int trunc, scored;
        eval_task_loss(model, &sets[i], tk, a->B, a->T, eot, &bpt, &bpb, &trunc);
        double acc = 0.0;
        scored = 0;
        char* right = (char*)mallocCheck((size_t)sets[i].n + 1);
        if (!sets[i].loss_only)
            acc = eval_task_accuracy(model, &sets[i], tk, eot, a->acc_items, &scored, right);
        report_task_eval(logf, step, &sets[i], bpt, bpb, trunc, acc, scored,
                         sets[i].loss_only ? NULL : right);
        free(right);
        if (a->ttc_samples > 0 && !sets[i].loss_only) {
            // its own stream: training is not affected
            uint64_t rng = hash3(a->seed, (uint64_t)step, 0x77C + i);
            run_test_time_compute(model, &sets[i], tk, eot, a->acc_items, a->ttc_samples,
                                  a->ttc_temp, rng, logf, step);
        }
    }
}

// the model to train: from a checkpoint (-e, or the newest in -o with -y: weights, AdamW, step, data
// position and RNG) or a random init. Returns the checkpoint resumed from (malloc'd), or NULL.
char* model_start(Model* model, TrainState* st, const Args* a, const Tokenizer* tk) {
    *st = (TrainState){0, {0, 0, 0}, 0, a->seed};
    char* resume_path = a->resume ? resume_checkpoint(a->out_dir) : NULL;
    const char* ckpt = resume_path ? resume_path : a->init_ckpt;
    if (a->resume && !resume_path)
        printf("resume: no checkpoint in '%s' yet, starting fresh\n", a->out_dir);
    if (ckpt) {
        if (checkpoint_load(model, ckpt, st, resume_path != NULL) != 0) exit(EXIT_FAILURE);
        check_shape_flags(&model->config, a, ckpt);
        if (!resume_path) {
            st->step = 0;
            st->pos = (DataPos){0, 0, 0};
            st->rng = 0;
            st->seed = a->seed;
        }
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

// OUT_DIR/log.txt, appended to (an earlier run's log is never lost); NULL without -o
FILE* open_log(const char* out_dir) {
    if (!out_dir || dist.rank != 0) return NULL;
    mkdir_p(out_dir);
    char* lp = (char*)mallocCheck(strlen(out_dir) + 16);
    sprintf(lp, "%s/log.txt", out_dir);
    FILE* logf = fopenCheck(lp, "a");
    free(lp);
    return logf;
}

// OUT_DIR/model_STEP.bin with the AdamW state and where training is (now)
void save_checkpoint(const Model* model, const char* out_dir, TrainState now) {
    char* path = (char*)mallocCheck(strlen(out_dir) + 32);
    sprintf(path, "%s/model_%08d.bin", out_dir, now.step);
    checkpoint_save(model, path, 1, &now);
    printf("saved %s\n", path);
    free(path);
}

// the val loss and every -ev file's task loss and accuracy, on the console and in the log
void evaluate(Model* model, DataLoader* val, EvalSet* sets, int nsets, const Tokenizer* tk,
              const Args* a, FILE* logf, int step) {
    float vl = eval_val_loss(model, val, a->val_batches);
    printf("val loss %.4f\n", vl);
    if (logf) fprintf(logf, "step %d val %.6f\n", step, vl);
    run_task_evals(model, sets, nsets, tk, tk->ok ? tk->eot : 0, a, logf, step);
}

// one optimizer step: grad_accum micro-batches of this rank's B_rank sequences of each batch, the
// gradients summed over the ranks, clipping by the global norm, AdamW. Returns the step's mean loss
// terms in terms[4] (loss, ce, aux, z), its lr and grad norm.
void training_step(Model* model, DataLoader* train, const Args* a, int step, double* terms, float* lr,
                   float* norm) {
    const MoEConfig* c = &model->config;
    // this rank's sequences of each global batch (all of them in one process)
    int B_rank = a->B / dist.world;
    float dl = 1.0f / (a->grad_accum * dist.world); // each micro-batch's share of the step's mean loss
    double loss = 0, ce = 0, aux = 0, zl = 0;
    model_zero_grad(model);
    model->step = step + 1; // as the step line counts
    model->collective = 1;  // across processes every rank takes part in this forward and backward
    for (int micro = 0; micro < a->grad_accum; micro++) {
        loader_next_batch(train);
        size_t mine = (size_t)dist.rank * B_rank * a->T; // this rank's sequences of the batch
        model->fused_dloss = dl; // this forward also writes the classifier's dlogits
        model_forward(model, train->inputs + mine, train->targets + mine, B_rank, a->T);
        model->fused_dloss = 0.0f;
        model_backward(model, dl);
        loss += model->loss; ce += model->ce;
        for (int l = 0; l < c->L; l++) { aux += model->aux[l] / c->L; zl += model->zl[l] / c->L; }
    }
    model->collective = 0;
    terms[0] = loss / a->grad_accum; terms[1] = ce / a->grad_accum;
    terms[2] = aux / a->grad_accum; terms[3] = zl / a->grad_accum;
    if (dist.world > 1) {
        // the sum of the ranks' gradients is the whole batch's; the logged terms their mean
        dist_allreduce_grads(model);
        dist_mean(terms, 4);
    }
    *norm = dist.ep > 1 ? dist_grad_norm(model) : global_grad_norm(model);
    float scale = (a->grad_clip > 0 && *norm > a->grad_clip) ? a->grad_clip / *norm : 1.0f;
    *lr = lr_schedule(step, a->steps, a->warmup, a->lr, a->lr * a->min_lr_frac);
    model_update(model, *lr, a->beta1, a->beta2, 1e-8f, a->weight_decay, step + 1, scale);
}

// -rl: GRPO post-training (rollouts, advantages, the clipped objective with a KL penalty, run_grpo)
#include "dev/moe/grpo.h"

// ----------------------------------------------------------------------------
// main: the training loop

#ifndef TESTING
int main(int argc, char** argv) {
    gentle_omp_wait_policy(argv);
    dist_init(&argc, &argv);
    Args a;
    parse_args(&a, argc, argv);
    Tokenizer tk;
    if (tokenizer_init(&tk, a.tokenizer) != 0) exit(EXIT_FAILURE);
    Model model;
    TrainState st;
    char* resume_path = model_start(&model, &st, &a, &tk);
    const char* one_process = a.rl_file ? "-rl (GRPO)" : a.fwd_in ? "-fi/-fo (forward only)"
                            : a.eval_only ? "-ex (eval only)" : NULL;
    dist_setup(a.ep, a.B, one_process, &model.config);
    Model* eval_model = dist_shard_model(&model); // expert parallel: the whole model, on rank 0
    MoEConfig* c = &model.config;
    if (tk.ok && tk.V != c->V)
        fprintf(stderr, "warning: tokenizer '%s' has V=%d but the model has V=%d\n", a.tokenizer,
                tk.V, c->V);
    if (a.fwd_in) return run_forward_only(&model, a.fwd_in, a.fwd_out, a.B, a.T);

    print_model_summary(c, eval_model->num_params);
    int nthreads = 1;
#ifdef OMP
    nthreads = omp_get_max_threads();
#endif
    printf("train: B=%d T=%d grad_accum=%d steps=%d lr=%g warmup=%d min_lr=%g wd=%g clip=%g "
           "threads=%d\n",
           a.B, a.T, a.grad_accum, a.steps, a.lr, a.warmup, a.lr * a.min_lr_frac, a.weight_decay,
           a.grad_clip, nthreads);
    int nsets = 0;
    EvalSet* sets = evalsets_load(a.eval_files, c->V, a.T, &nsets);
    DataLoader train, val;
    if (!a.rl_file) {
        loader_init(&train, a.train_glob, "-i", a.B, a.T, c->V, a.shuffle, st.seed);
        loader_seek(&train, st.pos);
    }
    loader_init(&val, a.val_glob, "-j", a.B, a.T, c->V, 0, st.seed);
    // activations for this rank's sequences of a batch; the model that evaluates, for whole batches
    int rl_rows = a.rl_file ? a.grpo.P * a.grpo.G / a.grpo.M : 0;
    model_alloc_acts(&model,
                     dist.rank == 0 && dist.ep == 1 ? (a.B > rl_rows ? a.B : rl_rows)
                                                    : a.B / dist.world,
                     a.T);
    if (eval_model != &model) model_alloc_acts(eval_model, a.B, a.T);
    FILE* logf = open_log(a.out_dir);
    int eot = tk.ok ? tk.eot : 0;
    if (a.eval_only) {
        printf("val loss %.4f\n", eval_val_loss(&model, &val, a.val_batches));
        run_task_evals(&model, sets, nsets, &tk, eot, &a, logf, st.step);
        return 0;
    }
    int rc = 0;
    if (a.rl_file) rc = run_grpo(&model, &a, &st, &tk, sets, nsets, &val, logf);
    double tokens_per_step = (double)a.B * a.T * a.grad_accum, profiled_ms = 0;
    int profiled = 0, first_step = st.step;
    for (int step = st.step; step < a.steps && !a.rl_file; step++) {
        double t0 = now_ms(), terms[4];
        float lr, norm;
        phase_clock.on = a.profile_every > 0; // training steps only, not the evals
        training_step(&model, &train, &a, step, terms, &lr, &norm);
        phase_mark(PH_OPTIMIZER);
        phase_clock.on = 0;
        double ms = now_ms() - t0;
        printf("step %5d/%d | loss %.6f (ce %.4f aux %.4f z %.4f) | lr %.2e | norm %.4f | %.1f ms "
               "| %.0f tok/s\n",
               step + 1, a.steps, terms[0], terms[1], terms[2], terms[3], lr, norm, ms,
               tokens_per_step / (ms / 1e3));
        fflush(stdout);
        if (logf) fprintf(logf, "step %d loss %.6f ce %.6f aux %.6f z %.6f lr %.6e norm %.6f ms %.3f\n",
                          step + 1, terms[0], terms[1], terms[2], terms[3], lr, norm, ms);
        int last = step + 1 == a.steps;
        if (a.profile_every > 0) {
            profiled_ms += ms;
            if (++profiled == a.profile_every || last) {
                print_phase_table(logf, step + 1, profiled, profiled_ms);
                profiled = 0;
                profiled_ms = 0;
            }
        }
        int val_now = a.val_every > 0 && ((step + 1) % a.val_every == 0 || last);
        int sample_now = a.sample_every > 0 && ((step + 1) % a.sample_every == 0 || last);
        int ckpt_now = a.out_dir && ((a.ckpt_every > 0 && (step + 1) % a.ckpt_every == 0) || last);
        if (dist.ep > 1 && (val_now || sample_now || ckpt_now))
            dist_gather_model(eval_model, &model, ckpt_now);
        if (val_now) {
            if (dist.world > 1) dist_mean_router_losses(&model); // the last micro-batch's aux and z
            if (dist.rank == 0) { // across processes rank 0 evaluates alone, on the whole model
                print_router_stats(&model, logf, step + 1); // routing of the last training micro-batch
                evaluate(eval_model, &val, sets, nsets, &tk, &a, logf, step + 1);
            }
        }
        if (sample_now && dist.rank == 0) {
            printf("--- sample ---\n");
            generate(eval_model, &tk, eot, a.gen_len, &st.rng);
            printf("--------------\n");
        }
        if (ckpt_now) {
            if (dist.world > 1) dist_check_replicas(&model);
            if (dist.rank == 0)
                save_checkpoint(eval_model, a.out_dir,
                                (TrainState){step + 1, train.pos, st.rng, st.seed});
        }
        if (val_now || sample_now || ckpt_now) dist_wait_all();
        if (logf) fflush(logf);
    }
    ep_report_traffic(a.steps - first_step, tokens_per_step, c);
    if (logf) fclose(logf);
    for (int i = 0; i < nsets; i++) evalset_free(&sets[i]);
    free(sets);
    if (!a.rl_file) loader_free(&train);
    loader_free(&val);
    tokenizer_free(&tk);
    model_free(&model);
    if (eval_model != &model) model_free(eval_model);
    free(resume_path);
    dist_finalize();
    return rc;
}
#endif
#endif // MOE_LAYERS_ONLY
