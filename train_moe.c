/*
Mixture-of-experts language-model training in one C file: a Mixtral-style sparse Transformer
(RMSNorm, RoPE attention with grouped-query heads, a top-k router over E SwiGLU experts), its
hand-written backward pass, AdamW, the data loader, checkpoints and the eval loop.
The math is the contract in dev/MODEL.md; dev/moe_ref.py is the independent PyTorch twin that
test_moe.c checks this file against, tensor by tensor.

The MoE layer reads as a pipeline:  router -> topk -> permute -> experts -> unpermute
Only the K chosen experts of a token are computed (dropless): every buffer of the expert path has
N*K rows (N = B*T tokens), never N*E.

Build: make train_moe          Run: ./train_moe -h
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
#ifdef TESTING
#include <sys/wait.h>
#endif
#ifdef OMP
#include <omp.h>
#endif
#ifdef USE_BLAS
#include <cblas.h>
#endif
#ifdef USE_MPI
#include <mpi.h>
#endif

// ----------------------------------------------------------------------------
// utilities: checked I/O and allocation, RNG, clock

static void die(const char* fmt, const char* a, const char* file, int line) {
    fprintf(stderr, "Error: ");
    fprintf(stderr, fmt, a);
    fprintf(stderr, "\n  (at %s:%d)\n", file, line);
    exit(EXIT_FAILURE);
}

static FILE* fopen_check(const char* path, const char* mode, const char* file, int line) {
    FILE* fp = fopen(path, mode);
    if (fp == NULL) {
        fprintf(stderr, "Error: cannot open '%s' (mode %s): %s\n  (at %s:%d)\n", path, mode, strerror(errno), file, line);
        exit(EXIT_FAILURE);
    }
    return fp;
}
#define fopenCheck(path, mode) fopen_check(path, mode, __FILE__, __LINE__)

// read exactly n items or fail naming the file
static void fread_check(void* ptr, size_t size, size_t n, FILE* fp, const char* path, const char* file, int line) {
    size_t got = fread(ptr, size, n, fp);
    if (got != n) {
        fprintf(stderr, "Error: '%s' is truncated: wanted %zu items of %zu bytes, got %zu\n  (at %s:%d)\n",
                path, n, size, got, file, line);
        exit(EXIT_FAILURE);
    }
}
#define freadCheck(ptr, size, n, fp, path) fread_check(ptr, size, n, fp, path, __FILE__, __LINE__)

static void* malloc_check(size_t size, const char* file, int line) {
    void* p = malloc(size ? size : 1);
    if (p == NULL) {
        fprintf(stderr, "Error: out of memory allocating %zu bytes\n  (at %s:%d)\n", size, file, line);
        exit(EXIT_FAILURE);
    }
    return p;
}
#define mallocCheck(size) malloc_check(size, __FILE__, __LINE__)

static void* calloc_check(size_t n, size_t size, const char* file, int line) {
    void* p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL) {
        fprintf(stderr, "Error: out of memory allocating %zu x %zu bytes\n  (at %s:%d)\n", n, size, file, line);
        exit(EXIT_FAILURE);
    }
    return p;
}
#define callocCheck(n, size) calloc_check(n, size, __FILE__, __LINE__)

// The file readers (shards, tokenizer, checkpoints, eval files, the test's debug state) report and
// return instead of exiting: on bad bytes each prints "Error: ..." naming the file, frees what it
// allocated and returns NULL or -1. The trainer then exits; the fuzz harnesses in dev/fuzz go on.
static int read_error(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "Error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    return -1;
}

static FILE* fopen_report(const char* path) {
    FILE* fp = fopen(path, "rb");
    if (fp == NULL) read_error("cannot open '%s': %s", path, strerror(errno));
    return fp;
}

static int fread_report(void* ptr, size_t size, size_t n, FILE* fp, const char* path) {
    size_t got = fread(ptr, size, n, fp);
    if (got == n) return 0;
    return read_error("'%s' is truncated: wanted %zu items of %zu bytes, got %zu", path, n, size, got);
}

static long file_size(FILE* fp) {
    long here = ftell(fp);
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, here, SEEK_SET);
    return n;
}

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

// per-phase step time (-pf N): phase_mark(ph) adds the time since the previous mark to phase ph.
// The marks sit between the calls of model_forward, model_backward and the optimizer (outside any
// parallel region), so a step reads as a table: where an MoE step goes.
enum { PH_NONE = -1, PH_EMBED, PH_ATTN_FWD, PH_ATTN_BWD, PH_ROUTE_FWD, PH_ROUTE_BWD, PH_EXPERTS_FWD, PH_EXPERTS_BWD,
       PH_UNPERM_FWD, PH_UNPERM_BWD, PH_CLASSIFIER_FWD, PH_CLASSIFIER_BWD, PH_OPTIMIZER, NUM_PHASES };
static struct { int on; double last; double ms[NUM_PHASES]; } phase_clock;
static void phase_mark(int ph) {
    if (!phase_clock.on) return;
    double t = now_ms();
    if (ph >= 0) phase_clock.ms[ph] += t - phase_clock.last;
    phase_clock.last = t;
}

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
    float t = x * 1.44269504088896341f + 12582912.0f; // + 1.5*2^23 rounds x/ln2 to an integer in t's low bits
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

// a scratch buffer that grows on demand (used by the GEMM's packing)
typedef struct { float* data; size_t cap; } Scratch;
static float* scratch_get(Scratch* s, size_t n) {
    if (n > s->cap) {
        free(s->data);
        s->data = (float*)mallocCheck(n * sizeof(float));
        s->cap = n;
    }
    return s->data;
}

// ----------------------------------------------------------------------------
// GEMM: every matmul of the model goes through here
//   c[M,N] (= or +=) A.B   with A(i,k) = a[i*sai + k*sak], B(k,j) = b[k*sbk + j*sbj]
// so the same routine serves x.W^T (forward), dy.W (input grad) and dy^T.x (weight grad).
// Both operands are packed into panels (A: MR rows at a time, B: NR columns at a time, each
// k-major), then each MR x NR tile of c is a register-resident micro-kernel over a KC-deep slice
// of k, the tiles taken in cache-sized blocks (gemm_batch).

#define GEMM_MR 8
#define GEMM_NR 32
// cache blocking of gemm_batch's tiles: a thread computes a block of (up to) MC A panels x NC B
// slivers, MC*MR rows x NC*NR columns of c, one KC-deep slice of k at a time. The slices are what
// changes the sums' rounding (k runs in the same order in every build and at any thread count).
#ifndef GEMM_KC
#define GEMM_KC 256
#endif
#ifndef GEMM_MC
#define GEMM_MC 8
#endif
#ifndef GEMM_NC
#define GEMM_NC 8
#endif
static __thread Scratch gemm_apack, gemm_bpack; // per calling thread: GRPO's rollouts decode on several at once

// A(r,k) = ap[r*ars + k*aks] for the MR rows of the tile; B(k,j) = bp[k*bks + j], an NR-wide
// sliver (packed: bks = NR; read in place: the row stride); c(r,j) = c[r*csr + j*csc]
static inline void gemm_micro(int K, const float* ap, size_t ars, size_t aks, const float* bp, size_t bks,
                              float* c, size_t csr, size_t csc, int mr, int nr, int accumulate) {
    float acc[GEMM_MR][GEMM_NR];
    for (int r = 0; r < GEMM_MR; r++)
        for (int j = 0; j < GEMM_NR; j++) acc[r][j] = 0.0f;
    for (int k = 0; k < K; k++) {
        const float* bk = bp + (size_t)k * bks;
        const float* ak = ap + (size_t)k * aks;
        for (int r = 0; r < GEMM_MR; r++) {
            float av = ak[r * ars];
            for (int j = 0; j < GEMM_NR; j++) acc[r][j] += av * bk[j];
        }
    }
    if (csc == 1) {
        for (int r = 0; r < mr; r++) {
            float* crow = c + r * csr;
            if (accumulate) { for (int j = 0; j < nr; j++) crow[j] += acc[r][j]; }
            else            { for (int j = 0; j < nr; j++) crow[j] = acc[r][j]; }
        }
    } else { // c transposed (gemm_batch's swapped problems): a column of the tile is contiguous
        for (int j = 0; j < nr; j++) {
            float* ccol = c + j * csc;
            if (accumulate) { for (int r = 0; r < mr; r++) ccol[r * csr] += acc[r][j]; }
            else            { for (int r = 0; r < mr; r++) ccol[r * csr] = acc[r][j]; }
        }
    }
}

// pack rows r0..r0+W-1 (of R) of the operand X(r,k) = x[r*sr + k*sk] into dst[k*W + r-r0], zeros past R.
// The loop runs along whichever index is contiguous in memory, so reads stream (and vectorise).
static void gemm_pack(float* dst, const float* x, int r0, int R, int K, size_t sr, size_t sk, int W) {
    int w = R - r0 < W ? R - r0 : W;
    if (w < W) memset(dst, 0, (size_t)K * W * sizeof(float));
    if (sr == 1) { // rows contiguous: copy W floats per k
        for (int k = 0; k < K; k++)
            for (int r = 0; r < w; r++) dst[(size_t)k * W + r] = x[k * sk + r0 + r];
    } else {       // k contiguous (or neither): walk each row along k
        for (int r = 0; r < w; r++) {
            const float* xr = x + (size_t)(r0 + r) * sr;
            for (int k = 0; k < K; k++) dst[(size_t)k * W + r] = xr[k * sk];
        }
    }
}

#ifdef USE_BLAS
// make USE_BLAS=1: every product through cblas_sgemm. The operand X(r,c) = x[r*sr + c*sc] of
// rows x cols is, to row-major BLAS, x itself with ld = sr (sc = 1), or the transpose of a
// cols x rows matrix with ld = sc (sr = 1); 0 if it is neither
static int blas_layout(size_t sr, size_t sc, int rows, int cols, CBLAS_TRANSPOSE* t, int* ld) {
    if (sc == 1 && (sr >= (size_t)cols || rows == 1)) { *t = CblasNoTrans; *ld = (int)(sr > (size_t)cols ? sr : (size_t)cols); return 1; }
    if (sr == 1 && (sc >= (size_t)rows || cols == 1)) { *t = CblasTrans; *ld = (int)(sc > (size_t)rows ? sc : (size_t)rows); return 1; }
    return 0;
}
#endif

// A grouped GEMM: G independent products c_g[M_g,N_g] (= or +=) A_g.B_g, with K_g, sharing the
// operand strides. All their slivers are packed in one parallel loop and all their tiles computed in
// another, so many small products (the experts, each with the rows routed to it) share the threads
// with one barrier between the phases instead of a parallel region each. A plain GEMM is G = 1.
typedef struct { float* c; const float* a; const float* b; int M, N, K; } GemmProblem;

static void gemm_batch(const GemmProblem* p, int G, size_t sai, size_t sak, size_t sbk, size_t sbj, int accumulate) {
    // B is packed into NR-wide slivers; A is read in place when its rows are contiguous along k
    // (and packed otherwise, and for a ragged last sliver). When packing A instead costs less, the
    // batch computes the transposed problem c^T = B^T.A^T (the same products summed in the same
    // order, so the same bits) and stores c transposed: x.W^T with fewer rows than W (an expert's
    // rows) packs x instead of W. (Reading B in place too, with its row stride, was measured
    // slower: a 32-float sliver strided by a power-of-two row fights over a few cache sets.)
    int swap = 0;
#ifndef USE_BLAS
    {
        size_t mk = 0, nk = 0;
        for (int g = 0; g < G; g++) { mk += (size_t)p[g].M * p[g].K; nk += (size_t)p[g].N * p[g].K; }
        size_t cost = (sak == 1 ? 0 : mk) + nk, cost_swapped = (sbk == 1 ? 0 : nk) + mk;
        swap = cost_swapped < cost;
    }
#endif
    GemmProblem* ps = NULL;
    if (swap) {
        ps = (GemmProblem*)mallocCheck((size_t)G * sizeof(GemmProblem));
        for (int g = 0; g < G; g++) ps[g] = (GemmProblem){p[g].c, p[g].b, p[g].a, p[g].N, p[g].M, p[g].K};
        p = ps;
        size_t t1 = sai, t2 = sak;
        sai = sbj; sak = sbk; sbk = t2; sbj = t1;
    }
    int direct = sak == 1;
    // per problem: where its packed slivers and its blocks of tiles start (prefix sums over the problems)
    size_t* at = (size_t*)mallocCheck(4 * (size_t)(G + 1) * sizeof(size_t));
    size_t *bt = at + (G + 1), *aoff = bt + (G + 1), *boff = aoff + (G + 1); // sliver and float offsets
    size_t* blocks = (size_t*)mallocCheck((size_t)(G + 1) * sizeof(size_t));
    at[0] = bt[0] = aoff[0] = boff[0] = blocks[0] = 0;
    size_t ntiles = 0;
    for (int g = 0; g < G; g++) {
        int M = p[g].M, N = p[g].N, K = p[g].K;
        int mt = M > 0 && N > 0 ? (M + GEMM_MR - 1) / GEMM_MR : 0, nt = M > 0 && N > 0 ? (N + GEMM_NR - 1) / GEMM_NR : 0;
        if (K <= 0 && !accumulate) // an empty sum: c = 0
            for (int i = 0; i < M; i++) memset(p[g].c + (size_t)i * N, 0, N * sizeof(float));
        if (K <= 0) mt = nt = 0;
#ifdef USE_BLAS
        CBLAS_TRANSPOSE ta, tb;
        int lda, ldb;
        if (mt && blas_layout(sai, sak, M, K, &ta, &lda) && blas_layout(sbk, sbj, K, N, &tb, &ldb)) {
            cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, 1.0f, p[g].a, lda, p[g].b, ldb, accumulate ? 1.0f : 0.0f, p[g].c, N);
            mt = nt = 0;
        }
#endif
        at[g + 1] = at[g] + mt;
        bt[g + 1] = bt[g] + nt;
        aoff[g + 1] = aoff[g] + (size_t)mt * GEMM_MR * (K > 0 ? K : 0);
        boff[g + 1] = boff[g] + (size_t)nt * GEMM_NR * (K > 0 ? K : 0);
        ntiles += (size_t)mt * nt;
    }
    // blocks of MC x NC tiles, smaller where the batch has too few tiles to keep every thread busy
    int mc = GEMM_MC, nc = GEMM_NC, nth = 1;
#ifdef OMP
    nth = omp_in_parallel() ? 1 : omp_get_max_threads();
#endif
    while (mc * nc > 1 && ntiles < (size_t)mc * nc * 4 * nth) {
        if (mc >= nc) mc = (mc + 1) / 2;
        else nc = (nc + 1) / 2;
    }
    for (int g = 0; g < G; g++) {
        int mt = (int)(at[g + 1] - at[g]), nt = (int)(bt[g + 1] - bt[g]);
        blocks[g + 1] = blocks[g] + (size_t)((mt + mc - 1) / mc) * ((nt + nc - 1) / nc);
    }
    float* ap = scratch_get(&gemm_apack, aoff[G]);
    float* bp = scratch_get(&gemm_bpack, boff[G]);
    long nslivers = (long)(at[G] + bt[G]), nblocks = (long)blocks[G];
    #pragma omp parallel
    {
        int g = 0;
        #pragma omp for schedule(static)
        for (long s = 0; s < nslivers; s++) { // A slivers of every problem, then B slivers
            if (s < (long)at[G]) {
                while ((size_t)s >= at[g + 1]) g++;
                int it = (int)(s - at[g]);
                const GemmProblem* q = p + g;
                if (!direct || (it + 1) * GEMM_MR > q->M)
                    gemm_pack(ap + aoff[g] + (size_t)it * GEMM_MR * q->K, q->a, it * GEMM_MR, q->M, q->K, sai, sak, GEMM_MR);
            } else {
                size_t sb = (size_t)s - at[G];
                int h = 0;
                while (sb >= bt[h + 1]) h++;
                int jt = (int)(sb - bt[h]);
                const GemmProblem* q = p + h;
                gemm_pack(bp + boff[h] + (size_t)jt * GEMM_NR * q->K, q->b, jt * GEMM_NR, q->N, q->K, sbj, sbk, GEMM_NR);
            }
        }
        g = 0;
        #pragma omp for schedule(static)
        for (long t = 0; t < nblocks; t++) {
            while ((size_t)t >= blocks[g + 1]) g++;
            const GemmProblem* q = p + g;
            int M = q->M, N = q->N, K = q->K;
            int mt = (M + GEMM_MR - 1) / GEMM_MR, nt = (N + GEMM_NR - 1) / GEMM_NR;
            int mb = (mt + mc - 1) / mc, nb = (nt + nc - 1) / nc;
            // walk the blocks with those of the larger operand outermost, so each of its blocks is
            // fetched once while the smaller operand's block stays in cache
            size_t idx = (size_t)t - blocks[g];
            int bi = M > N ? (int)(idx / nb) : (int)(idx % mb);
            int bj = M > N ? (int)(idx % nb) : (int)(idx / mb);
            int it1 = (bi + 1) * mc < mt ? (bi + 1) * mc : mt;
            int jt1 = (bj + 1) * nc < nt ? (bj + 1) * nc : nt;
            size_t tr = swap ? 1 : (size_t)N, tc = swap ? (size_t)M : 1; // c's strides: row, column
            // the block's KC-deep slices in turn: each A panel (MR x KC) stays in L1 while it meets
            // the block's B slivers (KC x NR each), which stay in L2 while every A panel meets them
            for (int k0 = 0; k0 < K; k0 += GEMM_KC) {
                int kc = K - k0 < GEMM_KC ? K - k0 : GEMM_KC;
                int acc = accumulate || k0 > 0; // later slices add to what the first one wrote
                for (int it = bi * mc; it < it1; it++) {
                    int i0 = it * GEMM_MR, mr = M - i0 < GEMM_MR ? M - i0 : GEMM_MR;
                    int in_place = direct && mr == GEMM_MR;
                    const float* a_t = in_place ? q->a + (size_t)i0 * sai + (size_t)k0 * sak
                                                : ap + aoff[g] + (size_t)it * GEMM_MR * K + (size_t)k0 * GEMM_MR;
                    for (int jt = bj * nc; jt < jt1; jt++) {
                        int j0 = jt * GEMM_NR, nr = N - j0 < GEMM_NR ? N - j0 : GEMM_NR;
                        const float* b_t = bp + boff[g] + (size_t)jt * GEMM_NR * K + (size_t)k0 * GEMM_NR;
                        gemm_micro(kc, a_t, in_place ? sai : 1, in_place ? sak : GEMM_MR, b_t, GEMM_NR,
                                   q->c + (size_t)i0 * tr + (size_t)j0 * tc, tr, tc, mr, nr, acc);
                    }
                }
            }
        }
    }
    free(ps);
    free(at);
    free(blocks);
}

// the problems go in batches whose packed operands fit in cache (GEMM_BATCH_FLOATS), so what a
// batch packs is still there when its tiles read it
#ifndef GEMM_BATCH_FLOATS
#define GEMM_BATCH_FLOATS (256 * 1024)
#endif
void gemm_grouped(const GemmProblem* p, int G, size_t sai, size_t sak, size_t sbk, size_t sbj, int accumulate) {
    for (int g0 = 0, g1; g0 < G; g0 = g1) {
        size_t floats = 0;
        for (g1 = g0; g1 < G; g1++) {
            size_t f = ((size_t)p[g1].M + p[g1].N + GEMM_MR + GEMM_NR) * (p[g1].K > 0 ? p[g1].K : 0);
            if (g1 > g0 && floats + f > GEMM_BATCH_FLOATS) break;
            floats += f;
        }
        gemm_batch(p + g0, g1 - g0, sai, sak, sbk, sbj, accumulate);
    }
}

void gemm(float* c, const float* a, const float* b, int M, int N, int K,
          size_t sai, size_t sak, size_t sbk, size_t sbj, int accumulate) {
    GemmProblem p = {c, a, b, M, N, K};
    gemm_grouped(&p, 1, sai, sak, sbk, sbj, accumulate);
}

// out[N,OC] = inp[N,IC] . weight[OC,IC]^T
void matmul_forward(float* out, const float* inp, const float* weight, int N, int IC, int OC) {
    gemm(out, inp, weight, N, OC, IC, IC, 1, 1, IC, 0);
}
// dinp[N,IC] += dout[N,OC] . weight[OC,IC];  dweight[OC,IC] += dout^T . inp
void matmul_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                     int N, int IC, int OC) {
    if (dinp) gemm(dinp, dout, weight, N, IC, OC, OC, 1, IC, 1, 1);
    gemm(dweight, dout, inp, OC, IC, N, 1, OC, IC, 1, 1);
}

// ----------------------------------------------------------------------------
// layers: embedding, RMSNorm, RoPE, attention

// out[N,C] = wte[tokens[n], :]
void encoder_forward(float* out, const int* tokens, const float* wte, int N, int C) {
    for (int n = 0; n < N; n++) memcpy(out + (size_t)n * C, wte + (size_t)tokens[n] * C, C * sizeof(float));
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
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps) {
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
void rope_apply(float* x, const float* freqs_cos, const float* freqs_sin, int B, int T, int NH, int D, int dir) {
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

// Attention per (batch, head) is a few small matrix products, run on gemm's micro-kernel by the
// thread that owns the head (gemm_serial), skipping what the causal mask makes zero:
//   CAUSAL_TILES  c(i,j) is needed for j <= i only: tiles wholly above the diagonal are skipped
//   K_UPTO_ROW    A(i,k) = 0 for k > i (a causal P or dS times V, K): the tile of rows i0.. sums k < i0 + MR
//   K_FROM_ROW    A(i,k) = 0 for k < i (P^T or dS^T times dO, Q): the tile of rows i0.. sums k >= i0
enum { GEMM_FULL, CAUSAL_TILES, K_UPTO_ROW, K_FROM_ROW };

// c[M,N] (= or +=) A.B on the calling thread, A(i,k) = a[i*sai + k*sak] read in place (a ragged
// last tile of rows through apack, MR x K), B(k,j) = b[k*sbk + j*sbj] packed into bpack
// (ceil(N/NR)*NR x K); c(i,j) = c[i*ldc + j]
static void gemm_serial(float* c, size_t ldc, const float* a, size_t sai, size_t sak, const float* b, size_t sbk,
                        size_t sbj, int M, int N, int K, int mode, int accumulate, float* apack, float* bpack) {
    int nt = (N + GEMM_NR - 1) / GEMM_NR;
    for (int jt = 0; jt < nt; jt++) gemm_pack(bpack + (size_t)jt * GEMM_NR * K, b, jt * GEMM_NR, N, K, sbj, sbk, GEMM_NR);
    for (int i0 = 0; i0 < M; i0 += GEMM_MR) {
        int mr = M - i0 < GEMM_MR ? M - i0 : GEMM_MR;
        int k0 = mode == K_FROM_ROW ? i0 : 0;
        int k1 = mode == K_UPTO_ROW && i0 + GEMM_MR < K ? i0 + GEMM_MR : K;
        const float* ap = a + (size_t)i0 * sai + (size_t)k0 * sak;
        size_t ars = sai, aks = sak;
        if (mr < GEMM_MR) {
            gemm_pack(apack, a + (size_t)k0 * sak, i0, M, k1 - k0, sai, sak, GEMM_MR);
            ap = apack; ars = 1; aks = GEMM_MR;
        }
        for (int jt = 0; jt < nt; jt++) {
            int j0 = jt * GEMM_NR;
            if (mode == CAUSAL_TILES && j0 > i0 + mr - 1) break;
            int nr = N - j0 < GEMM_NR ? N - j0 : GEMM_NR;
            gemm_micro(k1 - k0, ap, ars, aks, bpack + (size_t)jt * GEMM_NR * K + (size_t)k0 * GEMM_NR, GEMM_NR,
                       c + (size_t)i0 * ldc + j0, ldc, 1, mr, nr, accumulate);
        }
    }
}

// per-thread scratch of attention: apack, bpack for gemm_serial on T x D operands, and a T x T block
static float* attention_scratch(int T, int D, float** apack, float** bpack, float** tt) {
    size_t pa = (size_t)GEMM_MR * (T > D ? T : D);
    size_t pb1 = (size_t)(T + GEMM_NR - 1) / GEMM_NR * GEMM_NR * D, pb2 = (size_t)(D + GEMM_NR - 1) / GEMM_NR * GEMM_NR * T;
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
                gemm_serial(out + (size_t)b * T * HD + (size_t)h * D, HD, p, T, 1, vb, KD, 1, T, D, T, K_UPTO_ROW, 0,
                            apack, bpack);
            }
        free(mem);
    }
}
// gradients into dq, dk, dv (all overwritten). Parallel over (b, kv head): the query heads sharing a
// kv head add into its dk/dv in a fixed order, so the bits do not depend on the thread count.
//   dP = dO.V^T   dS = P * (dP - rowsum(P * dP)) * scale   dQ = dS.K   dK += dS^T.Q   dV += P^T.dO
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* att,
                        const float* q, const float* k, const float* v, int B, int T, int H, int Hkv, int D) {
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
                    gemm_serial(ds, T, dob, HD, 1, vb, 1, KD, T, T, D, CAUSAL_TILES, 0, apack, bpack); // dP
                    for (int t = 0; t < T; t++) { // dS through the softmax and the scale, zero above the diagonal
                        const float* pt = p + (size_t)t * T;
                        float* dst = ds + (size_t)t * T;
                        float pdp = vdot(pt, dst, t + 1);
                        for (int t2 = 0; t2 <= t; t2++) dst[t2] = pt[t2] * (dst[t2] - pdp) * scale;
                        for (int t2 = t + 1; t2 < T; t2++) dst[t2] = 0.0f;
                    }
                    gemm_serial(dq + (size_t)b * T * HD + (size_t)h * D, HD, ds, T, 1, kb, KD, 1, T, D, T, K_UPTO_ROW, 0,
                                apack, bpack);
                    int first = h == hk * group; // the first head of the group writes dK, dV; the others add
                    gemm_serial(dkb, KD, ds, 1, T, qb, HD, 1, T, D, T, K_FROM_ROW, !first, apack, bpack);
                    gemm_serial(dvb, KD, p, 1, T, dob, HD, 1, T, D, T, K_FROM_ROW, !first, apack, bpack);
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

// the K largest logits of each token (larger first; equal logits: lower expert index first),
// and the gates: softmax over those K logits only
// the K largest router logits of each token (ties to the lower index) and their gates (softmax over
// those K). A NaN logit counts as -inf, so an index is always chosen; returns the number of tokens
// whose logits are not all finite, which the caller turns into an error (router_check).
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
                if (best < 0 || ze > bestz) { best = e; bestz = ze; } // strict '>' keeps the lower index on ties
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
void permute_plan(int* counts, int* offs, int* row_of, int* tok_of, const int* topi, int N, int E, int K) {
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
    for (int r = 0; r < NK; r++) memcpy(xe + (size_t)r * C, m + (size_t)tok_of[r] * C, C * sizeof(float));
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
static int expert_problems(GemmProblem* p, const int* offs, int E, float* c, size_t c_row, const float* a, size_t a_row,
                           const float* b, size_t b_expert, int N, int K) {
    int g = 0;
    for (int e = 0; e < E; e++) {
        int r0 = offs[e], n = offs[e + 1] - offs[e];
        if (n == 0) continue;
        GemmProblem q = {c + (size_t)r0 * c_row, a + (size_t)r0 * a_row, b + (size_t)e * b_expert, n, N, K};
        p[g++] = q;
    }
    return g;
}

// the weight gradients of the experts that got rows: dw_e[M,N] += dy_e^T . x_e, summed over the n_e rows
static int expert_wgrad_problems(GemmProblem* p, const int* offs, int E, float* dw, const float* dy, size_t dy_row,
                                 const float* x, size_t x_row, int M, int N) {
    int g = 0;
    for (int e = 0; e < E; e++) {
        int r0 = offs[e], n = offs[e + 1] - offs[e];
        if (n == 0) continue;
        GemmProblem q = {dw + (size_t)e * M * N, dy + (size_t)r0 * dy_row, x + (size_t)r0 * x_row, M, N, n};
        p[g++] = q;
    }
    return g;
}

void experts_forward(float* ye, float* h1, float* h3, float* act, const float* xe,
                     const float* w1, const float* w3, const float* w2, const int* offs, int E, int C, int F) {
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
    g = expert_problems(p, offs, E, ye, C, act, F, w2, (size_t)C * F, C, F); // ye[n,C] = act[n,F] . w2[C,F]^T
    gemm_grouped(p, g, F, 1, 1, F, 0);
    free(p);
}
// given dye[NK,C]: dxe[NK,C] (=), dw1,dw3,dw2 (+=); dact, dh1, dh3 are scratch [NK,F]
void experts_backward(float* dxe, float* dw1, float* dw3, float* dw2, float* dact, float* dh1, float* dh3,
                      const float* dye, const float* xe, const float* h1, const float* h3, const float* act,
                      const float* w1, const float* w3, const float* w2, const int* offs, int E, int C, int F) {
    GemmProblem* p = (GemmProblem*)callocCheck(2 * (size_t)E, sizeof(GemmProblem));
    int g = expert_problems(p, offs, E, dact, F, dye, C, w2, (size_t)C * F, F, C); // dact[n,F] = dy[n,C] . w2[C,F]
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
void unpermute_forward(float* out, const float* res, const float* ye, const float* gate, const int* row_of,
                       int N, int K, int C) {
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
void router_losses(float* aux, float* zl, const float* z, const float* lse, const int* counts, int Nc, int N, int E, int K) {
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
void router_backward(float* dz, const float* dgate, const float* z, const float* lse, const int* topi,
                     const float* gate, const int* counts, int Nc, float daux, float dzl, int N, int E, int K) {
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
float crossentropy_forward(float* losses, float* probs, const float* logits, const int* targets, int N, int V,
                           float dloss) {
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
// in place: probs[N,V] becomes dlogits = dloss * (softmax - onehot) / counted; zero rows for ignored targets.
// With per-token weights (GRPO's objective), token n's loss enters as weights[n] * loss_n instead of
// loss_n / counted: dlogits = dloss * weights[n] * (softmax - onehot).
void crossentropy_backward(float* probs, const int* targets, const float* weights, float dloss, int N, int V) {
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
// processes (README "Beyond one process"; USE_MPI builds run under mpirun, the plain build is always
// one process). R = world ranks: every rank trains on B/R sequences of each global batch; the
// experts are sharded over groups of ep consecutive ranks (ep_rank p holds experts
// [p*E/ep, (p+1)*E/ep) of every layer), everything else is replicated on every rank.

typedef struct {
    int rank, world;   // in MPI_COMM_WORLD; world 1: one process, no MPI call is made
    int ep, ep_rank;   // expert-parallel group size, and this rank's place in its group
#ifdef USE_MPI
    MPI_Comm ep_comm;  // the ep ranks that send each other tokens (all-to-all)
    MPI_Comm edp_comm; // the world/ep ranks that hold the same experts (their gradients are all-reduced)
#endif
} Dist;
static Dist dist = {0, 1, 1, 0
#ifdef USE_MPI
                    , MPI_COMM_NULL, MPI_COMM_NULL
#endif
};

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
    size_t L = c->L, C = c->C, D = c->C / c->H, HD = c->H * D, KD = c->Hkv * D, E = c->E, F = c->F, V = c->V;
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
    float** ptrs[NUM_PARAM_TENSORS] = {&p->wte, &p->attn_norm, &p->wq, &p->wk, &p->wv, &p->wo, &p->moe_norm,
                                       &p->wr, &p->w1, &p->w3, &p->w2, &p->final_norm, &p->lm_head};
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
    float fused_dloss;  // > 0: model_forward with targets also writes the dlogits of model_backward(fused_dloss)
    float dlogits_dloss; // the fused_dloss of the last forward (0: none): model_backward skips crossentropy_backward
    // across processes: the experts held here are El of the E, from e0 (one process: all, from 0)
    int El, e0;
    int collective;      // 1: forward and backward are one rank's part of a step of every rank (all take part)
    int* gcounts;        // L x E  the expert counts over every rank's tokens (collective steps)
    int *rcounts, *offs_r; // El < E: L x ep x El rows each peer sends each local expert; L x (El+1) their offsets
    float *xr, *ye_r, *dye_r, *dxe_r, *ep_tmp; // El < E: the rows received for the local experts (xr: L x ..)
} Model;

// what is wrong with a configuration (NULL: nothing); msg holds the text
static const char* model_config_error(const MoEConfig* c, char* msg, size_t n) {
    const int big = 1 << 24;
    msg[0] = 0;
    if (c->V <= 0 || c->T <= 0 || c->L <= 0 || c->C <= 0 || c->H <= 0 || c->Hkv <= 0 || c->E <= 0 || c->K <= 0 || c->F <= 0)
        snprintf(msg, n, "every size must be positive (V=%d T=%d L=%d C=%d H=%d Hkv=%d E=%d K=%d F=%d)",
                 c->V, c->T, c->L, c->C, c->H, c->Hkv, c->E, c->K, c->F);
    else if (c->V > big || c->T > big || c->L > big || c->C > big || c->E > big || c->F > big)
        snprintf(msg, n, "a size above %d (V=%d T=%d L=%d C=%d E=%d F=%d)", big, c->V, c->T, c->L, c->C, c->E, c->F);
    else if ((double)c->L * c->E * c->C * c->F * 3 + (double)c->V * c->C * 2 + (double)c->L * c->C * c->C * 4 > 1e12)
        snprintf(msg, n, "more than 10^12 parameters (L=%d C=%d E=%d F=%d V=%d)", c->L, c->C, c->E, c->F, c->V);
    else if (c->K > c->E) snprintf(msg, n, "K=%d experts per token exceeds E=%d experts (flags -nk, -ne)", c->K, c->E);
    else if (c->C % c->H) snprintf(msg, n, "C=%d is not divisible by H=%d heads (flags -nc, -nh)", c->C, c->H);
    else if (c->H % c->Hkv) snprintf(msg, n, "H=%d is not divisible by Hkv=%d kv heads (flags -nh, -nkv)", c->H, c->Hkv);
    else if ((c->C / c->H) % 2) snprintf(msg, n, "head size D=C/H=%d must be even for RoPE (flags -nc, -nh)", c->C / c->H);
    else if (!(c->eps > 0) || !(c->theta > 0) || !isfinite(c->eps) || !isfinite(c->theta))
        snprintf(msg, n, "eps and theta must be positive and finite");
    else if (!(c->aux_coef >= 0) || !(c->z_coef >= 0) || !isfinite(c->aux_coef) || !isfinite(c->z_coef))
        snprintf(msg, n, "the aux and z loss coefficients must be finite and >= 0");
    return msg[0] ? msg : NULL;
}

static void model_config_check(const MoEConfig* c, const char* where) {
    char msg[256];
    if (model_config_error(c, msg, sizeof msg)) { fprintf(stderr, "Error: %s: %s\n", where, msg); exit(EXIT_FAILURE); }
}

// allocate parameters, gradients and the optimizer state (zeros), holding experts [e0, e0+El) of
// every layer (model_build: all of them)
void model_build_experts(Model* model, const MoEConfig* config, int e0, int El) {
    memset(model, 0, sizeof(*model));
    model->config = *config;
    fill_param_sizes(model->param_sizes, config);
    for (int t = 8; t <= 10; t++) model->param_sizes[t] = model->param_sizes[t] / config->E * El; // w1, w3, w2
    model->e0 = e0;
    model->El = El;
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
void model_build(Model* model, const MoEConfig* config) { model_build_experts(model, config, 0, config->E); }
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

static void model_alloc_acts(Model* model, int B, int T) {
    const MoEConfig* c = &model->config;
    size_t N = (size_t)B * T, L = c->L, C = c->C, D = c->C / c->H, HD = c->H * D, KD = c->Hkv * D;
    size_t E = c->E, K = c->K, F = c->F, NK = N * K, V = c->V;
    int sharded = model->El < c->E; // expert parallel: the experts here may get every slot of the group
    size_t NKx = NK * (sharded ? dist.ep : 1);
    size_t sizes[NUM_ACT_TENSORS] = {
        (L + 1) * N * C, L * N * C, L * N * C, L * N, L * N * HD, L * N * KD, L * N * KD,
        L * B * c->H * (size_t)T * T, L * N * HD, L * N * C, L * N, L * N * E, L * N, L * N * K,
        L * NK * C, L * NKx * F, L * NKx * F, L * NKx * F, L * NK * C, N * C};
    size_t total = 0;
    for (int i = 0; i < NUM_ACT_TENSORS; i++) total += sizes[i];
    model->acts_memory = (float*)mallocCheck(total * sizeof(float));
    float** ptrs[NUM_ACT_TENSORS] = {
        &model->acts.resid, &model->acts.resid_mid, &model->acts.a, &model->acts.a_rstd, &model->acts.q,
        &model->acts.k, &model->acts.v, &model->acts.att, &model->acts.atty, &model->acts.m, &model->acts.m_rstd,
        &model->acts.z, &model->acts.lse, &model->acts.gate, &model->acts.xe, &model->acts.h1, &model->acts.h3,
        &model->acts.act, &model->acts.ye, &model->acts.xf};
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
    model->dact = (float*)mallocCheck(NKx * F * sizeof(float));
    model->dh1 = (float*)mallocCheck(NKx * F * sizeof(float));
    model->dh3 = (float*)mallocCheck(NKx * F * sizeof(float));
    model->dlogits = (float*)mallocCheck(N * V * sizeof(float));
    if (dist.world > 1) model->gcounts = (int*)mallocCheck(L * E * sizeof(int));
    if (sharded) {
        size_t El = model->El;
        model->rcounts = (int*)mallocCheck(L * dist.ep * El * sizeof(int));
        model->offs_r = (int*)mallocCheck(L * (El + 1) * sizeof(int));
        model->xr = (float*)mallocCheck(L * NKx * C * sizeof(float));
        model->ye_r = (float*)mallocCheck(NKx * C * sizeof(float));
        model->dye_r = (float*)mallocCheck(NKx * C * sizeof(float));
        model->dxe_r = (float*)mallocCheck(NKx * C * sizeof(float));
        model->ep_tmp = (float*)mallocCheck(NKx * C * sizeof(float));
    }
    model->maxB = B;
    model->maxT = T;
}

static void model_free_acts(Model* model) {
    void* ptrs[] = {model->acts_memory, model->f_rstd, model->logits, model->losses, model->topi, model->counts,
                    model->offs, model->row_of, model->tok_of, model->freqs_cos, model->freqs_sin, model->dres,
                    model->dbuf, model->dq, model->dk, model->dv, model->datty, model->dz, model->dgate,
                    model->dxe, model->dye, model->dact, model->dh1, model->dh3, model->dlogits, model->gcounts,
                    model->rcounts, model->offs_r, model->xr, model->ye_r, model->dye_r, model->dxe_r, model->ep_tmp};
    for (size_t i = 0; i < sizeof(ptrs) / sizeof(ptrs[0]); i++) free(ptrs[i]);
    model->acts_memory = NULL;
}

void model_free(Model* model) {
    if (model->acts_memory) model_free_acts(model);
    free(model->params_memory); free(model->grads_memory); free(model->m_memory); free(model->v_memory);
    free(model->aux); free(model->zl);
}

// ----------------------------------------------------------------------------
// the collectives of a step across processes (dist.world > 1; the plain build never reaches the MPI calls)

// the expert counts over every rank's tokens: gc[E] = the sum over ranks of counts[E]
static void dist_sum_counts(int* gc, const int* counts, int E) {
#ifdef USE_MPI
    MPI_Allreduce(counts, gc, E, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
#else
    memcpy(gc, counts, E * sizeof(int));
#endif
}

// expert parallel, step 1: who sends whom how many rows. Peer p of the group owns experts
// [p*El, (p+1)*El); counts[E] are this rank's rows per expert. rc[p*El + j] = the rows peer p has
// for local expert j (an all-to-all of El counts per peer), offs_r[El+1] = where local expert j's
// rows start once they are grouped by expert (what experts_forward reads)
static void ep_plan(int* rc, int* offs_r, const int* counts, int El) {
#ifdef USE_MPI
    MPI_Alltoall(counts, El, MPI_INT, rc, El, MPI_INT, dist.ep_comm);
#else
    memcpy(rc, counts, El * sizeof(int));
#endif
    offs_r[0] = 0;
    for (int j = 0; j < El; j++) {
        int n = 0;
        for (int p = 0; p < dist.ep; p++) n += rc[p * El + j];
        offs_r[j + 1] = offs_r[j] + n;
    }
}

// the received rows arrive grouped by peer (and within a peer by expert); the experts want them
// grouped by expert (and within an expert by peer). to_expert 1: in (by peer) -> out (by expert); 0: back
static void ep_reorder(float* out, const float* in, const int* rc, int El, int W, int to_expert) {
    int P = dist.ep;
    size_t by_expert = 0;
    for (int j = 0; j < El; j++)
        for (int p = 0; p < P; p++) {
            size_t by_peer = 0; // rows before (p, j) in the peer-major order
            for (int q = 0; q < P; q++)
                for (int i = 0; i < El; i++)
                    if (q < p || (q == p && i < j)) by_peer += rc[q * El + i];
            size_t n = (size_t)rc[p * El + j] * W;
            if (to_expert) memcpy(out + by_expert * W, in + by_peer * W, n * sizeof(float));
            else memcpy(out + by_peer * W, in + by_expert * W, n * sizeof(float));
            by_expert += rc[p * El + j];
        }
}

double ep_sent[2]; // floats this rank gave the all-to-alls of ep_exchange: in all, and to other ranks

// expert parallel, steps 2 and 4: rows of width W between this rank and the owners of their experts.
// dir +1 (dispatch): src = this rank's rows in permute_plan order (counts[E] per expert) -> dst = the
// rows of the local experts, grouped by expert (offs_r). dir -1 (combine): the reverse. tmp: scratch
// as large as dst. The backward pass uses the same two exchanges, for dye and dxe.
static void ep_exchange(float* dst, const float* src, float* tmp, const int* counts, const int* rc, int El, int W, int dir) {
#ifdef USE_MPI
    int P = dist.ep;
    int* cnt = (int*)mallocCheck(4 * (size_t)P * sizeof(int)); // floats to/from each peer and their offsets
    int *sc = cnt, *sd = cnt + P, *rcv = cnt + 2 * P, *rd = cnt + 3 * P;
    for (int p = 0; p < P; p++) {
        sc[p] = 0; rcv[p] = 0;
        for (int j = 0; j < El; j++) { sc[p] += counts[p * El + j] * W; rcv[p] += rc[p * El + j] * W; }
        sd[p] = p ? sd[p - 1] + sc[p - 1] : 0;
        rd[p] = p ? rd[p - 1] + rcv[p - 1] : 0;
    }
    const int* out = dir > 0 ? sc : rcv; // what this rank sends
    for (int p = 0; p < P; p++) { ep_sent[0] += out[p]; ep_sent[1] += p == dist.ep_rank ? 0 : out[p]; }
    if (dir > 0) {
        MPI_Alltoallv(src, sc, sd, MPI_FLOAT, tmp, rcv, rd, MPI_FLOAT, dist.ep_comm);
        ep_reorder(dst, tmp, rc, El, W, 1);
    } else {
        ep_reorder(tmp, src, rc, El, W, 0);
        MPI_Alltoallv(tmp, rcv, rd, MPI_FLOAT, dst, sc, sd, MPI_FLOAT, dist.ep_comm);
    }
    free(cnt);
#else
    (void)dst; (void)src; (void)tmp; (void)counts; (void)rc; (void)El; (void)W; (void)dir;
    fprintf(stderr, "Error: expert parallelism needs the MPI build (make train_moe_mpi)\n");
    exit(EXIT_FAILURE);
#endif
}

// stop on non-finite router logits: training on them would only spread NaN (model->step says when)
void router_check(const Model* model, int layer, int nonfinite, int N) {
    if (nonfinite == 0) return;
    if (model->step >= 0) fprintf(stderr, "Error: step %d, layer %d: non-finite router logits (NaN or Inf) for %d of %d tokens\n",
                                  model->step, layer, nonfinite, N);
    else fprintf(stderr, "Error: layer %d: non-finite router logits (NaN or Inf) for %d of %d tokens\n", layer, nonfinite, N);
    exit(EXIT_FAILURE);
}

// forward pass on inputs[B,T]; with targets (may be NULL) it computes ce, aux, zl and loss.
// Buffers are laid out for (B,T) of this call, so any B*T <= maxB*maxT with T <= maxT works.
void model_forward(Model* model, const int* inputs, const int* targets, int B, int T) {
    const MoEConfig* c = &model->config;
    int L = c->L, C = c->C, H = c->H, Hkv = c->Hkv, D = C / H, E = c->E, K = c->K, F = c->F, V = c->V;
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
    int N = B * T, NK = N * K, HD = H * D, KD = Hkv * D;
    int El = model->El, sharded = El < E, coll = model->collective && dist.world > 1;
    int NKx = NK * (sharded ? dist.ep : 1); // rows of h1, h3, act: with expert parallelism, up to the group's
    if (sharded && !coll) {
        fprintf(stderr, "Error: a model holding %d of %d experts runs only as part of a step of every rank\n", El, E);
        exit(EXIT_FAILURE);
    }
    model->B = B; model->T = T; model->inputs = inputs; model->targets = targets;
    ParamTensors p = model->params;
    ActTensors a = model->acts;
    phase_mark(PH_NONE);
    encoder_forward(a.resid, inputs, p.wte, N, C);
    phase_mark(PH_EMBED);
    for (int l = 0; l < L; l++) {
        // seek to layer l's parameters and activations
        const float* wq = p.wq + (size_t)l * HD * C;
        const float* wk = p.wk + (size_t)l * KD * C;
        const float* wv = p.wv + (size_t)l * KD * C;
        const float* wo = p.wo + (size_t)l * C * HD;
        const float* wr = p.wr + (size_t)l * E * C;
        const float* w1 = p.w1 + (size_t)l * El * F * C;
        const float* w3 = p.w3 + (size_t)l * El * F * C;
        const float* w2 = p.w2 + (size_t)l * El * C * F;
        float* res = a.resid + (size_t)l * N * C;
        float* res_mid = a.resid_mid + (size_t)l * N * C;
        float* an = a.a + (size_t)l * N * C;
        float* q = a.q + (size_t)l * N * HD;
        float* k = a.k + (size_t)l * N * KD;
        float* v = a.v + (size_t)l * N * KD;
        float* att = a.att + (size_t)l * B * H * T * T;
        float* atty = a.atty + (size_t)l * N * HD;
        float* m = a.m + (size_t)l * N * C;
        float* z = a.z + (size_t)l * N * E;
        float* lse = a.lse + (size_t)l * N;
        float* gate = a.gate + (size_t)l * NK;
        int* topi = model->topi + (size_t)l * NK;
        int* counts = model->counts + (size_t)l * E;
        int* offs = model->offs + (size_t)l * (E + 1);
        int* row_of = model->row_of + (size_t)l * NK;
        int* tok_of = model->tok_of + (size_t)l * NK;
        float* xe = a.xe + (size_t)l * NK * C;
        float* h1 = a.h1 + (size_t)l * NKx * F;
        float* h3 = a.h3 + (size_t)l * NKx * F;
        float* act = a.act + (size_t)l * NKx * F;
        float* ye = a.ye + (size_t)l * NK * C;
        // attention block
        rmsnorm_forward(an, a.a_rstd + (size_t)l * N, res, p.attn_norm + (size_t)l * C, N, C, c->eps);
        matmul_forward(q, an, wq, N, C, HD);
        matmul_forward(k, an, wk, N, C, KD);
        matmul_forward(v, an, wv, N, C, KD);
        rope_apply(q, model->freqs_cos, model->freqs_sin, B, T, H, D, +1);
        rope_apply(k, model->freqs_cos, model->freqs_sin, B, T, Hkv, D, +1);
        attention_forward(atty, att, q, k, v, B, T, H, Hkv, D);
        matmul_forward(res_mid, atty, wo, N, HD, C);
        for (size_t i = 0; i < (size_t)N * C; i++) res_mid[i] += res[i];
        phase_mark(PH_ATTN_FWD);
        // MoE block: router -> topk -> permute -> experts -> unpermute
        rmsnorm_forward(m, a.m_rstd + (size_t)l * N, res_mid, p.moe_norm + (size_t)l * C, N, C, c->eps);
        router_forward(z, lse, m, wr, N, C, E);
        router_check(model, l, topk_forward(topi, gate, z, N, E, K), N);
        permute_plan(counts, offs, row_of, tok_of, topi, N, E, K);
        permute_forward(xe, m, tok_of, NK, C);
        phase_mark(PH_ROUTE_FWD);
        if (sharded) { // expert parallel: permute -> dispatch -> experts -> combine -> unpermute
            int* rc = model->rcounts + (size_t)l * dist.ep * El;
            int* offs_r = model->offs_r + (size_t)l * (El + 1);
            float* xr = model->xr + (size_t)l * NKx * C;
            ep_plan(rc, offs_r, counts, El);
            ep_exchange(xr, xe, model->ep_tmp, counts, rc, El, C, +1);
            experts_forward(model->ye_r, h1, h3, act, xr, w1, w3, w2, offs_r, El, C, F);
            ep_exchange(ye, model->ye_r, model->ep_tmp, counts, rc, El, C, -1);
        } else
            experts_forward(ye, h1, h3, act, xe, w1, w3, w2, offs, E, C, F);
        phase_mark(PH_EXPERTS_FWD);
        unpermute_forward(res + (size_t)N * C, res_mid, ye, gate, row_of, N, K, C);
        phase_mark(PH_UNPERM_FWD);
        const int* fc = counts; // the load-balancing counts: this batch's, or in a step of every rank, theirs
        if (coll) { fc = model->gcounts + (size_t)l * E; dist_sum_counts(model->gcounts + (size_t)l * E, counts, E); }
        router_losses(&model->aux[l], &model->zl[l], z, lse, fc, coll ? N * dist.world : N, N, E, K);
        phase_mark(PH_ROUTE_FWD);
    }
    rmsnorm_forward(a.xf, model->f_rstd, a.resid + (size_t)L * N * C, p.final_norm, N, C, c->eps);
    matmul_forward(model->logits, a.xf, p.lm_head, N, C, V);
    if (targets) {
        for (int i = 0; i < N; i++)
            if (targets[i] < -1 || targets[i] >= V) {
                fprintf(stderr, "Error: target %d at position %d is outside [0, V=%d) (and not -1)\n", targets[i], i, V);
                exit(EXIT_FAILURE);
            }
        model->ce = crossentropy_forward(model->losses, model->dlogits, model->logits, targets, N, V, model->fused_dloss);
        model->dlogits_dloss = model->fused_dloss > 0.0f ? model->fused_dloss : 0.0f;
        double loss = model->ce;
        for (int l = 0; l < L; l++) loss += (double)c->aux_coef * model->aux[l] + (double)c->z_coef * model->zl[l];
        model->loss = (float)loss;
    }
    phase_mark(PH_CLASSIFIER_FWD);
}

void model_zero_grad(Model* model) { memset(model->grads_memory, 0, model->num_params * sizeof(float)); }

// backward of the last forward; gradients of dloss * loss are ADDED into model->grads
// (dloss = 1/grad_accum_steps averages the micro-batches)
void model_backward(Model* model, float dloss) {
    const MoEConfig* c = &model->config;
    int B = model->B, T = model->T, L = c->L, C = c->C, H = c->H, Hkv = c->Hkv, D = C / H;
    int E = c->E, K = c->K, F = c->F, V = c->V, N = B * T, NK = N * K, HD = H * D, KD = Hkv * D;
    int El = model->El, sharded = El < E, coll = model->collective && dist.world > 1;
    int NKx = NK * (sharded ? dist.ep : 1);
    ParamTensors p = model->params, g = model->grads;
    ActTensors a = model->acts;
    // classifier and final norm
    phase_mark(PH_NONE);
    if (model->dlogits_dloss > 0.0f && (dloss != model->dlogits_dloss || model->token_weights)) {
        fprintf(stderr, "Error: model_backward(%g) after a forward fused for model_backward(%g)\n", dloss,
                model->dlogits_dloss);
        exit(EXIT_FAILURE);
    }
    if (model->dlogits_dloss == 0.0f) // the forward's probs become dlogits, in place
        crossentropy_backward(model->dlogits, model->targets, model->token_weights, dloss, N, V);
    model->dlogits_dloss = 0.0f;
    memset(model->dbuf, 0, (size_t)N * C * sizeof(float));
    matmul_backward(model->dbuf, g.lm_head, model->dlogits, a.xf, p.lm_head, N, C, V);
    memset(model->dres, 0, (size_t)N * C * sizeof(float));
    rmsnorm_backward(model->dres, g.final_norm, model->dbuf, a.resid + (size_t)L * N * C, p.final_norm,
                     model->f_rstd, N, C);
    phase_mark(PH_CLASSIFIER_BWD);
    float* dres = model->dres; // gradient of the residual stream, flowing down
    for (int l = L - 1; l >= 0; l--) {
        const float* wq = p.wq + (size_t)l * HD * C;
        const float* wk = p.wk + (size_t)l * KD * C;
        const float* wv = p.wv + (size_t)l * KD * C;
        const float* wo = p.wo + (size_t)l * C * HD;
        const float* wr = p.wr + (size_t)l * E * C;
        size_t eo1 = (size_t)l * El * F * C, eo2 = (size_t)l * El * C * F;
        const float* res = a.resid + (size_t)l * N * C;
        const float* res_mid = a.resid_mid + (size_t)l * N * C;
        const float* m = a.m + (size_t)l * N * C;
        const float* z = a.z + (size_t)l * N * E;
        const float* lse = a.lse + (size_t)l * N;
        const float* gate = a.gate + (size_t)l * NK;
        const int* topi = model->topi + (size_t)l * NK;
        const int* counts = model->counts + (size_t)l * E;
        const int* offs = model->offs + (size_t)l * (E + 1);
        const int* row_of = model->row_of + (size_t)l * NK;
        const float* xe = a.xe + (size_t)l * NK * C;
        // MoE block, in reverse: unpermute -> experts -> permute -> topk/router
        unpermute_backward(model->dye, model->dgate, dres, a.ye + (size_t)l * NK * C, gate, row_of, N, K, C);
        phase_mark(PH_UNPERM_BWD);
        const float* h1 = a.h1 + (size_t)l * NKx * F;
        const float* h3 = a.h3 + (size_t)l * NKx * F;
        const float* act = a.act + (size_t)l * NKx * F;
        if (sharded) { // the forward's exchanges mirrored: dye to the experts' owners, dxe back
            const int* rc = model->rcounts + (size_t)l * dist.ep * El;
            ep_exchange(model->dye_r, model->dye, model->ep_tmp, counts, rc, El, C, +1);
            experts_backward(model->dxe_r, g.w1 + eo1, g.w3 + eo1, g.w2 + eo2, model->dact, model->dh1, model->dh3,
                             model->dye_r, model->xr + (size_t)l * NKx * C, h1, h3, act, p.w1 + eo1, p.w3 + eo1,
                             p.w2 + eo2, model->offs_r + (size_t)l * (El + 1), El, C, F);
            ep_exchange(model->dxe, model->dxe_r, model->ep_tmp, counts, rc, El, C, -1);
        } else
            experts_backward(model->dxe, g.w1 + eo1, g.w3 + eo1, g.w2 + eo2, model->dact, model->dh1, model->dh3,
                             model->dye, xe, h1, h3, act, p.w1 + eo1, p.w3 + eo1, p.w2 + eo2, offs, E, C, F);
        phase_mark(PH_EXPERTS_BWD);
        float* dm = model->dbuf;
        memset(dm, 0, (size_t)N * C * sizeof(float));
        permute_backward(dm, model->dxe, row_of, N, K, C);
        router_backward(model->dz, model->dgate, z, lse, topi, gate, coll ? model->gcounts + (size_t)l * E : counts,
                        coll ? N * dist.world : N, dloss * c->aux_coef,
                        dloss * c->z_coef, N, E, K);
        matmul_backward(dm, g.wr + (size_t)l * E * C, model->dz, m, wr, N, C, E);
        // dres already holds the gradient through the MoE residual connection
        rmsnorm_backward(dres, g.moe_norm + (size_t)l * C, dm, res_mid, p.moe_norm + (size_t)l * C,
                         a.m_rstd + (size_t)l * N, N, C);
        phase_mark(PH_ROUTE_BWD);
        // attention block
        memset(model->datty, 0, (size_t)N * HD * sizeof(float));
        matmul_backward(model->datty, g.wo + (size_t)l * C * HD, dres, a.atty + (size_t)l * N * HD, wo, N, HD, C);
        attention_backward(model->dq, model->dk, model->dv, model->datty, a.att + (size_t)l * B * H * T * T,
                           a.q + (size_t)l * N * HD, a.k + (size_t)l * N * KD, a.v + (size_t)l * N * KD,
                           B, T, H, Hkv, D);
        rope_apply(model->dq, model->freqs_cos, model->freqs_sin, B, T, H, D, -1);
        rope_apply(model->dk, model->freqs_cos, model->freqs_sin, B, T, Hkv, D, -1);
        float* da = model->dbuf;
        memset(da, 0, (size_t)N * C * sizeof(float));
        const float* an = a.a + (size_t)l * N * C;
        matmul_backward(da, g.wq + (size_t)l * HD * C, model->dq, an, wq, N, C, HD);
        matmul_backward(da, g.wk + (size_t)l * KD * C, model->dk, an, wk, N, C, KD);
        matmul_backward(da, g.wv + (size_t)l * KD * C, model->dv, an, wv, N, C, KD);
        rmsnorm_backward(dres, g.attn_norm + (size_t)l * C, da, res, p.attn_norm + (size_t)l * C,
                         a.a_rstd + (size_t)l * N, N, C);
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

float global_grad_norm(const Model* model) { return (float)sqrt(sumsq_deterministic(model->grads_memory, model->num_params)); }

float lr_schedule(int step, int steps, int warmup, float lr, float min_lr) {
    if (step < warmup) return lr * (step + 1) / warmup;
    if (steps <= warmup) return lr;
    float r = (float)(step - warmup) / (float)(steps - warmup);
    if (r > 1.0f) r = 1.0f;
    return min_lr + 0.5f * (1.0f + cosf((float)M_PI * r)) * (lr - min_lr);
}

// one AdamW step t (1-based) with gradients first scaled by grad_scale (the clipping factor)
void model_update(Model* model, float lr, float beta1, float beta2, float eps, float weight_decay, int t, float grad_scale) {
    float ibc1 = 1.0f / (1.0f - powf(beta1, (float)t)), ibc2 = 1.0f / (1.0f - powf(beta2, (float)t)); // bias corrections
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
    header[11] = f2i(c->theta); header[12] = f2i(c->eps); header[13] = f2i(c->aux_coef); header[14] = f2i(c->z_coef);
    header[15] = with_optimizer ? 1 : 0;
    if (st) {
        header[16] = st->step;
        header[17] = st->pos.epoch; header[18] = st->pos.shard; header[19] = st->pos.sample;
        header[20] = (int)(uint32_t)st->rng; header[21] = (int)(uint32_t)(st->rng >> 32);
        header[22] = (int)(uint32_t)st->seed; header[23] = (int)(uint32_t)(st->seed >> 32);
    }
    header[24] = (int)(uint32_t)model->num_params; header[25] = (int)(uint32_t)((uint64_t)model->num_params >> 32);
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
        fprintf(stderr, "Error: writing checkpoint '%s' failed (%s); the previous file is untouched\n", path, strerror(err));
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
        read_error("'%s' has checkpoint version %d, this program reads version %d", path, header[1], CKPT_VERSION);
        goto fail;
    }
    c->V = header[2]; c->T = header[3]; c->L = header[4]; c->C = header[5]; c->H = header[6];
    c->Hkv = header[7]; c->E = header[8]; c->K = header[9]; c->F = header[10];
    c->theta = i2f(header[11]); c->eps = i2f(header[12]); c->aux_coef = i2f(header[13]); c->z_coef = i2f(header[14]);
    if (model_config_error(c, msg, sizeof msg)) { read_error("checkpoint '%s': %s", path, msg); goto fail; }
    *has_opt = header[15];
    st->step = header[16];
    st->pos.epoch = header[17]; st->pos.shard = header[18]; st->pos.sample = header[19];
    st->rng = (uint64_t)(uint32_t)header[20] | ((uint64_t)(uint32_t)header[21] << 32);
    st->seed = (uint64_t)(uint32_t)header[22] | ((uint64_t)(uint32_t)header[23] << 32);
    nparams = (uint64_t)(uint32_t)header[24] | ((uint64_t)(uint32_t)header[25] << 32);
    fill_param_sizes(sizes, c);
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) n += sizes[i];
    if (nparams != n || (*has_opt != 0 && *has_opt != 1) || st->step < 0 || st->pos.epoch < 0 || st->pos.shard < 0 ||
        st->pos.sample < 0) {
        read_error("'%s' header is inconsistent: it records %llu parameters (its shape needs %zu), optimizer flag %d, "
                   "step %d, data position (%d, %d, %d)", path, (unsigned long long)nparams, n, *has_opt, st->step,
                   st->pos.epoch, st->pos.shard, st->pos.sample);
        goto fail;
    }
    expect = 1024 + (long)n * 4 * (*has_opt ? 3 : 1);
    actual = file_size(fp);
    if (actual != expect) {
        read_error("'%s' is %ld bytes but its header needs %ld (truncated or corrupt)", path, actual, expect);
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
        return read_error("'%s' holds %s %g in tensor %s (element %zu): corrupt", path, what[b], blocks[b][i],
                          param_names[t], (size_t)i - off);
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
        return read_error("'%s' holds no optimizer state, so training cannot resume from it (use -e to start from its weights)", path);
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
        read_error("'%s' is %ld bytes but its header promises %ld tokens (%ld bytes): truncated or corrupt",
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
        if (t >= V) bad = read_error("'%s' token %ld is id %ld, outside the vocabulary (V=%d)", path, i, t, V);
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
    if (dl->shuffle) random_permutation(dl->sample_order, dl->nsamples, hash3(dl->seed, dl->pos.epoch, idx + 1));
    else for (int i = 0; i < dl->nsamples; i++) dl->sample_order[i] = i;
    dl->cur_shard = idx;
}

static void loader_set_epoch(DataLoader* dl) {
    if (dl->shuffle) random_permutation(dl->shard_order, dl->nshards, hash3(dl->seed, dl->pos.epoch, 0));
    else for (int i = 0; i < dl->nshards; i++) dl->shard_order[i] = i;
    dl->cur_shard = -1;
}

void loader_init(DataLoader* dl, const char* pattern, const char* flag, int B, int T, int V, int shuffle, uint64_t seed) {
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
    for (int i = 0; i < dl->nshards; i++) { // every header and size up front; token ids when a shard is read
        long n;
        int width;
        FILE* fp = shard_open(dl->glob.gl_pathv[i], &n, &width);
        if (!fp) exit(EXIT_FAILURE);
        fclose(fp);
        if (n > 1) total += (n - 1) / T;
    }
    if (total < B) {
        fprintf(stderr, "Error: %s '%s' holds %ld samples of T+1=%d tokens, fewer than one batch (B=%d)\n",
                flag, pattern, total, T + 1, B);
        exit(EXIT_FAILURE);
    }
    dl->cur_shard = -1;
    loader_set_epoch(dl);
}

void loader_seek(DataLoader* dl, DataPos pos) {
    if (pos.epoch < 0 || pos.shard < 0 || pos.shard >= dl->nshards || pos.sample < 0) {
        fprintf(stderr, "Error: data position (epoch %d, shard %d, sample %d) does not fit these %d shards\n",
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
        if (++dl->pos.shard == dl->nshards) { dl->pos.shard = 0; dl->pos.epoch++; loader_set_epoch(dl); }
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
    free(dl->shard_order); free(dl->tokens); free(dl->sample_order); free(dl->inputs); free(dl->targets);
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
    if (!fp) { fprintf(stderr, "note: no tokenizer at '%s': samples print token ids\n", path); return 0; }
    uint32_t header[256];
    long size = file_size(fp);
    int bad = fread_report(header, sizeof(uint32_t), 256, fp, path);
    if (!bad && (header[0] != 20240328 || header[1] != 2))
        bad = read_error("'%s' is not a tokenizer file (magic %u version %u)", path, header[0], header[1]);
    if (!bad && (header[2] == 0 || header[2] > (uint32_t)(size - 1024) || header[3] >= header[2]))
        bad = read_error("'%s' header is inconsistent: V=%u, eot=%u for a file of %ld bytes", path, header[2], header[3], size);
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
    if (!bad && ftell(fp) != size) bad = read_error("'%s' has %ld bytes after its %d tokens: corrupt", path, size - ftell(fp), tk->V);
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
// task eval (the paper's task loss and task accuracy) on eval files (layout: data/tasks/README.md):
// header 256 x int32 (magic 20251125, version 1, items, max prompt, max answer, max ref bytes, V, eot,
// kind, total prompt tokens, total answer tokens, total ref bytes, seed; bytes 64..127 the name),
// then per item: int32 prompt length, int32 answer length, the tokens, int32 ref length, ref bytes.

#define EVAL_MAGIC 20251125
enum { TASK_MEMORIZATION = 1, TASK_REASONING = 2 };

typedef struct {
    char name[64];
    int n, kind, max_prompt, max_answer;
    int *plen, *alen;   // per item
    int** toks;         // per item: prompt then answer tokens
    char** ref;         // per item: the reference answer(s), alternatives separated by '\n'
    int loss_only;      // listed as FILE:loss in -ev: task loss only, no generation (accuracy, test-time compute)
} EvalSet;

static int eval_bad(const char* path, const char* what, long item) {
    if (item >= 0) return read_error("eval file '%s' item %ld: %s", path, item, what);
    return read_error("eval file '%s': %s", path, what);
}

void evalset_free(EvalSet* es) {
    for (int i = 0; i < es->n && es->toks; i++) { free(es->toks[i]); free(es->ref[i]); }
    free(es->plen); free(es->alen); free(es->toks); free(es->ref);
    memset(es, 0, sizeof(*es));
}

// read and check an eval file against the model's V and the sequence length T. Every length is
// checked against the header's totals before anything is allocated for it, and the totals against
// the file's size. Returns 0, or -1 after an error message with nothing left allocated.
int evalset_load(EvalSet* es, const char* path, int V, int T) {
    memset(es, 0, sizeof(*es));
    FILE* fp = fopen_report(path);
    if (!fp) return -1;
    int h[256];
    char m[160];
    int bad = fread_report(h, sizeof(int), 256, fp, path);
    if (!bad && (h[0] != EVAL_MAGIC || h[1] != 1)) bad = eval_bad(path, "not an eval file (bad magic or version)", -1);
    if (!bad) {
        long expect = 1024 + 12L * h[2] + 4L * ((long)h[9] + h[10]) + h[11];
        if (h[2] <= 0 || h[9] < 0 || h[10] < 0 || h[11] < 0 || file_size(fp) != expect)
            bad = eval_bad(path, "its size does not match its header (truncated or corrupt)", -1);
    }
    if (!bad && h[6] > V) {
        snprintf(m, sizeof m, "built for V=%d, the model has V=%d", h[6], V);
        bad = eval_bad(path, m, -1);
    }
    if (!bad && h[8] != TASK_MEMORIZATION && h[8] != TASK_REASONING) {
        snprintf(m, sizeof m, "task kind %d is neither %d (memorization) nor %d (reasoning)", h[8], TASK_MEMORIZATION,
                 TASK_REASONING);
        bad = eval_bad(path, m, -1);
    }
    if (bad) { fclose(fp); return -1; }
    memcpy(es->name, (char*)h + 64, 63);
    es->n = h[2]; es->max_prompt = h[3]; es->max_answer = h[4]; es->kind = h[8];
    es->plen = (int*)callocCheck(es->n, sizeof(int));
    es->alen = (int*)callocCheck(es->n, sizeof(int));
    es->toks = (int**)callocCheck(es->n, sizeof(int*));
    es->ref = (char**)callocCheck(es->n, sizeof(char*));
    long ptot = 0, atot = 0, rtot = 0;
    for (int i = 0; i < es->n && !bad; i++) {
        int len[2], rl;
        if ((bad = fread_report(len, sizeof(int), 2, fp, path))) break;
        if (len[0] < 1 || len[1] < 1 || len[0] > h[3] || len[1] > h[4] || ptot + len[0] > h[9] || atot + len[1] > h[10]) {
            bad = eval_bad(path, "lengths disagree with the header", i);
            break;
        }
        if (len[0] > T) {
            snprintf(m, sizeof m, "prompt of %d tokens is longer than the sequence length T=%d (flag -t)", len[0], T);
            bad = eval_bad(path, m, i);
            break;
        }
        es->plen[i] = len[0]; es->alen[i] = len[1];
        es->toks[i] = (int*)mallocCheck((size_t)(len[0] + len[1]) * sizeof(int));
        if ((bad = fread_report(es->toks[i], sizeof(int), len[0] + len[1], fp, path))) break;
        for (int j = 0; j < len[0] + len[1] && !bad; j++)
            if (es->toks[i][j] < 0 || es->toks[i][j] >= V) bad = eval_bad(path, "token id outside the vocabulary", i);
        if (bad || (bad = fread_report(&rl, sizeof(int), 1, fp, path))) break;
        if (rl < 1 || rl > h[5] || rtot + rl > h[11]) { bad = eval_bad(path, "reference length disagrees with the header", i); break; }
        es->ref[i] = (char*)mallocCheck(rl + 1);
        if ((bad = fread_report(es->ref[i], 1, rl, fp, path))) break;
        es->ref[i][rl] = 0;
        ptot += len[0]; atot += len[1]; rtot += rl;
    }
    if (!bad && (ptot != h[9] || atot != h[10])) bad = eval_bad(path, "token totals disagree with the header", -1);
    fclose(fp);
    if (bad) { evalset_free(es); return -1; }
    return 0;
}

// the eval files of a comma-separated list (NULL: none); *nsets gets their number
EvalSet* evalsets_load(const char* list, int V, int T, int* nsets) {
    EvalSet* sets = NULL;
    *nsets = 0;
    if (!list) return NULL;
    char* copy = (char*)mallocCheck(strlen(list) + 1);
    strcpy(copy, list);
    for (char* f = strtok(copy, ","); f; f = strtok(NULL, ",")) {
        sets = (EvalSet*)realloc(sets, (*nsets + 1) * sizeof(EvalSet));
        if (!sets) { fprintf(stderr, "Error: out of memory reading eval files\n"); exit(EXIT_FAILURE); }
        size_t len = strlen(f);
        int loss_only = len > 5 && !strcmp(f + len - 5, ":loss");
        if (loss_only) f[len - 5] = '\0';
        EvalSet* es = &sets[*nsets];
        if (evalset_load(es, f, V, loss_only ? INT_MAX : T) != 0) exit(EXIT_FAILURE);
        es->loss_only = loss_only;
        if (loss_only) { // its task loss is over the items whose prompt fits in T (the answer is cut at T)
            int kept = 0;
            for (int i = 0; i < es->n; i++) {
                if (es->plen[i] > T) { free(es->toks[i]); free(es->ref[i]); continue; }
                es->plen[kept] = es->plen[i]; es->alen[kept] = es->alen[i];
                es->toks[kept] = es->toks[i]; es->ref[kept] = es->ref[i];
                kept++;
            }
            if (kept < es->n) printf("eval %s: %d of %d items have prompts longer than T=%d and are left out\n", es->name,
                                     es->n - kept, es->n, T);
            es->n = kept;
            if (kept == 0) { fprintf(stderr, "Error: eval file '%s': no prompt fits in T=%d (flag -t)\n", f, T); exit(EXIT_FAILURE); }
        }
        (*nsets)++;
    }
    free(copy);
    return sets;
}

// task loss: the NLL of the answer tokens given the prompt, in bits per answer token and per answer
// byte (the tokenizer's bytes). Items go B at a time, each in its own row of T tokens; an answer that
// runs past T is scored on the tokens that fit (counted in *truncated).
// The two steps both trainers share: rows x[B,T], y[B,T] for items i0..i0+B (targets -1 outside the
// answers; returns how many answers were cut at T), then the sum of one batch's per-token losses.
int task_loss_batch(const EvalSet* es, int i0, int B, int T, int eot, int* x, int* y) {
    int truncated = 0;
    for (int b = 0; b < B; b++) {
        int i = i0 + b, len = 0, plen = 0;
        if (i < es->n) {
            len = es->plen[i] + es->alen[i];
            plen = es->plen[i];
            if (len > T + 1) { len = T + 1; truncated++; }
        }
        for (int t = 0; t < T; t++) {
            x[b * T + t] = t < len ? es->toks[i][t] : eot;
            y[b * T + t] = (t + 1 < len && t + 1 >= plen) ? es->toks[i][t + 1] : -1;
        }
    }
    return truncated;
}
void task_loss_add(const int* y, const float* losses, int N, const Tokenizer* tk, double* nll, long* ntok, long* nbytes) {
    for (int n = 0; n < N; n++)
        if (y[n] >= 0) {
            *nll += losses[n];
            (*ntok)++;
            *nbytes += tokenizer_piece(tk, y[n]) ? (long)strlen(tokenizer_piece(tk, y[n])) : 0;
        }
}

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

// the next token from one row of logits: the argmax (lowest id on ties) if temperature <= 0, else a
// sample from softmax(logits / temperature) drawn with *rng; probs is V floats of scratch
int pick_token(const float* logits, int V, float temperature, uint64_t* rng, float* probs) {
    int next = 0;
    for (int i = 1; i < V; i++) if (logits[i] > logits[next]) next = i;
    if (temperature > 0) {
        for (int i = 0; i < V; i++) probs[i] = vexpf((logits[i] - logits[next]) / temperature);
        float inv = 1.0f / vsum(probs, V);
        for (int i = 0; i < V; i++) probs[i] *= inv;
        next = sample_mult(probs, V, rng_f32(rng));
    }
    return next;
}

// decoding with a KV cache: greedy (temperature <= 0) or sampled at a temperature with *rng.
// Prefill: one forward over the prompt, whose per-layer k and v (after RoPE) become the cache. Then
// each new token runs through the layers alone (N = 1), reusing the layer functions, and attends to
// the cache. Stops at stop_token, after a token holding a newline (if stop_newline), or after
// max_new tokens. Returns the number of tokens written to out.
// sample_response is the same with two additions for GRPO's rollouts: keep_stop keeps a sampled
// stop_token as the response's last token (it is part of what the policy did), and logp (if not NULL)
// receives log pi(out[i]) under the model's own distribution, softmax(logits) at temperature 1,
// computed as the training forward's cross-entropy computes it.
int sample_response(Model* model, const int* prompt, int plen, int max_new, int stop_token, int stop_newline,
                    const Tokenizer* tk, int* out, float* logp, int keep_stop, float temperature, uint64_t* rng) {
    const MoEConfig* c = &model->config;
    int L = c->L, C = c->C, H = c->H, Hkv = c->Hkv, D = C / H, E = c->E, K = c->K, F = c->F, V = c->V;
    int HD = H * D, KD = Hkv * D, maxT = model->maxT, group = H / Hkv;
    if (plen + max_new > maxT) max_new = maxT - plen;
    if (max_new <= 0) return 0;
    float* kc = (float*)mallocCheck((size_t)L * maxT * KD * sizeof(float)); // the cache, [L][t][KD]
    float* vc = (float*)mallocCheck((size_t)L * maxT * KD * sizeof(float));
    model_forward(model, prompt, NULL, 1, plen);
    for (int l = 0; l < L; l++) {
        memcpy(kc + (size_t)l * maxT * KD, model->acts.k + (size_t)l * plen * KD, (size_t)plen * KD * sizeof(float));
        memcpy(vc + (size_t)l * maxT * KD, model->acts.v + (size_t)l * plen * KD, (size_t)plen * KD * sizeof(float));
    }
    // one-token scratch: layer 0's activation buffers (the prefill's are no longer needed)
    ActTensors a = model->acts;
    ParamTensors p = model->params;
    float* h = a.resid;                     // 1 x C, the residual stream of the new token
    float* att = (float*)mallocCheck((size_t)maxT * sizeof(float));
    float* probs = (float*)mallocCheck((size_t)V * sizeof(float));
    int next = 0, n = 0, pos = plen;
    const float* last = model->logits + (size_t)(plen - 1) * V;
    for (;;) {
        next = pick_token(last, V, temperature, rng, probs);
        if (logp) { // as crossentropy_forward: max + log(sum exp(l - max)) - l[next]
            float mx = vmax(last, V);
            for (int i = 0; i < V; i++) probs[i] = vexpf(last[i] - mx);
            logp[n] = -(mx + logf(vsum(probs, V)) - last[next]);
        }
        if (next == stop_token) { if (keep_stop) n++, out[n - 1] = next; break; }
        out[n++] = next;
        if (stop_newline && tokenizer_piece(tk, next) && strchr(tokenizer_piece(tk, next), '\n')) break;
        if (n == max_new) break;
        // the new token through every layer at position pos
        encoder_forward(h, &next, p.wte, 1, C);
        for (int l = 0; l < L; l++) {
            float* kl = kc + (size_t)l * maxT * KD;
            float* vl = vc + (size_t)l * maxT * KD;
            rmsnorm_forward(a.a, a.a_rstd, h, p.attn_norm + (size_t)l * C, 1, C, c->eps);
            matmul_forward(a.q, a.a, p.wq + (size_t)l * HD * C, 1, C, HD);
            matmul_forward(kl + (size_t)pos * KD, a.a, p.wk + (size_t)l * KD * C, 1, C, KD);
            matmul_forward(vl + (size_t)pos * KD, a.a, p.wv + (size_t)l * KD * C, 1, C, KD);
            const float* fc = model->freqs_cos + (size_t)pos * (D / 2);
            const float* fs = model->freqs_sin + (size_t)pos * (D / 2);
            rope_apply(a.q, fc, fs, 1, 1, H, D, +1);
            rope_apply(kl + (size_t)pos * KD, fc, fs, 1, 1, Hkv, D, +1);
            for (int hh = 0; hh < H; hh++) { // attend to positions 0..pos of kv head hh/group
                const float* q = a.q + (size_t)hh * D;
                int hk = hh / group;
                for (int t2 = 0; t2 <= pos; t2++) att[t2] = vdot(q, kl + (size_t)t2 * KD + hk * D, D) / sqrtf((float)D);
                float mx = vmax(att, pos + 1);
                for (int t2 = 0; t2 <= pos; t2++) att[t2] = vexpf(att[t2] - mx);
                float inv = 1.0f / vsum(att, pos + 1);
                float* o = a.atty + (size_t)hh * D;
                for (int i = 0; i < D; i++) o[i] = 0.0f;
                for (int t2 = 0; t2 <= pos; t2++)
                    for (int i = 0; i < D; i++) o[i] += att[t2] * inv * vl[(size_t)t2 * KD + hk * D + i];
            }
            matmul_forward(a.resid_mid, a.atty, p.wo + (size_t)l * C * HD, 1, HD, C);
            for (int i = 0; i < C; i++) a.resid_mid[i] += h[i];
            rmsnorm_forward(a.m, a.m_rstd, a.resid_mid, p.moe_norm + (size_t)l * C, 1, C, c->eps);
            router_forward(a.z, a.lse, a.m, p.wr + (size_t)l * E * C, 1, C, E);
            router_check(model, l, topk_forward(model->topi, a.gate, a.z, 1, E, K), 1);
            permute_plan(model->counts, model->offs, model->row_of, model->tok_of, model->topi, 1, E, K);
            permute_forward(a.xe, a.m, model->tok_of, K, C);
            experts_forward(a.ye, a.h1, a.h3, a.act, a.xe, p.w1 + (size_t)l * E * F * C, p.w3 + (size_t)l * E * F * C,
                            p.w2 + (size_t)l * E * C * F, model->offs, E, C, F);
            unpermute_forward(h, a.resid_mid, a.ye, a.gate, model->row_of, 1, K, C);
        }
        rmsnorm_forward(a.xf, model->f_rstd, h, p.final_norm, 1, C, c->eps);
        matmul_forward(model->logits, a.xf, p.lm_head, 1, C, V);
        last = model->logits;
        pos++;
    }
    free(kc); free(vc); free(att); free(probs);
    return n;
}
int generate_answer(Model* model, const int* prompt, int plen, int max_new, int stop_token, int stop_newline,
                    const Tokenizer* tk, int* out, float temperature, uint64_t* rng) {
    return sample_response(model, prompt, plen, max_new, stop_token, stop_newline, tk, out, NULL, 0, temperature, rng);
}

// does the generated text answer the item? memorization: it equals one of the reference
// alternatives (case and surrounding space ignored); reasoning: the number after the last
// "The answer is" equals the reference number (commas ignored)
static void trim_lower(char* s) {
    char* b = s;
    while (*b == ' ' || *b == '\n' || *b == '\t') b++;
    memmove(s, b, strlen(b) + 1);
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\n' || s[n - 1] == '\t' || s[n - 1] == '.')) s[--n] = 0;
    for (char* q = s; *q; q++) if (*q >= 'A' && *q <= 'Z') *q += 32;
}
static void strip_commas(char* s) { char* w = s; for (char* r = s; *r; r++) if (*r != ',') *w++ = *r; *w = 0; }

// the answer in a generated text, normalised: reasoning, the number after the last "The answer is"
// (commas dropped; "" if none); memorization, the text itself (case and surrounding space ignored)
void extract_answer(const char* generated, int kind, char* out) {
    out[0] = 0;
    if (kind == TASK_REASONING) {
        const char* at = NULL;
        for (const char* q = strstr(generated, "The answer is "); q; q = strstr(q + 1, "The answer is ")) at = q;
        if (!at) return;
        strcpy(out, at + 14);
        size_t k = 0;
        while (out[k] == '-' || out[k] == ',' || (out[k] >= '0' && out[k] <= '9')) k++;
        out[k] = 0;
        strip_commas(out);
    } else {
        strcpy(out, generated);
        trim_lower(out);
    }
}

// does a normalised answer match the reference (alternatives separated by '\n')?
int answer_correct(const char* ans, const char* ref, int kind) {
    if (!ans[0]) return 0;
    char* alts = (char*)mallocCheck(strlen(ref) + 1);
    strcpy(alts, ref);
    int ok = 0;
    char* save = NULL; // strtok_r: GRPO's rollouts check answers on several threads at once
    for (char* tok = strtok_r(alts, "\n", &save); tok && !ok; tok = strtok_r(NULL, "\n", &save)) {
        if (kind == TASK_REASONING) strip_commas(tok);
        trim_lower(tok);
        ok = strcmp(ans, tok) == 0;
    }
    free(alts);
    return ok;
}

int answer_matches(const char* generated, const char* ref, int kind) {
    char* ans = (char*)mallocCheck(strlen(generated) + 1);
    extract_answer(generated, kind, ans);
    int ok = answer_correct(ans, ref, kind);
    free(ans);
    return ok;
}

// the text of tokens out[0..k), into a growing buffer
static char* tokens_text(const Tokenizer* tk, const int* out, int k, char** buf, size_t* cap) {
    size_t len = 0;
    (*buf)[0] = 0;
    for (int j = 0; j < k; j++) {
        const char* piece = tokenizer_piece(tk, out[j]);
        if (!piece) continue;
        size_t tl = strlen(piece);
        if (len + tl + 1 > *cap) { *cap = 2 * (len + tl + 1); *buf = (char*)realloc(*buf, *cap); }
        memcpy(*buf + len, piece, tl + 1);
        len += tl;
    }
    return *buf;
}

// greedy accuracy over the first max_items items (all if max_items <= 0)
double eval_task_accuracy(Model* model, const EvalSet* es, const Tokenizer* tk, int eot, int max_items, int* scored) {
    int n = (max_items > 0 && max_items < es->n) ? max_items : es->n, correct = 0;
    int* out = (int*)mallocCheck((size_t)(es->max_answer + 8) * sizeof(int));
    size_t cap = 1024;
    char* text = (char*)mallocCheck(cap);
    for (int i = 0; i < n; i++) {
        int k = generate_answer(model, es->toks[i], es->plen[i], es->max_answer + 8, eot, es->kind == TASK_MEMORIZATION,
                                tk, out, 0.0f, NULL);
        correct += answer_matches(tokens_text(tk, out, k, &text, &cap), es->ref[i], es->kind);
    }
    free(out);
    free(text);
    *scored = n;
    return n ? (double)correct / n : NAN;
}

// the sample holding the most common non-empty answer among ans[0..n) (ties: the one seen first); -1 if none
int majority_index(char* const* ans, int n) {
    int best = -1, best_votes = 0;
    for (int s = 0; s < n; s++) {
        if (!ans[s][0]) continue; // no answer: no vote
        int votes = 0;
        for (int u = 0; u < n; u++) votes += strcmp(ans[s], ans[u]) == 0;
        if (votes > best_votes) { best_votes = votes; best = s; }
    }
    return best;
}

// test-time compute: nsamples answers per item at a temperature; for n = 1, 2, 4, ... nsamples,
// maj[j] = accuracy of the majority answer of the first n samples (ties: the answer seen first),
// pass[j] = share of items where one of the first n samples is right. Returns how many n were scored.
// ttc_begin sets up ns, maj and pass; ttc_tally adds one item's samples (both trainers use them).
int ttc_begin(int nsamples, int* ns, double* maj, double* pass) {
    int nn = 0;
    for (int n = 1; n <= nsamples; n *= 2) { ns[nn] = n; maj[nn] = pass[nn] = 0.0; nn++; }
    return nn;
}
void ttc_tally(char* const* ans, const int* right, const int* ns, int nn, double* maj, double* pass) {
    for (int j = 0; j < nn; j++) {
        int n = ns[j], best = majority_index(ans, n), any = 0;
        for (int s = 0; s < n; s++) any |= right[s];
        maj[j] += best >= 0 && right[best];
        pass[j] += any;
    }
}

// the normalised answer (malloc'd) in the tokens out[0..k) generated for item i, and whether it is right
char* sample_answer(const Tokenizer* tk, const int* out, int k, const EvalSet* es, int i, char** text, size_t* cap,
                    int* right) {
    tokens_text(tk, out, k, text, cap);
    char* ans = (char*)mallocCheck(strlen(*text) + 1);
    extract_answer(*text, es->kind, ans);
    *right = answer_correct(ans, es->ref[i], es->kind);
    return ans;
}

int eval_test_time_compute(Model* model, const EvalSet* es, const Tokenizer* tk, int eot, int max_items, int nsamples,
                           float temperature, uint64_t* rng, int* ns, double* maj, double* pass, int* scored) {
    int items = (max_items > 0 && max_items < es->n) ? max_items : es->n;
    int nn = ttc_begin(nsamples, ns, maj, pass);
    int* out = (int*)mallocCheck((size_t)(es->max_answer + 8) * sizeof(int));
    size_t cap = 1024;
    char* text = (char*)mallocCheck(cap);
    char** ans = (char**)callocCheck(nsamples, sizeof(char*));
    int* right = (int*)callocCheck(nsamples, sizeof(int));
    for (int i = 0; i < items; i++) {
        for (int s = 0; s < nsamples; s++) {
            int k = generate_answer(model, es->toks[i], es->plen[i], es->max_answer + 8, eot,
                                    es->kind == TASK_MEMORIZATION, tk, out, temperature, rng);
            ans[s] = sample_answer(tk, out, k, es, i, &text, &cap, &right[s]);
        }
        ttc_tally(ans, right, ns, nn, maj, pass);
        for (int s = 0; s < nsamples; s++) free(ans[s]);
    }
    for (int j = 0; j < nn; j++) { maj[j] /= items; pass[j] /= items; }
    free(out); free(text); free(ans); free(right);
    *scored = items;
    return nn;
}

// one eval file's results on the console and in the log (both trainers)
void report_task_eval(FILE* logf, int step, const EvalSet* es, double bpt, double bpb, int truncated, double acc,
                      int scored) {
    if (es->loss_only) {
        printf("task %-10s | loss %.4f bits/token %.4f bits/byte (%d items, %d answers cut at T) | accuracy not scored (:loss)\n",
               es->name, bpt, bpb, es->n, truncated);
        if (logf) fprintf(logf, "step %d task %s bpt %.6f bpb %.6f\n", step, es->name, bpt, bpb);
        return;
    }
    printf("task %-10s | loss %.4f bits/token %.4f bits/byte (%d items, %d answers cut at T) | accuracy %.4f (%d items, greedy)\n",
           es->name, bpt, bpb, es->n, truncated, acc, scored);
    if (logf) fprintf(logf, "step %d task %s bpt %.6f bpb %.6f acc %.6f n %d\n", step, es->name, bpt, bpb, acc, scored);
}
void report_ttc(FILE* logf, int step, const EvalSet* es, int nn, const int* ns, const double* maj, const double* pass,
                int scored, float temperature) {
    printf("task %-10s | test-time compute, %d items, temperature %.2f:", es->name, scored, temperature);
    for (int j = 0; j < nn; j++) printf(" maj@%d %.3f", ns[j], maj[j]);
    printf(" |");
    for (int j = 0; j < nn; j++) printf(" pass@%d %.3f", ns[j], pass[j]);
    printf("\n");
    if (logf)
        for (int j = 0; j < nn; j++)
            fprintf(logf, "step %d ttc %s n %d maj %.6f pass %.6f items %d temp %.3f\n", step, es->name, ns[j], maj[j],
                    pass[j], scored, temperature);
}

// ----------------------------------------------------------------------------
// GRPO post-training (-rl FILE; README "GRPO post-training"). One RL step:
//   rollouts   P prompts of an eval-format file, G responses each, sampled with the KV-cached decoder
//              (sample_response) at a temperature, up to R tokens, the stop token kept
//   reward     1 if the response's answer passes the task eval's check (answer_matches), else 0
//   advantage  per group of G: A = (r - mean) / (std + 1e-6), std with Bessel's correction (as
//              torch.std); a group whose rewards are all equal gets A = 0
//   update     the P*G rows in M mini-batches, one AdamW step each (one pass). Per response token i
//              of a row with advantage A, with logp = log pi(token), ratio = exp(logp - logp_old):
//                pg_i = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))       (PPO-clip)
//                kl_i = min(exp(d) - d - 1, 10),  d = logp_ref - logp               (k3, clamped)
//                loss = agg_i(pg_i + beta * kl_i) + aux_coef * sum_l aux_l + z_coef * sum_l z_l
//              logp_old is what the sampler reported (the policy before this rollout batch's first
//              update; it equals the training forward's log-prob of the same token, see test_moe),
//              logp_ref the frozen starting model's. agg is the token mean over the mini-batch's
//              response tokens (verl's "token-mean", the default), or -ra 1: the mean over rows of each
//              row's token mean (DeepSeekMath's GRPO), or -ra 2: the mean over rows of each row's
//              token sum / R (Dr. GRPO's constant normaliser).
// The whole objective is a weighted cross-entropy on the response tokens (logp = -ce): the forward
// is the pre-training forward, and the backward is the pre-training backward with per-token weights
// w_i = d loss / d ce_i in the classifier (Model.token_weights), so no second model path exists.

enum { AGG_TOKEN_MEAN = 0, AGG_SEQ_MEAN = 1, AGG_DR_GRPO = 2 };
#define GRPO_KL_MAX 10.0f

typedef struct { int P, G, R, M, agg; float temp, clip, kl; } GrpoConfig;

// the statistics of one mini-batch update (sums over its response tokens, and counts)
typedef struct { double loss, pg, kl, entropy; long tokens, clipped; } GrpoStats;

// advantages of rows groups of G consecutive rows; returns how many groups have all rewards equal
int grpo_advantages(const float* reward, float* adv, int rows, int G) {
    int flat = 0;
    for (int g0 = 0; g0 < rows; g0 += G) {
        double mean = 0.0, var = 0.0;
        int same = 1;
        for (int j = 0; j < G; j++) { mean += reward[g0 + j]; same &= reward[g0 + j] == reward[g0]; }
        mean /= G;
        for (int j = 0; j < G; j++) var += (reward[g0 + j] - mean) * (reward[g0 + j] - mean);
        double sd = sqrt(var / (G - 1));
        for (int j = 0; j < G; j++) adv[g0 + j] = same ? 0.0f : (float)((reward[g0 + j] - mean) / (sd + 1e-6));
        flat += same;
    }
    return flat;
}

// the policy part of the GRPO loss of a mini-batch of rows x T positions, from the forward's per-token
// cross-entropies ce (= -logp; targets y: the response tokens, -1 elsewhere), and in w[rows*T] the
// per-token weights of its backward (d loss / d ce). adv per row; old_logp and ref_logp per position
// (read where y >= 0; ref_logp unused if kl == 0). Adds to *st (but not the entropy). Both trainers
// call this on the host.
double grpo_token_weights(const float* ce, const int* y, const float* adv, const float* old_logp, const float* ref_logp,
                          int rows, int T, const GrpoConfig* gc, float* w, GrpoStats* st) {
    int ntok = 0, nseq = 0;
    for (int b = 0; b < rows; b++) {
        int any = 0;
        for (int t = 0; t < T; t++) if (y[b * T + t] >= 0) { ntok++; any = 1; }
        nseq += any;
    }
    double loss = 0.0;
    for (int b = 0; b < rows; b++) {
        int len = 0;
        for (int t = 0; t < T; t++) len += y[b * T + t] >= 0;
        // the aggregation's coefficient of every token of this row
        double coef = gc->agg == AGG_TOKEN_MEAN ? 1.0 / ntok : gc->agg == AGG_SEQ_MEAN ? 1.0 / ((double)nseq * len)
                                                                                      : 1.0 / ((double)nseq * gc->R);
        float A = adv[b];
        for (int t = 0; t < T; t++) {
            int n = b * T + t;
            w[n] = 0.0f;
            if (y[n] < 0) continue;
            float logp = -ce[n];
            float ratio = expf(logp - old_logp[n]);
            float rc = fminf(fmaxf(ratio, 1.0f - gc->clip), 1.0f + gc->clip);
            float pg1 = -A * ratio, pg2 = -A * rc;
            int clipped = pg2 > pg1; // the clipped branch is the max: no gradient through the ratio
            float pg = clipped ? pg2 : pg1;
            float dl = clipped ? 0.0f : -A * ratio; // d pg / d logp
            float kl = 0.0f;
            if (gc->kl > 0) {
                float d = ref_logp[n] - logp, e = expf(d);
                kl = e - d - 1.0f;
                if (kl <= GRPO_KL_MAX) dl += gc->kl * (1.0f - e); // d kl / d logp
                else kl = GRPO_KL_MAX;
                st->kl += kl;
            }
            loss += coef * ((double)pg + (double)gc->kl * kl);
            w[n] = (float)(-coef * dl); // d loss / d ce = -d loss / d logp
            st->pg += pg;
            st->clipped += clipped;
            st->tokens++;
        }
    }
    return loss;
}

// after model_forward on the mini-batch: its whole GRPO loss (the router terms included) and the
// weights w of its backward; adds to *st, with the policy's entropy at the response tokens
float grpo_loss_weights(Model* model, const int* y, const float* adv, const float* old_logp, const float* ref_logp,
                        int rows, int T, const GrpoConfig* gc, float* w, GrpoStats* st) {
    const MoEConfig* c = &model->config;
    int V = c->V;
    double loss = grpo_token_weights(model->losses, y, adv, old_logp, ref_logp, rows, T, gc, w, st);
    // the entropy -sum p log p = logsumexp(l) - sum p l, from the forward's probs (in dlogits until
    // the backward) and logits; logsumexp(l) = ce + l[target]
    for (size_t n = 0; n < (size_t)rows * T; n++) {
        if (y[n] < 0) continue;
        const float* lg = model->logits + n * V;
        st->entropy += model->losses[n] + lg[y[n]] - vdot(model->dlogits + n * V, lg, V);
    }
    for (int l = 0; l < c->L; l++) loss += (double)c->aux_coef * model->aux[l] + (double)c->z_coef * model->zl[l];
    st->loss += loss;
    return (float)loss;
}

// one mini-batch's gradient (added to model->grads): forward, weights, weighted backward. Returns the loss.
float grpo_backward(Model* model, const int* x, const int* y, const float* adv, const float* old_logp,
                    const float* ref_logp, int rows, int T, const GrpoConfig* gc, float* w, GrpoStats* st) {
    model_forward(model, x, y, rows, T);
    float loss = grpo_loss_weights(model, y, adv, old_logp, ref_logp, rows, T, gc, w, st);
    model->token_weights = w;
    model_backward(model, 1.0f);
    model->token_weights = NULL;
    return loss;
}


// one rollout batch: rows = P*G rows of T positions (prompt, response, eot padding), rows p*G ..
// p*G+G-1 answering prompt p. y holds the response tokens as targets (-1 elsewhere); old_logp[r*T + t]
// is the sampler's log pi of y[r*T + t], ref_logp the reference model's
typedef struct {
    int rows, T;
    int *x, *y, *plen, *rlen;
    float *reward, *adv, *old_logp, *ref_logp;
} Rollouts;

void rollouts_alloc(Rollouts* ro, int rows, int T) {
    ro->rows = rows; ro->T = T;
    ro->x = (int*)mallocCheck((size_t)rows * T * sizeof(int));
    ro->y = (int*)mallocCheck((size_t)rows * T * sizeof(int));
    ro->plen = (int*)mallocCheck(2 * (size_t)rows * sizeof(int));
    ro->rlen = ro->plen + rows;
    ro->reward = (float*)mallocCheck(2 * (size_t)rows * sizeof(float));
    ro->adv = ro->reward + rows;
    ro->old_logp = (float*)callocCheck(2 * (size_t)rows * T, sizeof(float));
    ro->ref_logp = ro->old_logp + (size_t)rows * T;
}
void rollouts_free(Rollouts* ro) { free(ro->x); free(ro->y); free(ro->plen); free(ro->reward); free(ro->old_logp); }

// row r holds prompt + response (toks, len tokens, the first plen the prompt): inputs toks[0..len-2],
// targets the response tokens; logp[j] is the sampler's log-prob of response token j
void rollouts_set_row(Rollouts* ro, int r, const int* prompt, int plen, const int* resp, int rlen, const float* logp,
                      int eot) {
    int T = ro->T, len = plen + rlen;
    int* x = ro->x + (size_t)r * T;
    int* y = ro->y + (size_t)r * T;
    for (int t = 0; t < T; t++) {
        int tok = t < plen ? prompt[t] : t < len ? resp[t - plen] : eot;
        int nxt = t + 1 < plen ? -1 : t + 1 < len ? resp[t + 1 - plen] : -1;
        x[t] = tok;
        y[t] = nxt;
        ro->old_logp[(size_t)r * T + t] = nxt >= 0 ? logp[t + 1 - plen] : 0.0f;
    }
    ro->plen[r] = plen;
    ro->rlen[r] = rlen;
}

// Rollouts decode one response per thread at a time (the responses are independent), each thread on
// its own decoder: a Model sharing the policy's parameters with activations of its own for one row.
// Within a rollout the matmuls then run single-threaded (nested OpenMP regions get one thread).
typedef struct { Model* m; int n; } Decoders;

Decoders decoders_make(const Model* policy, int T) {
    Decoders d = {NULL, 1};
#ifdef OMP
    d.n = omp_get_max_threads();
#endif
    d.m = (Model*)callocCheck(d.n, sizeof(Model));
    for (int i = 0; i < d.n; i++) {
        d.m[i] = *policy; // the parameter pointers; everything the forward writes is its own
        d.m[i].acts_memory = NULL;
        d.m[i].aux = (float*)callocCheck(policy->config.L, sizeof(float));
        d.m[i].zl = (float*)callocCheck(policy->config.L, sizeof(float));
        model_alloc_acts(&d.m[i], 1, T);
    }
    return d;
}
void decoders_free(Decoders* d) {
    for (int i = 0; i < d->n; i++) { model_free_acts(&d->m[i]); free(d->m[i].aux); free(d->m[i].zl); }
    free(d->m);
}

// G responses to each of the P items of es listed in items[], rewards from the answer check. Row r
// samples with its own stream, hash3(seed, r): the same rollouts for any number of threads. Returns
// how many rows earned reward 1.
int grpo_rollouts(Decoders* dec, const EvalSet* es, const int* items, const GrpoConfig* gc, const Tokenizer* tk,
                  int eot, uint64_t seed, Rollouts* ro) {
    int rows = gc->P * gc->G, right = 0;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(dec->n) reduction(+ : right)
    for (int r = 0; r < rows; r++) {
        int tid = 0;
#ifdef OMP
        tid = omp_get_thread_num();
#endif
        int i = items[r / gc->G];
        int* resp = (int*)mallocCheck((size_t)gc->R * sizeof(int));
        float* logp = (float*)mallocCheck((size_t)gc->R * sizeof(float));
        size_t cap = 256;
        char* text = (char*)mallocCheck(cap);
        uint64_t rng = hash3(seed, (uint64_t)r, 0x7011);
        int n = sample_response(&dec->m[tid], es->toks[i], es->plen[i], gc->R, eot, es->kind == TASK_MEMORIZATION, tk,
                                resp, logp, 1, gc->temp, &rng);
        rollouts_set_row(ro, r, es->toks[i], es->plen[i], resp, n, logp, eot);
        int k = n > 0 && resp[n - 1] == eot ? n - 1 : n; // the answer's text, without the stop token
        ro->reward[r] = (float)answer_matches(tokens_text(tk, resp, k, &text, &cap), es->ref[i], es->kind);
        right += ro->reward[r] > 0;
        free(resp); free(logp); free(text);
    }
    return right;
}

// the reference model's log-probs of the response tokens, mini-batch by mini-batch (rows/M rows each)
void grpo_ref_logp(Model* ref, Rollouts* ro, int M) {
    int mb = ro->rows / M, T = ro->T;
    for (int m = 0; m < M; m++) {
        size_t o = (size_t)m * mb * T;
        model_forward(ref, ro->x + o, ro->y + o, mb, T);
        for (size_t n = 0; n < (size_t)mb * T; n++) ro->ref_logp[o + n] = ro->y[o + n] >= 0 ? -ref->losses[n] : 0.0f;
    }
}

// the RL prompt file (flag -rl) must give every item a reference answer and room for R response
// tokens within T; 0, or -1 after an error naming the file and the item
int grpo_check_prompts(const EvalSet* es, const char* path, const GrpoConfig* gc, int T) {
    for (int i = 0; i < es->n; i++) {
        char* ans = (char*)mallocCheck(strlen(es->ref[i]) + 1);
        strcpy(ans, es->ref[i]);
        if (es->kind == TASK_REASONING) strip_commas(ans);
        trim_lower(ans);
        int empty = ans[0] == 0;
        free(ans);
        if (empty) return read_error("RL prompt file '%s' (flag -rl) item %d has no reference answer", path, i);
        if (es->plen[i] + gc->R > T)
            return read_error("RL prompt file '%s' (flag -rl) item %d: prompt (%d tokens) + -rr R=%d exceeds -t T=%d", path,
                              i, es->plen[i], gc->R, T);
    }
    if (es->n < gc->P) return read_error("RL prompt file '%s' (flag -rl) has %d items, fewer than -rp P=%d", path, es->n, gc->P);
    return 0;
}

// does the reference model (flag -e) have the policy's shape?
int grpo_same_shape(const MoEConfig* r, const MoEConfig* c) {
    return r->V == c->V && r->L == c->L && r->C == c->C && r->H == c->H && r->Hkv == c->Hkv && r->E == c->E &&
           r->K == c->K && r->F == c->F && r->theta == c->theta && r->eps == c->eps;
}

// the next P prompts: each epoch visits the n items in its own seeded order; *pos is where we are
// (saved in checkpoints), perm the order of epoch *perm_epoch (-1: none yet)
void grpo_next_prompts(int* perm, int* perm_epoch, int n, DataPos* pos, uint64_t seed, int* items, int P) {
    for (int p = 0; p < P; p++) {
        if (pos->sample >= n) { pos->epoch++; pos->sample = 0; }
        if (*perm_epoch != pos->epoch) {
            random_permutation(perm, n, hash3(seed, (uint64_t)pos->epoch, 0x6E0));
            *perm_epoch = pos->epoch;
        }
        items[p] = perm[pos->sample++];
    }
}

// one RL step's line, on the console and in the log (both trainers)
void grpo_report(FILE* logf, int step, int steps, const GrpoConfig* gc, const Rollouts* ro, int flat, const GrpoStats* gs,
                 float lr, float norm, double rollout_ms, double update_ms) {
    int rows = ro->rows, right = 0, solved = 0;
    long resp = 0;
    for (int r = 0; r < rows; r++) { right += ro->reward[r] > 0; resp += ro->rlen[r]; }
    for (int p = 0; p < gc->P; p++) {
        int any = 0;
        for (int g = 0; g < gc->G; g++) any |= ro->reward[p * gc->G + g] > 0;
        solved += any;
    }
    double ntok = gs->tokens > 0 ? (double)gs->tokens : 1.0;
    double reward = (double)right / rows, sol = (double)solved / gc->P, fl = (double)flat / gc->P;
    double kl = gs->kl / ntok, clipf = gs->clipped / ntok, len = (double)resp / rows, ent = gs->entropy / ntok;
    double loss = gs->loss / gc->M;
    printf("rl step %4d/%d | reward %.3f solved %.3f flat %.3f | loss %.5f kl %.5f clip %.4f | len %.1f entropy %.3f "
           "| lr %.2e norm %.4f | rollout %.0f ms update %.0f ms | %.0f tok/s\n",
           step, steps, reward, sol, fl, loss, kl, clipf, len, ent, lr, norm, rollout_ms, update_ms,
           (double)rows * ro->T / ((rollout_ms + update_ms) / 1e3));
    fflush(stdout);
    if (logf)
        fprintf(logf, "step %d rl reward %.6f solved %.6f flat %.6f loss %.6f kl %.6f clip %.6f len %.4f entropy %.6f "
                      "lr %.6e norm %.6f rollout_ms %.3f update_ms %.3f\n",
                step, reward, sol, fl, loss, kl, clipf, len, ent, lr, norm, rollout_ms, update_ms);
}

// ----------------------------------------------------------------------------
// eval: val loss and router diagnostics

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
void print_router_layer_of(FILE* logfile, int step, int l, const int* counts, int Nc, const float* z, const float* lse,
                           int N, int E, int K, float aux, float zl) {
    int mn = counts[0], mx = counts[0], empty = 0;
    for (int e = 0; e < E; e++) { if (counts[e] < mn) mn = counts[e]; if (counts[e] > mx) mx = counts[e]; empty += counts[e] == 0; }
    double ent = 0.0;
    for (int n = 0; n < N; n++)
        for (int e = 0; e < E; e++) { double p = exp(z[(size_t)n * E + e] - lse[n]); if (p > 0) ent -= p * log(p); }
    ent /= N;
    double uni = (double)Nc * K / E;
    printf("  router layer %d: load min %.2f max %.2f (x uniform), empty %d/%d, entropy %.3f (max %.3f), aux %.4f z %.4f |",
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

void print_router_layer(FILE* logfile, int step, int l, const int* counts, const float* z, const float* lse,
                        int N, int E, int K, float aux, float zl) {
    print_router_layer_of(logfile, step, l, counts, N, z, lse, N, E, K, aux, zl);
}

// every layer's router after the last forward. After a step of every rank (model->gcounts) the loads
// are over every rank's tokens and the entropy over this rank's
void print_router_stats(const Model* model, FILE* logfile, int step) {
    const MoEConfig* c = &model->config;
    int N = model->B * model->T, E = c->E, all = model->gcounts != NULL;
    for (int l = 0; l < c->L; l++)
        print_router_layer_of(logfile, step, l, (all ? model->gcounts : model->counts) + (size_t)l * E,
                              all ? N * dist.world : N, model->acts.z + (size_t)l * N * E, model->acts.lse + (size_t)l * N,
                              N, E, c->K, model->aux[l], model->zl[l]);
}

#ifdef TESTING
// ----------------------------------------------------------------------------
// test support: the reference debug state of dev/moe_ref.py (layout in README.md), read by
// test_moe.c and test_moe_cu.cu

#define DEBUG_MAGIC 20251124
typedef struct {
    int B, T, nsteps, warmup;
    float lr, beta1, beta2, eps, weight_decay, grad_clip, min_lr;
    int *x, *y, *experts;
    float *logits, *aux, *zl, *grads, *losses, *norms;
    float ce, loss;
} DebugState;

void debug_free(DebugState* d) {
    free(d->x); free(d->y); free(d->experts); free(d->logits); free(d->aux); free(d->zl);
    free(d->grads); free(d->losses); free(d->norms);
    memset(d, 0, sizeof(*d));
}

// read a debug state for a model of config c with num_params parameters. The sizes its header
// gives are checked against the file's size before anything is allocated. Returns 0, or -1 after
// an error message with nothing left allocated.
int debug_read(DebugState* d, const char* path, const MoEConfig* c, size_t num_params) {
    memset(d, 0, sizeof(*d));
    FILE* fp = fopen_report(path);
    if (!fp) return -1;
    int h[256];
    long size = file_size(fp);
    int bad = fread_report(h, sizeof(int), 256, fp, path);
    if (!bad && (h[0] != DEBUG_MAGIC || h[1] != 1)) bad = read_error("'%s' is not a debug state", path);
    if (bad) { fclose(fp); return -1; }
    d->B = h[2]; d->T = h[3]; d->nsteps = h[4];
    d->lr = i2f(h[5]); d->beta1 = i2f(h[6]); d->beta2 = i2f(h[7]); d->eps = i2f(h[8]);
    d->weight_decay = i2f(h[9]); d->grad_clip = i2f(h[10]); d->warmup = h[11]; d->min_lr = i2f(h[12]);
    // x, y, logits, ce, aux, zl, loss, experts, grads, losses, norms: 4 bytes each
    double words = 2.0 * d->B * d->T + (double)d->B * d->T * c->V + 2 + 2.0 * c->L + (double)c->L * d->B * d->T * c->K +
                   (double)num_params + 2.0 * d->nsteps;
    if (d->B <= 0 || d->T <= 0 || d->nsteps < 0 || d->T > c->T || 1024 + 4 * words != (double)size) {
        read_error("'%s' is %ld bytes, which does not fit its header (B=%d T=%d steps=%d) and the model (T=%d)", path, size,
                   d->B, d->T, d->nsteps, c->T);
        fclose(fp);
        memset(d, 0, sizeof(*d));
        return -1;
    }
    size_t N = (size_t)d->B * d->T;
    d->x = (int*)mallocCheck(N * sizeof(int));
    d->y = (int*)mallocCheck(N * sizeof(int));
    d->logits = (float*)mallocCheck(N * c->V * sizeof(float));
    d->aux = (float*)mallocCheck(c->L * sizeof(float));
    d->zl = (float*)mallocCheck(c->L * sizeof(float));
    d->experts = (int*)mallocCheck((size_t)c->L * N * c->K * sizeof(int));
    d->grads = (float*)mallocCheck(num_params * sizeof(float));
    d->losses = (float*)mallocCheck(d->nsteps * sizeof(float));
    d->norms = (float*)mallocCheck(d->nsteps * sizeof(float));
    bad = fread_report(d->x, sizeof(int), N, fp, path) || fread_report(d->y, sizeof(int), N, fp, path) ||
          fread_report(d->logits, sizeof(float), N * c->V, fp, path) || fread_report(&d->ce, sizeof(float), 1, fp, path) ||
          fread_report(d->aux, sizeof(float), c->L, fp, path) || fread_report(d->zl, sizeof(float), c->L, fp, path) ||
          fread_report(&d->loss, sizeof(float), 1, fp, path) ||
          fread_report(d->experts, sizeof(int), (size_t)c->L * N * c->K, fp, path) ||
          fread_report(d->grads, sizeof(float), num_params, fp, path) ||
          fread_report(d->losses, sizeof(float), d->nsteps, fp, path) ||
          fread_report(d->norms, sizeof(float), d->nsteps, fp, path);
    fclose(fp);
    for (size_t i = 0; i < N && !bad; i++)
        if (d->x[i] < 0 || d->x[i] >= c->V || d->y[i] < -1 || d->y[i] >= c->V)
            bad = read_error("'%s' batch position %zu holds token %d / target %d, outside V=%d", path, i, d->x[i], d->y[i], c->V);
    if (bad) { debug_free(d); return -1; }
    return 0;
}

// files and commands, for the tests of both trainers
// dev/moe_ref.py's GRPO reference (NAME_grpo.bin, read by test_moe and test_moe_cu): a rollout batch
// with the GRPO and AdamW settings it was made with and, per mini-batch update, the loss, the clipped
// token count, the grad norm and every gradient. Returns 0, or -1 after an error naming the file
// (nothing left allocated).
#define GRPO_REF_MAGIC 20251127
typedef struct {
    GrpoConfig gc;
    float opt[6];   // AdamW: lr, beta1, beta2, eps, weight decay, grad clip
    Rollouts ro;    // x, y, rewards, old and reference log-probs (ro.adv is left to the reader)
    float* adv_ref; // per row: the reference's advantages
    float* updates; // per update: loss, clipped tokens, grad norm, then num_params gradients
} GrpoRef;

void grpo_ref_free(GrpoRef* g) { rollouts_free(&g->ro); free(g->adv_ref); free(g->updates); memset(g, 0, sizeof(*g)); }

int grpo_ref_read(GrpoRef* g, const char* path, int maxT, size_t num_params) {
    memset(g, 0, sizeof(*g));
    FILE* fp = fopen_report(path);
    if (!fp) return -1;
    int h[256];
    if (fread_report(h, sizeof(int), 256, fp, path)) { fclose(fp); return -1; }
    int rows = h[2], T = h[3], M = h[6];
    if (h[0] != GRPO_REF_MAGIC || h[1] != 1 || rows <= 0 || T <= 0 || T > maxT || M < 1 || rows % M || h[5] < 2) {
        fclose(fp);
        return read_error("'%s' is not a GRPO reference for this model (magic, version or sizes)", path);
    }
    size_t N = (size_t)rows * T;
    long expect = 1024 + 4L * (4 * (long)N + 2L * rows) + 4L * M * (3 + (long)num_params);
    if (file_size(fp) != expect) { fclose(fp); return read_error("'%s' has the wrong size for its header", path); }
    GrpoConfig gc = {h[4], h[5], h[8], M, h[7], 1.0f, 0.0f, 0.0f};
    memcpy(&gc.clip, &h[9], 4);
    memcpy(&gc.kl, &h[10], 4);
    memcpy(g->opt, &h[11], sizeof g->opt);
    g->gc = gc;
    rollouts_alloc(&g->ro, rows, T);
    g->adv_ref = (float*)mallocCheck(rows * sizeof(float));
    g->updates = (float*)mallocCheck((size_t)M * (3 + num_params) * sizeof(float));
    int bad = fread_report(g->ro.x, sizeof(int), N, fp, path) || fread_report(g->ro.y, sizeof(int), N, fp, path) ||
              fread_report(g->ro.reward, sizeof(float), rows, fp, path) ||
              fread_report(g->adv_ref, sizeof(float), rows, fp, path) ||
              fread_report(g->ro.old_logp, sizeof(float), N, fp, path) ||
              fread_report(g->ro.ref_logp, sizeof(float), N, fp, path) ||
              fread_report(g->updates, sizeof(float), (size_t)M * (3 + num_params), fp, path);
    fclose(fp);
    if (bad) { grpo_ref_free(g); return -1; }
    return 0;
}

int files_equal(const char* a, const char* b) {
    FILE* fa = fopen(a, "rb");
    FILE* fb = fopen(b, "rb");
    int eq = fa && fb;
    while (eq) {
        int ca = fgetc(fa), cb = fgetc(fb);
        if (ca != cb) eq = 0;
        if (ca == EOF || cb == EOF) break;
    }
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return eq;
}

void write_shard(const char* path, const int* toks, int n, int u32) {
    int h[256] = {0};
    h[0] = u32 ? SHARD_MAGIC_U32 : SHARD_MAGIC_U16; h[1] = u32 ? 7 : 1; h[2] = n;
    FILE* fp = fopenCheck(path, "wb");
    fwrite(h, sizeof(int), 256, fp);
    for (int i = 0; i < n; i++) {
        if (u32) { uint32_t t = (uint32_t)toks[i]; fwrite(&t, 4, 1, fp); }
        else { uint16_t t = (uint16_t)toks[i]; fwrite(&t, 2, 1, fp); }
    }
    fclose(fp);
}

// an eval file (the layout evalset_load reads) of es's items, for a model with vocabulary V
void write_eval(const char* path, const EvalSet* es, int V) {
    int h[256] = {0};
    h[0] = EVAL_MAGIC; h[1] = 1; h[2] = es->n; h[6] = V; h[8] = es->kind;
    for (int i = 0; i < es->n; i++) {
        int rl = (int)strlen(es->ref[i]);
        if (es->plen[i] > h[3]) h[3] = es->plen[i];
        if (es->alen[i] > h[4]) h[4] = es->alen[i];
        if (rl > h[5]) h[5] = rl;
        h[9] += es->plen[i]; h[10] += es->alen[i]; h[11] += rl;
    }
    memcpy((char*)h + 64, es->name, strlen(es->name) < 63 ? strlen(es->name) : 63);
    FILE* fp = fopenCheck(path, "wb");
    fwrite(h, sizeof(int), 256, fp);
    for (int i = 0; i < es->n; i++) {
        int len[2] = {es->plen[i], es->alen[i]}, rl = (int)strlen(es->ref[i]);
        fwrite(len, sizeof(int), 2, fp);
        fwrite(es->toks[i], sizeof(int), len[0] + len[1], fp);
        fwrite(&rl, sizeof(int), 1, fp);
        fwrite(es->ref[i], 1, rl, fp);
    }
    fclose(fp);
}

// run a shell command; returns its exit status and leaves its output in *out (malloc'd)
// run a command, its stdout and stderr into *out (malloc'd); returns its exit status (-1: killed).
// A sanitizer report in the output (the sanitized test builds drive sanitized trainers) is counted
// in sanitizer_reports and printed, so the test can fail on it whatever the exit status was.
int sanitizer_reports = 0;
int run_cmd(const char* cmd, char** out) {
    char full[16384];
    snprintf(full, sizeof full, "%s 2>&1", cmd);
    FILE* p = popen(full, "r");
    size_t cap = 1 << 16, len = 0;
    char* buf = (char*)mallocCheck(cap);
    size_t n;
    while (p && (n = fread(buf + len, 1, cap - len - 1, p)) > 0) {
        len += n;
        if (len + 1 == cap) { cap *= 2; buf = (char*)realloc(buf, cap); }
    }
    buf[len] = 0;
    int status = p ? pclose(p) : -1;
    *out = buf;
    const char* marks[] = {"runtime error:", "ERROR: AddressSanitizer", "ERROR: LeakSanitizer"};
    for (int i = 0; i < 3; i++)
        if (strstr(buf, marks[i])) {
            sanitizer_reports++;
            printf("SANITIZER REPORT from: %s\n%s\n", cmd, strstr(buf, marks[i]));
            break;
        }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}
#endif

// ----------------------------------------------------------------------------
// main: flags, training loop

#ifndef TESTING

typedef struct {
    const char *train_glob, *val_glob, *tokenizer, *out_dir, *init_ckpt, *fwd_in, *fwd_out, *eval_files;
    int resume, B, T, steps, grad_accum, warmup, val_every, val_batches, sample_every, gen_len, ckpt_every, shuffle;
    int acc_items, eval_only, ttc_samples;
    float ttc_temp;
    int profile_every;   // -pf: the per-phase time table every N steps (0: off)
    float lr, min_lr_frac, weight_decay, grad_clip, beta1, beta2, init_std;
    uint64_t seed;
    MoEConfig model;     // shape for a random init
    int shape_given[9];  // which of V,T,L,C,H,Hkv,E,K,F were given as flags
    const char* rl_file; // -rl: GRPO post-training on this eval-format prompt file
    GrpoConfig grpo;
    int lr_given[3];     // -l, -u, -q given (else GRPO uses its own defaults)
    int ep;              // -ep: expert-parallel group size (processes, MPI build)
} Args;

static void usage(void) {
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
"GRPO post-training (README \"GRPO post-training\"; -x counts RL steps, one rollout batch each):\n"
"  -rl FILE  RL prompts: an eval-format file (data/arith/arith_rl.bin); needs -e, the start and the reference\n"
"  -rp P prompts per rollout batch (16)   -rg G samples per prompt (5)   -rr R max response tokens (64)\n"
"  -rm M mini-batch updates per rollout batch, dividing P (4)   -rt sampling temperature (1.0)\n"
"  -rc clip epsilon (0.2)   -rk k3 KL coefficient (0.001, 0 = no reference model)\n"
"  -ra loss aggregation: 0 token mean (default), 1 per-sequence mean (DeepSeekMath), 2 token sum / R (Dr. GRPO)\n"
"  with -rl the defaults of -l, -u, -q become 5e-6, 0, 1 (a constant lr without warm-up)\n"
"across processes (make train_moe_mpi; mpirun -np R ./train_moe_mpi ...; README \"Beyond one process\"):\n"
"  -b is the global batch: each rank trains on B/R of its sequences (data parallel); rank 0 logs, evaluates\n"
"  and writes checkpoints (the one-process format)\n"
"  -ep P expert parallel: the experts of every layer sharded over groups of P ranks, tokens sent to them by\n"
"        all-to-all (P divides R and E; default 1 = data parallel only)\n");
}

static int parse_int(const char* flag, const char* s) {
    char* end;
    long v = strtol(s, &end, 10);
    if (*s == 0 || *end != 0 || v < -2147483647L || v > 2147483647L) {
        fprintf(stderr, "Error: flag %s expects an integer, got '%s'\n", flag, s);
        exit(EXIT_FAILURE);
    }
    return (int)v;
}
static float parse_float(const char* flag, const char* s) {
    char* end;
    float v = strtof(s, &end);
    if (*s == 0 || *end != 0 || !isfinite(v)) {
        fprintf(stderr, "Error: flag %s expects a number, got '%s'\n", flag, s);
        exit(EXIT_FAILURE);
    }
    return v;
}

static void parse_args(Args* a, int argc, char** argv) {
    memset(a, 0, sizeof(*a));
    a->train_glob = "data/default/train_*.bin"; a->val_glob = "data/default/val_*.bin";
    a->tokenizer = "data/default/tokenizer.bin";
    a->B = 16; a->T = 128; a->steps = 1500; a->grad_accum = 1; a->warmup = 50;
    a->val_every = 250; a->val_batches = 20; a->sample_every = 500; a->gen_len = 64; a->shuffle = 1;
    a->acc_items = 100; a->ttc_samples = 0; a->ttc_temp = 0.8f;
    a->lr = 3e-3f; a->min_lr_frac = 0.1f; a->weight_decay = 0.1f; a->grad_clip = 1.0f;
    a->beta1 = 0.9f; a->beta2 = 0.95f; a->init_std = 0.02f; a->seed = 1337;
    GrpoConfig gd = {16, 5, 64, 4, AGG_TOKEN_MEAN, 1.0f, 0.2f, 0.001f};
    a->grpo = gd;
    MoEConfig d = {0, 0, 4, 128, 4, 0, 8, 2, 0, 10000.0f, 1e-5f, 1e-2f, 1e-3f};
    a->model = d;
    a->ep = 1;
    for (int i = 1; i < argc; i++) {
        const char* f = argv[i];
        if (strcmp(f, "-h") == 0 || strcmp(f, "--help") == 0) { usage(); exit(EXIT_SUCCESS); }
        if (f[0] != '-' || i + 1 >= argc) {
            fprintf(stderr, "Error: bad argument '%s' (flags come as '-flag value'; -h lists them)\n", f);
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
        else if (!strcmp(f, "-l")) { a->lr = parse_float(f, v); a->lr_given[0] = 1; }
        else if (!strcmp(f, "-u")) { a->warmup = parse_int(f, v); a->lr_given[1] = 1; }
        else if (!strcmp(f, "-q")) { a->min_lr_frac = parse_float(f, v); a->lr_given[2] = 1; }
        else if (!strcmp(f, "-rl")) a->rl_file = v;
        else if (!strcmp(f, "-rp")) a->grpo.P = parse_int(f, v);
        else if (!strcmp(f, "-rg")) a->grpo.G = parse_int(f, v);
        else if (!strcmp(f, "-rr")) a->grpo.R = parse_int(f, v);
        else if (!strcmp(f, "-rm")) a->grpo.M = parse_int(f, v);
        else if (!strcmp(f, "-ra")) a->grpo.agg = parse_int(f, v);
        else if (!strcmp(f, "-rt")) a->grpo.temp = parse_float(f, v);
        else if (!strcmp(f, "-rc")) a->grpo.clip = parse_float(f, v);
        else if (!strcmp(f, "-rk")) a->grpo.kl = parse_float(f, v);
        else if (!strcmp(f, "-c")) a->weight_decay = parse_float(f, v);
        else if (!strcmp(f, "-gc")) a->grad_clip = parse_float(f, v);
        else if (!strcmp(f, "-b1")) a->beta1 = parse_float(f, v);
        else if (!strcmp(f, "-b2")) a->beta2 = parse_float(f, v);
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
    if (a->rl_file) { // the paper's post-training schedule: a constant lr, no warm-up
        if (!a->lr_given[0]) a->lr = 5e-6f;
        if (!a->lr_given[1]) a->warmup = 0;
        if (!a->lr_given[2]) a->min_lr_frac = 1.0f;
    }
    if (a->model.Hkv == 0) a->model.Hkv = a->model.H;
    if (a->model.F == 0) a->model.F = 2 * a->model.C;
    const char* bad = NULL;
    if (a->B <= 0) bad = "-b (batch size) must be positive";
    else if (a->T <= 0) bad = "-t (sequence length) must be positive";
    else if (a->steps < 0) bad = "-x (steps) must be >= 0";
    else if (a->grad_accum <= 0) bad = "-ga (accumulation steps) must be positive";
    else if (!(a->lr >= 0)) bad = "-l (learning rate) must be >= 0";
    else if (a->warmup < 0) bad = "-u (warm-up) must be >= 0";
    else if (a->min_lr_frac < 0 || a->min_lr_frac > 1) bad = "-q (min lr fraction) must be in [0, 1]";
    else if (a->grad_clip < 0) bad = "-gc (grad clip) must be >= 0";
    else if (a->beta1 < 0 || a->beta1 >= 1 || a->beta2 < 0 || a->beta2 >= 1) bad = "-b1/-b2 must be in [0, 1)";
    else if (a->resume && !a->out_dir) bad = "-y 1 needs -o (the directory holding the checkpoints)";
    else if ((a->fwd_in == NULL) != (a->fwd_out == NULL)) bad = "-fi and -fo go together";
    else if (a->ttc_samples < 0 || a->ttc_samples > 1024) bad = "-tn (samples per item) must be in [0, 1024]";
    else if (a->profile_every < 0) bad = "-pf (profile every N steps) must be >= 0";
    else if (a->ttc_samples > 0 && !(a->ttc_temp > 0)) bad = "-tt (sampling temperature) must be positive";
    else if (a->rl_file && !a->init_ckpt) bad = "-rl needs -e (the checkpoint GRPO starts from, also its reference model)";
    else if (a->rl_file && a->grpo.P < 1) bad = "-rp (prompts per rollout batch) must be positive";
    else if (a->rl_file && a->grpo.G < 2) bad = "-rg (samples per prompt) must be >= 2: a group of one has no advantage";
    else if (a->rl_file && a->grpo.R < 1) bad = "-rr (max response tokens) must be positive";
    else if (a->rl_file && (a->grpo.M < 1 || a->grpo.P % a->grpo.M != 0))
        bad = "-rm (mini-batches) must be positive and divide -rp (prompts per rollout batch)";
    else if (a->rl_file && (a->grpo.agg < 0 || a->grpo.agg > 2)) bad = "-ra (loss aggregation) must be 0, 1 or 2";
    else if (a->rl_file && !(a->grpo.temp > 0)) bad = "-rt (sampling temperature) must be positive";
    else if (a->rl_file && !(a->grpo.clip > 0 && a->grpo.clip < 1)) bad = "-rc (clip epsilon) must be in (0, 1)";
    else if (a->rl_file && !(a->grpo.kl >= 0)) bad = "-rk (KL coefficient) must be >= 0";
    else if (a->ep < 1) bad = "-ep (expert-parallel size) must be >= 1";
    if (bad) { fprintf(stderr, "Error: %s\n", bad); exit(EXIT_FAILURE); }
}

// ----------------------------------------------------------------------------
// training across processes (README "Beyond one process"): the steps around the model's collectives

// MPI_Init, this rank's place; ranks other than 0 print nothing but errors
static void dist_init(int* argc, char*** argv) {
#ifdef USE_MPI
    MPI_Init(argc, argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &dist.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &dist.world);
    if (dist.rank != 0 && !freopen("/dev/null", "w", stdout)) exit(EXIT_FAILURE);
#else
    (void)argc; (void)argv;
#endif
}

static void dist_finalize(void) {
#ifdef USE_MPI
    MPI_Finalize();
#endif
}

// an error every rank finds alike (a flag, a shape): rank 0 says it, every rank exits non-zero
static void dist_fail(const char* msg) {
    if (dist.rank == 0) fprintf(stderr, "Error: %s\n", msg);
    dist_finalize();
    exit(EXIT_FAILURE);
}

// the flags against the number of processes, and the expert-parallel groups: ranks [g*ep, (g+1)*ep)
// exchange tokens, ranks with the same rank % ep hold the same experts
static void dist_setup(const Args* a, const MoEConfig* c) {
    if (dist.world == 1 && a->ep == 1) return;
#ifndef USE_MPI
    (void)c;
    dist_fail("-ep needs the MPI build (make train_moe_mpi; run it under mpirun)");
#else
    char msg[256];
    const char* one = a->rl_file ? "-rl (GRPO)" : a->fwd_in ? "-fi/-fo (forward only)" : a->eval_only ? "-ex (eval only)" : NULL;
    if (one) snprintf(msg, sizeof msg, "%s runs in one process, not across %d (run ./train_moe)", one, dist.world);
    else if (dist.world % a->ep)
        snprintf(msg, sizeof msg, "-ep %d does not divide the %d processes (mpirun -np)", a->ep, dist.world);
    else if (c->E % a->ep)
        snprintf(msg, sizeof msg, "-ep %d does not divide E=%d experts (flag -ne or the checkpoint)", a->ep, c->E);
    else if (a->B % dist.world)
        snprintf(msg, sizeof msg, "-b %d (the global batch) is not divisible by the %d processes", a->B, dist.world);
    if (one || dist.world % a->ep || c->E % a->ep || a->B % dist.world) dist_fail(msg);
    dist.ep = a->ep;
    dist.ep_rank = dist.rank % dist.ep;
    MPI_Comm_split(MPI_COMM_WORLD, dist.rank / dist.ep, dist.rank, &dist.ep_comm);
    MPI_Comm_split(MPI_COMM_WORLD, dist.rank % dist.ep, dist.rank, &dist.edp_comm);
    printf("processes: %d ranks = %d data parallel x %d expert parallel; %d sequences per rank, %d experts per rank\n",
           dist.world, dist.world / dist.ep, dist.ep, a->B / dist.world, c->E / dist.ep);
#endif
}

// this rank's part of a whole model that every rank made alike (one init seed, or one checkpoint):
// the replicated tensors whole, experts [e0, e0+El) of each layer of the expert tensors; with AdamW m, v
static void model_shard(Model* local, const Model* full, int e0, int El) {
    const MoEConfig* c = &full->config;
    model_build_experts(local, c, e0, El);
    const float* src[3] = {full->params_memory, full->m_memory, full->v_memory};
    float* dst[3] = {local->params_memory, local->m_memory, local->v_memory};
    size_t per = (size_t)c->F * c->C; // one expert of one layer, in w1, w3 or w2
    for (int b = 0; b < 3; b++) {
        const float* sp = src[b];
        float* dp = dst[b];
        for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
            if (!is_expert_tensor(t)) memcpy(dp, sp, full->param_sizes[t] * sizeof(float));
            else for (int l = 0; l < c->L; l++)
                memcpy(dp + (size_t)l * El * per, sp + ((size_t)l * c->E + e0) * per, El * per * sizeof(float));
            sp += full->param_sizes[t];
            dp += local->param_sizes[t];
        }
    }
}

// the reverse, into rank 0's whole model (for evals and checkpoints): expert group 0 (ranks 0..ep-1)
// holds every expert, so its ranks send theirs; the other groups hold copies and take no part
static void dist_gather_model(Model* full, const Model* local, int with_optimizer) {
#ifdef USE_MPI
    if (dist.rank >= dist.ep) return;
    const MoEConfig* c = &local->config;
    int El = local->El, root = dist.rank == 0;
    size_t per = (size_t)c->F * c->C;
    const float* src[3] = {local->params_memory, local->m_memory, local->v_memory};
    float* dst[3] = {root ? full->params_memory : NULL, root ? full->m_memory : NULL, root ? full->v_memory : NULL};
    for (int b = 0; b < (with_optimizer ? 3 : 1); b++) {
        const float* sp = src[b];
        size_t doff = 0;
        for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
            size_t whole = (size_t)c->L * c->E * per; // an expert tensor of the whole model
            if (!is_expert_tensor(t)) {
                if (root) memcpy(dst[b] + doff, sp, local->param_sizes[t] * sizeof(float));
                doff += local->param_sizes[t];
            } else {
                for (int l = 0; l < c->L; l++)
                    MPI_Gather(sp + (size_t)l * El * per, (int)(El * per), MPI_FLOAT,
                               root ? dst[b] + doff + (size_t)l * c->E * per : NULL, (int)(El * per), MPI_FLOAT, 0,
                               dist.ep_comm);
                doff += whole;
            }
            sp += local->param_sizes[t];
        }
    }
#else
    (void)full; (void)local; (void)with_optimizer;
#endif
}

// the sum over ranks of every gradient: the replicated tensors over all ranks, the expert tensors over
// the ranks holding the same experts. Fixed buckets in a fixed order, so the sums never depend on timing.
static void dist_allreduce_grads(Model* model) {
#ifdef USE_MPI
    const size_t bucket = (size_t)1 << 24;
    float* g = model->grads_memory;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        size_t n = model->param_sizes[t];
        int expert = is_expert_tensor(t), ranks = expert ? dist.world / dist.ep : dist.world;
        for (size_t i = 0; i < n && ranks > 1; i += bucket)
            MPI_Allreduce(MPI_IN_PLACE, g + i, (int)(n - i < bucket ? n - i : bucket), MPI_FLOAT, MPI_SUM,
                          expert ? dist.edp_comm : MPI_COMM_WORLD);
        g += n;
    }
#else
    (void)model;
#endif
}

// the global gradient norm when the experts are sharded: the replicated tensors' sum of squares (the
// same on every rank) plus the sum over the expert group of each rank's experts'
static float dist_grad_norm(const Model* model) {
    double s[2] = {0.0, 0.0};
    const float* g = model->grads_memory;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        s[is_expert_tensor(t)] += sumsq_deterministic(g, model->param_sizes[t]);
        g += model->param_sizes[t];
    }
#ifdef USE_MPI
    MPI_Allreduce(MPI_IN_PLACE, &s[1], 1, MPI_DOUBLE, MPI_SUM, dist.ep_comm);
#endif
    return (float)sqrt(s[0] + s[1]);
}

// x[n] = its mean over ranks (the logged loss terms)
static void dist_mean(double* x, int n) {
#ifdef USE_MPI
    MPI_Allreduce(MPI_IN_PLACE, x, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    for (int i = 0; i < n; i++) x[i] /= dist.world;
#else
    (void)x; (void)n;
#endif
}

// wait for every rank (while rank 0 evaluates alone) sleeping, not spinning on the cores it needs
static void dist_wait_all(void) {
#ifdef USE_MPI
    if (dist.world == 1) return;
    MPI_Request req;
    int done = 0;
    MPI_Ibarrier(MPI_COMM_WORLD, &req);
    for (;;) {
        MPI_Test(&req, &done, MPI_STATUS_IGNORE);
        if (done) break;
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
#endif
}

// the replicas must hold the same bits: a hash of the replicated parameters over all ranks and of the
// experts over the ranks holding the same ones, compared before each checkpoint (an error if not)
static void dist_check_replicas(const Model* model) {
#ifdef USE_MPI
    uint64_t h[2] = {1469598103934665603ULL, 1469598103934665603ULL}; // FNV-1a: replicated, experts
    const unsigned char* p = (const unsigned char*)model->params_memory;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        size_t n = model->param_sizes[t] * sizeof(float);
        uint64_t* hh = &h[is_expert_tensor(t)];
        for (size_t i = 0; i < n; i++) *hh = (*hh ^ p[i]) * 1099511628211ULL;
        p += n;
    }
    uint64_t lo[2], hi[2];
    MPI_Allreduce(&h[0], &lo[0], 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(&h[0], &hi[0], 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD);
    MPI_Allreduce(&h[1], &lo[1], 1, MPI_UINT64_T, MPI_MIN, dist.edp_comm);
    MPI_Allreduce(&h[1], &hi[1], 1, MPI_UINT64_T, MPI_MAX, dist.edp_comm);
    int bad = lo[0] != hi[0] || lo[1] != hi[1], any;
    MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (any) dist_fail("the ranks' copies of the parameters differ (a reduction that is not the same on every rank)");
#else
    (void)model;
#endif
}

// a checkpoint brings its own shape: any shape flag given must agree with it
static void check_shape_flags(const MoEConfig* c, const Args* a, const char* ckpt) {
    int have[9] = {c->V, c->T, c->L, c->C, c->H, c->Hkv, c->E, c->K, c->F};
    int want[9] = {a->model.V, a->model.T, a->model.L, a->model.C, a->model.H, a->model.Hkv, a->model.E, a->model.K, a->model.F};
    const char* flags[9] = {"-nv", "-t", "-nl", "-nc", "-nh", "-nkv", "-ne", "-nk", "-nf"};
    for (int i = 0; i < 9; i++)
        if (a->shape_given[i] && have[i] != want[i]) {
            fprintf(stderr, "Error: checkpoint '%s' has %s %d but %s %d was given\n", ckpt, flags[i], have[i], flags[i], want[i]);
            exit(EXIT_FAILURE);
        }
}

// total and active parameters: active = all but the E-K experts a token does not use
static void print_model_summary(const MoEConfig* c, size_t num_params) {
    size_t active = num_params - (size_t)c->L * (c->E - c->K) * 3 * c->F * c->C;
    printf("model: V=%d L=%d C=%d H=%d Hkv=%d E=%d K=%d F=%d | params %.3fM total, %.3fM active (sparsity %.3f)\n",
           c->V, c->L, c->C, c->H, c->Hkv, c->E, c->K, c->F, num_params / 1e6, active / 1e6, 1.0 - (double)c->K / c->E);
}

// mkdir -p: create dir and any missing parents
static void mkdir_p(const char* dir) {
    size_t n = strlen(dir);
    char* p = (char*)mallocCheck(n + 1);
    memcpy(p, dir, n + 1);
    for (size_t i = 1; i <= n; i++)
        if (p[i] == '/' || p[i] == 0) {
            char keep = p[i];
            p[i] = 0;
            if (mkdir(p, 0755) != 0 && errno != EEXIST) {
                fprintf(stderr, "Error: cannot create output directory '%s' (flag -o): %s\n", p, strerror(errno));
                exit(EXIT_FAILURE);
            }
            p[i] = keep;
        }
    free(p);
}

// resuming in dir: the newest model_NNNNNNNN.bin (NULL if none). A model_NNNNNNNN.bin.tmp is a
// checkpoint write that was killed before its rename (the .bin it would have replaced is intact):
// it is removed, and named.
static char* resume_checkpoint(const char* dir) {
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
            if (dist.rank != 0) {} // rank 0 cleans up
            else if (remove(tmp) == 0) printf("resume: removed '%s', left by a checkpoint write that did not finish\n", tmp);
            else fprintf(stderr, "warning: cannot remove the partial checkpoint '%s': %s\n", tmp, strerror(errno));
            free(tmp);
        }
    }
    closedir(d);
    if (best < 0) return NULL;
    char* path = (char*)mallocCheck(strlen(dir) + 32);
    sprintf(path, "%s/model_%08d.bin", dir, best);
    return path;
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
    char* tmp = (char*)mallocCheck(strlen(a->fwd_out) + 5);
    sprintf(tmp, "%s.tmp", a->fwd_out);
    fp = fopenCheck(tmp, "wb");
    size_t nl = n * model->config.V;
    int ok = fwrite(model->logits, sizeof(float), nl, fp) == nl;
    ok = (fclose(fp) == 0) && ok;
    if (!ok || rename(tmp, a->fwd_out) != 0) { remove(tmp); fprintf(stderr, "Error: writing '%s' failed\n", a->fwd_out); exit(EXIT_FAILURE); }
    free(tmp); free(toks);
    return 0;
}

// every -ev file: task loss (bits/token, bits/byte) and greedy accuracy, then (-tn) test-time compute,
// on the console and in the log
static void run_task_evals(Model* model, EvalSet* sets, int nsets, const Tokenizer* tk, int eot, const Args* a,
                           FILE* logf, int step) {
    for (int i = 0; i < nsets; i++) {
        double bpt, bpb;
        int trunc, scored;
        eval_task_loss(model, &sets[i], tk, a->B, a->T, eot, &bpt, &bpb, &trunc);
        double acc = 0.0;
        scored = 0;
        if (!sets[i].loss_only) acc = eval_task_accuracy(model, &sets[i], tk, eot, a->acc_items, &scored);
        report_task_eval(logf, step, &sets[i], bpt, bpb, trunc, acc, scored);
        if (a->ttc_samples > 0 && !sets[i].loss_only) {
            int ns[16];
            double maj[16], pass[16];
            uint64_t rng = hash3(a->seed, (uint64_t)step, 0x77C + i); // its own stream: training is not affected
            int nn = eval_test_time_compute(model, &sets[i], tk, eot, a->acc_items, a->ttc_samples, a->ttc_temp, &rng,
                                            ns, maj, pass, &scored);
            report_ttc(logf, step, &sets[i], nn, ns, maj, pass, scored, a->ttc_temp);
        }
    }
}

// -pf: the phase table of the last n steps (step_ms: their whole time), to stdout and the log; resets
static void print_phase_table(FILE* logf, int step, int n, double step_ms) {
    static const char* phase_names[NUM_PHASES] = {
        "embedding (fwd+bwd)", "attention fwd (norm, qkv, rope, softmax, out)", "attention bwd",
        "router fwd (norm, logits, top-k, permute)", "router bwd (aux, z, gates, permute)", "experts fwd (SwiGLU GEMMs)",
        "experts bwd", "unpermute fwd (weighted combine)", "unpermute bwd", "classifier fwd (norm, lm_head, softmax)",
        "classifier bwd", "optimizer (grad norm, AdamW)"};
    double sum = 0;
    for (int p = 0; p < NUM_PHASES; p++) sum += phase_clock.ms[p];
    printf("phases (ms per step, mean of steps %d-%d):\n", step - n + 1, step);
    for (int p = 0; p <= NUM_PHASES; p++) {
        double ms = (p < NUM_PHASES ? phase_clock.ms[p] : step_ms - sum) / n;
        const char* name = p < NUM_PHASES ? phase_names[p] : "rest (data, zero grad, logging)";
        printf("  %-46s %9.2f  %5.1f%%\n", name, ms, 100.0 * ms * n / step_ms);
        if (logf) fprintf(logf, "step %d phase %d %.4f\n", step, p, ms);
    }
    printf("  %-46s %9.2f\n", "step", step_ms / n);
    memset(phase_clock.ms, 0, sizeof phase_clock.ms);
}

// -rl: GRPO post-training of the loaded model (README "GRPO post-training"). The reference model is
// the -e checkpoint, re-read on resume; a checkpoint holds the policy, AdamW, the RL step, the
// position in the prompt order and the sampler's RNG, so resuming continues bit for bit.
static int run_grpo(Model* model, const Args* a, TrainState* st, const Tokenizer* tk, EvalSet* sets, int nsets,
                    DataLoader* val, FILE* logf) {
    const GrpoConfig* gc = &a->grpo;
    const MoEConfig* c = &model->config;
    int T = a->T, eot = tk->ok ? tk->eot : 0, rows = gc->P * gc->G, mb = rows / gc->M;
    EvalSet es;
    if (evalset_load(&es, a->rl_file, c->V, T) != 0) return 1;
    if (grpo_check_prompts(&es, a->rl_file, gc, T) != 0) { evalset_free(&es); return 1; }
    Model ref;
    int use_ref = gc->kl > 0;
    if (use_ref) {
        TrainState rst;
        if (checkpoint_load(&ref, a->init_ckpt, &rst, 0) != 0) { evalset_free(&es); return 1; }
        if (!grpo_same_shape(&ref.config, c)) {
            fprintf(stderr, "Error: reference checkpoint '%s' (flag -e) has another shape than the policy being resumed\n",
                    a->init_ckpt);
            model_free(&ref);
            evalset_free(&es);
            return 1;
        }
        model_alloc_acts(&ref, mb, T);
    }
    printf("grpo: %s (%d prompts) | P=%d G=%d R=%d M=%d (%d rows per update) temp=%g clip=%g kl=%g agg=%s | lr=%g\n",
           a->rl_file, es.n, gc->P, gc->G, gc->R, gc->M, mb, gc->temp, gc->clip, gc->kl,
           gc->agg == AGG_TOKEN_MEAN ? "token-mean" : gc->agg == AGG_SEQ_MEAN ? "seq-mean" : "dr-grpo", a->lr);
    Rollouts ro;
    rollouts_alloc(&ro, rows, T);
    float* w = (float*)mallocCheck((size_t)mb * T * sizeof(float));
    int* perm = (int*)mallocCheck((size_t)es.n * sizeof(int));
    int* items = (int*)mallocCheck((size_t)gc->P * sizeof(int));
    int perm_epoch = -1;
    DataPos pos = st->pos;
    Decoders dec = decoders_make(model, T);
    if (a->val_every > 0 && st->step == 0) { // where GRPO starts from, as "step 0"
        float vl = eval_val_loss(model, val, a->val_batches);
        printf("val loss %.4f\n", vl);
        if (logf) fprintf(logf, "step 0 val %.6f\n", vl);
        run_task_evals(model, sets, nsets, tk, eot, a, logf, 0);
    }
    for (int step = st->step; step < a->steps; step++) {
        double t0 = now_ms();
        model->step = step + 1;
        for (int i = 0; i < dec.n; i++) dec.m[i].step = step + 1;
        grpo_next_prompts(perm, &perm_epoch, es.n, &pos, st->seed, items, gc->P);
        grpo_rollouts(&dec, &es, items, gc, tk, eot, rng_u64(&st->rng), &ro);
        int flat = grpo_advantages(ro.reward, ro.adv, rows, gc->G);
        if (use_ref) grpo_ref_logp(&ref, &ro, gc->M);
        double t1 = now_ms();
        GrpoStats gs = {0};
        float lr = lr_schedule(step, a->steps, a->warmup, a->lr, a->lr * a->min_lr_frac), norm = 0.0f;
        for (int m = 0; m < gc->M; m++) { // one AdamW step per mini-batch, pi_old fixed for the whole batch
            size_t o = (size_t)m * mb * T;
            model_zero_grad(model);
            grpo_backward(model, ro.x + o, ro.y + o, ro.adv + m * mb, ro.old_logp + o, ro.ref_logp + o, mb, T, gc, w, &gs);
            norm = global_grad_norm(model);
            float scale = (a->grad_clip > 0 && norm > a->grad_clip) ? a->grad_clip / norm : 1.0f;
            model_update(model, lr, a->beta1, a->beta2, 1e-8f, a->weight_decay, step * gc->M + m + 1, scale);
        }
        grpo_report(logf, step + 1, a->steps, gc, &ro, flat, &gs, lr, norm, t1 - t0, now_ms() - t1);
        int last = step + 1 == a->steps;
        if (a->val_every > 0 && ((step + 1) % a->val_every == 0 || last)) {
            float vl = eval_val_loss(model, val, a->val_batches);
            printf("val loss %.4f\n", vl);
            if (logf) fprintf(logf, "step %d val %.6f\n", step + 1, vl);
            run_task_evals(model, sets, nsets, tk, eot, a, logf, step + 1);
        }
        if (a->out_dir && ((a->ckpt_every > 0 && (step + 1) % a->ckpt_every == 0) || last)) {
            char* path = (char*)mallocCheck(strlen(a->out_dir) + 32);
            sprintf(path, "%s/model_%08d.bin", a->out_dir, step + 1);
            TrainState now = {step + 1, pos, st->rng, st->seed};
            checkpoint_save(model, path, 1, &now);
            printf("saved %s\n", path);
            free(path);
        }
        if (logf) fflush(logf);
    }
    if (use_ref) model_free(&ref);
    decoders_free(&dec);
    rollouts_free(&ro);
    free(w); free(perm); free(items);
    evalset_free(&es);
    return 0;
}

// libgomp reads its wait policy once, when the program loads, and by default a thread that reaches
// a barrier first spins 300,000 times before it sleeps. A step has over a thousand barriers, so on a
// machine where another process wants the cores the spinning threads take the time the lagging one
// needs, and a step can take 10x longer. A spin count of 3000 costs nothing measurable on a quiet
// machine and degrades gently on a busy one (README, "Threads on a busy machine"). Since the
// setting must be in the environment before libgomp starts, the trainer sets it and re-executes
// itself, unless the user chose a policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT).
static void gentle_omp_wait_policy(char** argv) {
#ifdef OMP
    if (getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT")) return;
    setenv("GOMP_SPINCOUNT", "3000", 1);
    execv("/proc/self/exe", argv); // returns only if it failed: then run as we are
    unsetenv("GOMP_SPINCOUNT");
#else
    (void)argv;
#endif
}

int main(int argc, char** argv) {
    gentle_omp_wait_policy(argv);
    dist_init(&argc, &argv);
    Args a;
    parse_args(&a, argc, argv);
    Tokenizer tk;
    if (tokenizer_init(&tk, a.tokenizer) != 0) exit(EXIT_FAILURE);
    // the model: from a checkpoint (-e or -y) or a random init
    Model model;
    TrainState st = {0, {0, 0, 0}, 0, a.seed};
    char* resume_path = a.resume ? resume_checkpoint(a.out_dir) : NULL;
    const char* ckpt = resume_path ? resume_path : a.init_ckpt;
    if (a.resume && !resume_path) printf("resume: no checkpoint in '%s' yet, starting fresh\n", a.out_dir);
    if (ckpt) {
        if (checkpoint_load(&model, ckpt, &st, resume_path != NULL) != 0) exit(EXIT_FAILURE);
        check_shape_flags(&model.config, &a, ckpt);
        if (!resume_path) { st.step = 0; st.pos = (DataPos){0, 0, 0}; st.rng = 0; st.seed = a.seed; }
        printf("loaded %s%s (step %d)\n", ckpt, resume_path ? " with optimizer state" : "", st.step);
    } else {
        MoEConfig c = a.model;
        if (c.V == 0) c.V = tk.ok ? tk.V : 4096;
        c.T = a.T;
        model_config_check(&c, "model flags");
        model_build(&model, &c);
        model_init_random(&model, a.seed, a.init_std);
    }
    if (st.rng == 0) st.rng = hash3(st.seed, 0x5A3, 0);
    dist_setup(&a, &model.config);
    // expert parallel: each rank keeps its experts; rank 0 keeps the whole model too, for evals and checkpoints
    Model whole, *em = &model;
    if (dist.ep > 1) {
        Model local;
        int El = model.config.E / dist.ep;
        model_shard(&local, &model, dist.ep_rank * El, El);
        if (dist.rank == 0) { whole = model; em = &whole; }
        else model_free(&model);
        model = local;
    }
    MoEConfig* c = &model.config;
    if (tk.ok && tk.V != c->V)
        fprintf(stderr, "warning: tokenizer '%s' has V=%d but the model has V=%d\n", a.tokenizer, tk.V, c->V);
    if (a.fwd_in) return run_forward_only(&model, &a);

    print_model_summary(c, em->num_params);
    int nthreads = 1;
#ifdef OMP
    nthreads = omp_get_max_threads();
#endif
    printf("train: B=%d T=%d grad_accum=%d steps=%d lr=%g warmup=%d min_lr=%g wd=%g clip=%g threads=%d\n",
           a.B, a.T, a.grad_accum, a.steps, a.lr, a.warmup, a.lr * a.min_lr_frac, a.weight_decay, a.grad_clip, nthreads);

    int nsets = 0;
    EvalSet* sets = evalsets_load(a.eval_files, c->V, a.T, &nsets);
    DataLoader train, val;
    if (!a.rl_file) {
        loader_init(&train, a.train_glob, "-i", a.B, a.T, c->V, a.shuffle, st.seed);
        loader_seek(&train, st.pos);
    }
    loader_init(&val, a.val_glob, "-j", a.B, a.T, c->V, 0, st.seed);
    int rl_rows = a.rl_file ? a.grpo.P * a.grpo.G / a.grpo.M : 0;
    int Bl = a.B / dist.world; // this rank's sequences of each global batch (all of them in one process)
    // (rank 0's model, or its whole model, also evaluates: on whole batches)
    model_alloc_acts(&model, dist.rank == 0 && dist.ep == 1 ? (a.B > rl_rows ? a.B : rl_rows) : Bl, a.T);
    if (em != &model) model_alloc_acts(em, a.B, a.T);
    FILE* logf = NULL;
    if (a.out_dir && dist.rank == 0) {
        mkdir_p(a.out_dir);
        char* lp = (char*)mallocCheck(strlen(a.out_dir) + 16);
        sprintf(lp, "%s/log.txt", a.out_dir);
        logf = fopenCheck(lp, "a"); // appends: an earlier run's log is never lost
        free(lp);
    }
    int eot = tk.ok ? tk.eot : 0;
    if (a.eval_only) {
        printf("val loss %.4f\n", eval_val_loss(&model, &val, a.val_batches));
        run_task_evals(&model, sets, nsets, &tk, eot, &a, logf, st.step);
        return 0;
    }
    if (a.rl_file) {
        int rc = run_grpo(&model, &a, &st, &tk, sets, nsets, &val, logf);
        if (logf) fclose(logf);
        for (int i = 0; i < nsets; i++) evalset_free(&sets[i]);
        free(sets);
        loader_free(&val);
        tokenizer_free(&tk);
        model_free(&model);
        free(resume_path);
        return rc;
    }
    double tokens_per_step = (double)a.B * a.T * a.grad_accum, profiled_ms = 0;
    int profiled = 0, first_step = st.step;
    float dl = 1.0f / (a.grad_accum * dist.world); // each micro-batch's share of the step's mean loss
    for (int step = st.step; step < a.steps; step++) {
        double t0 = now_ms();
        phase_clock.on = a.profile_every > 0; // training steps only, not the evals
        model_zero_grad(&model);
        double loss = 0, ce = 0, aux = 0, zl = 0;
        model.step = step + 1; // as the step line counts
        model.collective = 1;  // across processes every rank takes part in this forward and backward
        for (int micro = 0; micro < a.grad_accum; micro++) {
            loader_next_batch(&train);
            size_t mine = (size_t)dist.rank * Bl * a.T; // this rank's sequences of the batch
            model.fused_dloss = dl; // this forward also writes the classifier's dlogits
            model_forward(&model, train.inputs + mine, train.targets + mine, Bl, a.T);
            model.fused_dloss = 0.0f;
            model_backward(&model, dl);
            loss += model.loss; ce += model.ce;
            for (int l = 0; l < c->L; l++) { aux += model.aux[l] / c->L; zl += model.zl[l] / c->L; }
        }
        model.collective = 0;
        loss /= a.grad_accum; ce /= a.grad_accum; aux /= a.grad_accum; zl /= a.grad_accum;
        if (dist.world > 1) { // the sum of the ranks' gradients is the whole batch's; the logged terms their mean
            dist_allreduce_grads(&model);
            double terms[4] = {loss, ce, aux, zl};
            dist_mean(terms, 4);
            loss = terms[0]; ce = terms[1]; aux = terms[2]; zl = terms[3];
        }
        float norm = dist.ep > 1 ? dist_grad_norm(&model) : global_grad_norm(&model);
        float scale = (a.grad_clip > 0 && norm > a.grad_clip) ? a.grad_clip / norm : 1.0f;
        float lr = lr_schedule(step, a.steps, a.warmup, a.lr, a.lr * a.min_lr_frac);
        model_update(&model, lr, a.beta1, a.beta2, 1e-8f, a.weight_decay, step + 1, scale);
        phase_mark(PH_OPTIMIZER);
        phase_clock.on = 0;
        double ms = now_ms() - t0;
        printf("step %5d/%d | loss %.6f (ce %.4f aux %.4f z %.4f) | lr %.2e | norm %.4f | %.1f ms | %.0f tok/s\n",
               step + 1, a.steps, loss, ce, aux, zl, lr, norm, ms, tokens_per_step / (ms / 1e3));
        fflush(stdout);
        if (logf) fprintf(logf, "step %d loss %.6f ce %.6f aux %.6f z %.6f lr %.6e norm %.6f ms %.3f\n",
                          step + 1, loss, ce, aux, zl, lr, norm, ms);
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
        if (dist.ep > 1 && (val_now || sample_now || ckpt_now)) dist_gather_model(em, &model, ckpt_now);
        if (val_now) {
            if (dist.world > 1) { // the router's aux and z of the last micro-batch: their means over ranks
                double t[2];
                for (int l = 0; l < c->L; l++) {
                    t[0] = model.aux[l]; t[1] = model.zl[l];
                    dist_mean(t, 2);
                    model.aux[l] = (float)t[0]; model.zl[l] = (float)t[1];
                }
            }
            if (dist.rank == 0) { // across processes rank 0 evaluates alone, on the whole model
                print_router_stats(&model, logf, step + 1); // routing of the last training micro-batch
                float vl = eval_val_loss(em, &val, a.val_batches);
                printf("val loss %.4f\n", vl);
                if (logf) fprintf(logf, "step %d val %.6f\n", step + 1, vl);
                run_task_evals(em, sets, nsets, &tk, eot, &a, logf, step + 1);
            }
        }
        if (sample_now && dist.rank == 0) {
            printf("--- sample ---\n");
            generate(em, &tk, eot, a.gen_len, &st.rng);
            printf("--------------\n");
        }
        if (ckpt_now) {
            if (dist.world > 1) dist_check_replicas(&model);
            if (dist.rank == 0) {
                char* path = (char*)mallocCheck(strlen(a.out_dir) + 32);
                sprintf(path, "%s/model_%08d.bin", a.out_dir, step + 1);
                TrainState now = {step + 1, train.pos, st.rng, st.seed};
                checkpoint_save(em, path, 1, &now);
                printf("saved %s\n", path);
                free(path);
            }
        }
        if (val_now || sample_now || ckpt_now) dist_wait_all();
        if (logf) fflush(logf);
    }
    if (dist.ep > 1 && a.steps > first_step) { // the all-to-all traffic against its formula
        dist_mean(ep_sent, 2);
        double per = dist.world * 4.0 / (a.steps - first_step); // bytes per step, all ranks
        printf("all-to-all: %.0f bytes per step, all ranks, forward and backward (%.0f between ranks); "
               "formula 2*N*K*C*4 per layer forward: %.0f per step\n", ep_sent[0] * per, ep_sent[1] * per,
               2.0 * tokens_per_step * c->K * c->C * 4 * c->L);
    }
    if (logf) fclose(logf);
    for (int i = 0; i < nsets; i++) evalset_free(&sets[i]);
    free(sets);
    loader_free(&train);
    loader_free(&val);
    tokenizer_free(&tk);
    model_free(&model);
    if (em != &model) model_free(em);
    free(resume_path);
    dist_finalize();
    return 0;
}
#endif
