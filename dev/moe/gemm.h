/*
dev/moe/gemm.h: the fast matmul of train_moe.c. Every product of the model comes here.

Defines, and where train_moe.c calls it:
  gemm(c, a, b, M, N, K, sai, sak, sbk, sbj, accumulate)   c[M,N] (= or +=) A.B, strided operands as
                                        matmul_reference: matmul_forward/_backward
  gemm_grouped(problems, G, ...)        G independent products sharing the strides: the experts
  gemm_serial(..., mode, ...)           one product on the calling thread, skipping what a causal
                                        mask makes zero: attention_forward/_backward
With USE_BLAS=1 (make train_moe_blas) gemm and gemm_grouped hand each product to cblas_sgemm
(OpenBLAS). test_moe.c checks all three against matmul_reference; dev/bench_gemm.c times them.
*/
#ifdef USE_BLAS
#include <cblas.h>
#endif

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


// Attention per (batch, head) is a few small products, each on the micro-kernel by the thread that owns
// the head (gemm_serial), skipping what the causal mask makes zero:
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
