/*
The matrix products of one training step, on the model's own shapes: train_moe.c's built-in GEMM
against OpenBLAS's cblas_sgemm (what `make train_moe_blas` calls), with the same threads, in one
command. A benchmark, not a test: it says where each GEMM spends a step and how near the machine's
sgemm limit each gets on these shapes.

    make bench-gemm                                 (the E8 configuration of scripts/bench_cpu.py)
    OMP_NUM_THREADS=2 dev/bench_gemm L C E K F B T [repeats]
    OPENBLAS_CORETYPE=SkylakeX dev/bench_gemm ...   (OpenBLAS's AVX-512 kernels; read when it loads)

Every product of a step except attention's per-head ones: per layer the q, k, v and output
projections, the router and the experts (each expert given the balanced N*K/E rows, the experts of
a layer one grouped call as in the trainer, one cblas_sgemm per expert as in the BLAS build),
and the lm_head; each forward product with its two backward ones (input gradient, weight gradient),
with the operand layouts and accumulation the trainer uses. Before anything is timed the two sides'
results are compared (relative to the largest entry, at most 1e-4); then each product is timed
alternately, built-in then BLAS, `repeats` times (default 7), and the medians are reported;
repeats 0 stops after the check (`make test-blas` runs it so).
The first line is the 2048^3 product, through both, the same way.
*/
#define TESTING
#define MOE_LAYERS_ONLY // the layers, the model and AdamW of train_moe.c: nothing after them
#include "../train_moe.c"
#include <cblas.h>

typedef struct {
    const char* name;
    int count;              // times per step (L for a per-layer product)
    int G, M, N, K;         // G problems of M x N x K
    size_t sai, sak, sbk, sbj;
    int accumulate;
    float *a, *b, *c, *c2;  // G contiguous operands each; c2: the BLAS side's result
} Op;

// X(r,k) = x[r*sr + k*sk] as a row-major BLAS operand: x itself (sk == 1) or the transpose of x
static void blas_operand(size_t sr, size_t sk, CBLAS_TRANSPOSE* t, int* ld) {
    *t = sk == 1 ? CblasNoTrans : CblasTrans;
    *ld = (int)(sk == 1 ? sr : sk);
}

static void problems(const Op* o, float* c, GemmProblem* p) {
    for (int g = 0; g < o->G; g++)
        p[g] = (GemmProblem){c + (size_t)g * o->M * o->N, o->a + (size_t)g * o->M * o->K,
                             o->b + (size_t)g * o->K * o->N, o->M, o->N, o->K};
}

static void run_builtin(const Op* o, GemmProblem* p) {
    problems(o, o->c, p);
    gemm_grouped(p, o->G, o->sai, o->sak, o->sbk, o->sbj, o->accumulate);
}

static void run_blas(const Op* o, GemmProblem* p) {
    CBLAS_TRANSPOSE ta, tb;
    int lda, ldb;
    blas_operand(o->sai, o->sak, &ta, &lda);
    blas_operand(o->sbk, o->sbj, &tb, &ldb);
    problems(o, o->c2, p);
    for (int g = 0; g < o->G; g++)
        cblas_sgemm(CblasRowMajor, ta, tb, o->M, o->N, o->K, 1.0f, p[g].a, lda, p[g].b, ldb,
                    o->accumulate ? 1.0f : 0.0f, p[g].c, o->N);
}

// seconds per call: the call repeated until 0.05 s have passed
static double time_op(const Op* o, GemmProblem* p, int blas) {
    int n = 0;
    double t0 = now_ms() / 1e3, t;
    do {
        if (blas) run_blas(o, p); else run_builtin(o, p);
        n++;
        t = now_ms() / 1e3 - t0;
    } while (t < 0.05);
    return t / n;
}

static int cmp_double(const void* x, const void* y) {
    double a = *(const double*)x, b = *(const double*)y;
    return (a > b) - (a < b);
}
static double median(double* v, int n) {
    qsort(v, n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// op with strides for the layout; its operands filled with uniform [-1, 1)
static Op make_op(const char* name, int count, int G, int M, int N, int K,
                  size_t sai, size_t sak, size_t sbk, size_t sbj, int accumulate, uint64_t* rng) {
    Op o = {name, count, G, M, N, K, sai, sak, sbk, sbj, accumulate, NULL, NULL, NULL, NULL};
    size_t na = (size_t)G * M * K, nb = (size_t)G * K * N, nc = (size_t)G * M * N;
    o.a = (float*)mallocCheck(na * sizeof(float));
    o.b = (float*)mallocCheck(nb * sizeof(float));
    o.c = (float*)mallocCheck(nc * sizeof(float));
    o.c2 = (float*)mallocCheck(nc * sizeof(float));
    for (size_t i = 0; i < na; i++) o.a[i] = 2.0f * rng_f32(rng) - 1.0f;
    for (size_t i = 0; i < nb; i++) o.b[i] = 2.0f * rng_f32(rng) - 1.0f;
    return o;
}

// both sides from the same c (zero), then the largest difference relative to the largest entry
static double check_op(Op* o, GemmProblem* p) {
    size_t nc = (size_t)o->G * o->M * o->N;
    memset(o->c, 0, nc * sizeof(float));
    memset(o->c2, 0, nc * sizeof(float));
    run_builtin(o, p);
    run_blas(o, p);
    double dmax = 0.0, cmax = 0.0;
    for (size_t i = 0; i < nc; i++) {
        double d = fabs((double)o->c[i] - o->c2[i]), v = fabs((double)o->c2[i]);
        dmax = d > dmax ? d : dmax;
        cmax = v > cmax ? v : cmax;
    }
    return cmax > 0 ? dmax / cmax : dmax;
}

int main(int argc, char** argv) {
    // the E8 configuration of scripts/bench_cpu.py: L C E K F B T
    int L = 2, C = 256, E = 8, K = 2, F = 512, B = 16, T = 256, V = 4096, reps = 7;
    if (argc != 1 && argc != 8 && argc != 9) {
        fprintf(stderr, "usage: %s [L C E K F B T [repeats]]\n", argv[0]);
        return 2;
    }
    if (argc >= 8) {
        int* v[7] = {&L, &C, &E, &K, &F, &B, &T};
        for (int i = 0; i < 7; i++) *v[i] = atoi(argv[1 + i]);
        if (argc == 9) reps = atoi(argv[8]);
    }
    if (L < 1 || C < 1 || E < 1 || K < 1 || K > E || F < 1 || B < 1 || T < 1 || reps < 0 || reps > 101 ||
        (long)B * T * K % E != 0) {
        fprintf(stderr, "bench_gemm: need positive sizes, K <= E, B*T*K divisible by E, 0 <= repeats <= 101\n");
        return 2;
    }
    int N = B * T, m = N * K / E; // tokens; rows per expert, balanced
    int threads = 1;
#ifdef OMP
    threads = omp_get_max_threads();
#endif
    printf("bench_gemm: L=%d C=%d E=%d K=%d F=%d B=%d T=%d (N=%d tokens, %d rows per expert), %d thread(s), OpenBLAS %s\n",
           L, C, E, K, F, B, T, N, m, threads, openblas_get_corename());
    uint64_t rng = 1234;
    Op ops[32];
    int n = 0;
    // x.W^T (forward), dy.W (input grad), dy^T.x (weight grad): the strides of matmul_forward/_backward
#define LINEAR(nm, cnt, G, M_, IC, OC)                                                   \
    ops[n++] = make_op(nm " fwd", cnt, G, M_, OC, IC, IC, 1, 1, IC, 0, &rng);            \
    ops[n++] = make_op(nm " dinp", cnt, G, M_, IC, OC, OC, 1, IC, 1, 1, &rng);           \
    ops[n++] = make_op(nm " dW", cnt, G, OC, IC, M_, 1, OC, IC, 1, 1, &rng);
    LINEAR("qkv (3 products)", 3 * L, 1, N, C, C)
    LINEAR("attn out", L, 1, N, C, C)
    LINEAR("router", L, 1, N, C, E)
    LINEAR("experts w1,w3", L, 2 * E, m, C, F)
    LINEAR("experts w2", L, E, m, F, C)
    LINEAR("lm_head", 1, 1, N, C, V)
#undef LINEAR
    Op lim = make_op("2048^3", 1, 1, 2048, 2048, 2048, 2048, 1, 1, 2048, 0, &rng);
    GemmProblem* p = (GemmProblem*)mallocCheck(2 * (size_t)E * sizeof(GemmProblem));

    int bad = 0;
    for (int i = 0; i < n; i++) {
        double rel = check_op(&ops[i], p);
        if (!(rel <= 1e-4)) {
            printf("FAIL: %s: built-in and cblas_sgemm differ by %.3g of the largest entry\n", ops[i].name, rel);
            bad = 1;
        }
    }
    if (bad) return 1;
    printf("built-in and cblas_sgemm agree on all %d products (within 1e-4 of the largest entry)\n", n);
    if (reps == 0) return 0; // repeats 0: the check alone (make test-blas)

    double tb[101], tl[101];
    for (int r = 0; r < reps; r++) {
        tb[r] = time_op(&lim, p, 0);
        tl[r] = time_op(&lim, p, 1);
    }
    double flim = 2.0 * 2048 * 2048 * 2048;
    double gb = flim / median(tb, reps) / 1e9, gl = flim / median(tl, reps) / 1e9;
    double glim = gb > gl ? gb : gl;
    printf("2048^3: built-in %.1f GFLOP/s, cblas_sgemm %.1f GFLOP/s (median of %d)\n\n", gb, gl, reps);
    printf("%-24s %5s %22s | %9s %7s %5s | %9s %7s %5s | %s\n", "product", "count", "G x (M x N x K)",
           "built-in", "GF/s", "limit", "cblas", "GF/s", "limit", "built-in/cblas");
    double sum_b = 0, sum_l = 0, sum_f = 0;
    for (int i = 0; i < n; i++) {
        Op* o = &ops[i];
        for (int r = 0; r < reps; r++) {
            tb[r] = time_op(o, p, 0);
            tl[r] = time_op(o, p, 1);
        }
        double mb = median(tb, reps) * o->count, ml = median(tl, reps) * o->count;
        double fl = 2.0 * o->G * o->M * o->N * o->K * o->count;
        char shape[64];
        snprintf(shape, sizeof shape, "%d x (%d x %d x %d)", o->G, o->M, o->N, o->K);
        printf("%-24s %5d %22s | %6.2f ms %7.1f %4.0f%% | %6.2f ms %7.1f %4.0f%% | %.2fx\n", o->name, o->count, shape,
               mb * 1e3, fl / mb / 1e9, 100 * fl / mb / 1e9 / glim, ml * 1e3, fl / ml / 1e9, 100 * fl / ml / 1e9 / glim, ml / mb);
        sum_b += mb;
        sum_l += ml;
        sum_f += fl;
    }
    printf("%-24s %5s %22s | %6.1f ms %7.1f %4.0f%% | %6.1f ms %7.1f %4.0f%% | %.2fx\n", "step (these products)", "", "",
           sum_b * 1e3, sum_f / sum_b / 1e9, 100 * sum_f / sum_b / 1e9 / glim, sum_l * 1e3, sum_f / sum_l / 1e9,
           100 * sum_f / sum_l / 1e9 / glim, sum_l / sum_b);
    printf("(limit: the better of the two sides' 2048^3, %.1f GFLOP/s; %.1f GFLOP per step in these products)\n",
           glim, sum_f / 1e9);
    return 0;
}
