/*
Tests train_moe.c against the PyTorch reference (dev/moe_ref.py), then tests the trainer binary:
checkpoint round trips, exact resume, and the errors on bad input.
    make test          (regenerates dev/ref with the PyTorch script, then runs ./test_moe dev/ref)
    ./test_moe DIR [TRAINER]   (DIR holds manifest.txt and NAME_model.bin / NAME_debug.bin per
                               configuration; TRAINER is the train_moe binary to drive, ./train_moe)
Like llm.c's test_gpt2.c it reuses the program itself: nothing of the trainer is copied here.
*/
#define TESTING
#include "train_moe.c"
#include "dev/moe/testing.h"

static int n_pass = 0, n_fail = 0;
static const char* trainer = "./train_moe"; // the binary the trainer tests drive (argv[2])
#define CHECK(cond, ...) do { if (cond) n_pass++; else { n_fail++; printf("  FAIL: "); printf(__VA_ARGS__); printf("\n"); } } while (0)

// a reference configuration: its initial model and its debug state
static void load_reference(const char* dir, const char* name, Model* model, DebugState* d) {
    char path[1024];
    TrainState st;
    snprintf(path, sizeof path, "%s/%s_model.bin", dir, name);
    if (checkpoint_load(model, path, &st, 0) != 0) exit(EXIT_FAILURE);
    snprintf(path, sizeof path, "%s/%s_debug.bin", dir, name);
    if (debug_read(d, path, &model->config, model->num_params) != 0) exit(EXIT_FAILURE);
}

// one optimizer step on one batch, the way main() takes it (without accumulation); returns the norm
static float train_step(Model* model, const int* x, const int* y, int B, int T, int step, int steps, int warmup,
                        float lr, float min_lr, float b1, float b2, float eps, float wd, float clip) {
    model_zero_grad(model);
    model_forward(model, x, y, B, T);
    model_backward(model, 1.0f);
    float norm = global_grad_norm(model);
    float scale = (clip > 0 && norm > clip) ? clip / norm : 1.0f;
    model_update(model, lr_schedule(step, steps, warmup, lr, min_lr), b1, b2, eps, wd, step + 1, scale);
    return norm;
}

// every parameter gradient against the reference's, tensor by tensor: relative error (the norm of the
// difference over the norm of the reference) <= 1e-4. Returns the worst.
static float check_grads(const char* what, const Model* model, const float* ref) {
    size_t off = 0;
    float worst = 0.0f;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        size_t n = model->param_sizes[t];
        double dd = 0.0, rr = 0.0;
        for (size_t i = 0; i < n; i++) {
            double g = model->grads_memory[off + i], r = ref[off + i];
            dd += (g - r) * (g - r);
            rr += r * r;
        }
        float rel = rr > 0 ? (float)sqrt(dd / rr) : (float)sqrt(dd);
        worst = fmaxf(worst, rel);
        CHECK(rel <= 1e-4f, "[%s] grad %s relative error %.3e > 1e-4", what, param_names[t], rel);
        off += n;
    }
    return worst;
}

// ----------------------------------------------------------------------------
// 1. one configuration against its PyTorch debug state

static void test_reference(const char* dir, const char* name) {
    Model model;
    DebugState d;
    load_reference(dir, name, &model, &d);
    const MoEConfig* c = &model.config;
    int N = d.B * d.T, L = c->L, K = c->K, E = c->E;
    printf("[%s] V=%d L=%d C=%d H=%d Hkv=%d E=%d K=%d F=%d B=%d T=%d\n", name, c->V, L, c->C, c->H, c->Hkv, E, K, c->F, d.B, d.T);

    model_zero_grad(&model);
    model_forward(&model, d.x, d.y, d.B, d.T);
    float maxdiff = 0.0f;
    for (size_t i = 0; i < (size_t)N * c->V; i++) maxdiff = fmaxf(maxdiff, fabsf(model.logits[i] - d.logits[i]));
    CHECK(maxdiff <= 1e-4f, "[%s] logits max|diff| %.3e > 1e-4", name, maxdiff);
    float lossdiff = fabsf(model.ce - d.ce);
    for (int l = 0; l < L; l++) lossdiff = fmaxf(lossdiff, fmaxf(fabsf(model.aux[l] - d.aux[l]), fabsf(model.zl[l] - d.zl[l])));
    lossdiff = fmaxf(lossdiff, fabsf(model.loss - d.loss));
    CHECK(lossdiff <= 1e-5f, "[%s] loss terms (ce, aux_l, zl_l, loss) max|diff| %.3e > 1e-5", name, lossdiff);
    int expert_mismatch = 0, empty_experts = 0;
    for (int l = 0; l < L; l++)
        for (int s = 0; s < N * K; s++) expert_mismatch += model.topi[(size_t)l * N * K + s] != d.experts[(size_t)l * N * K + s];
    CHECK(expert_mismatch == 0, "[%s] %d chosen experts differ", name, expert_mismatch);
    printf("  logits max|diff| %.2e | loss terms max|diff| %.2e (ce %.6f loss %.6f) | experts differing %d\n",
           maxdiff, lossdiff, model.ce, model.loss, expert_mismatch);

    model_backward(&model, 1.0f);
    float worst = check_grads(name, &model, d.grads);
    // an expert that received no token gets exactly zero gradient
    for (int l = 0; l < L; l++)
        for (int e = 0; e < E; e++) {
            if (model.counts[(size_t)l * E + e] != 0) continue;
            empty_experts++;
            size_t o1 = ((size_t)l * E + e) * c->F * c->C;
            int nonzero = 0;
            for (size_t i = 0; i < (size_t)c->F * c->C; i++)
                nonzero += model.grads.w1[o1 + i] != 0.0f || model.grads.w3[o1 + i] != 0.0f || model.grads.w2[o1 + i] != 0.0f;
            CHECK(nonzero == 0, "[%s] layer %d expert %d got no token but %d nonzero gradients", name, l, e, nonzero);
        }
    printf("  worst gradient relative error %.2e over %d tensors | experts with no token: %d\n", worst, NUM_PARAM_TENSORS, empty_experts);

    // the AdamW trajectory on this batch
    float worst_loss = 0.0f, worst_norm = 0.0f;
    for (int s = 0; s < d.nsteps; s++) {
        float norm = train_step(&model, d.x, d.y, d.B, d.T, s, d.nsteps, d.warmup, d.lr, d.min_lr, d.beta1, d.beta2,
                                d.eps, d.weight_decay, d.grad_clip);
        worst_loss = fmaxf(worst_loss, fabsf(model.loss - d.losses[s]));
        worst_norm = fmaxf(worst_norm, fabsf(norm - d.norms[s]) / fmaxf(d.norms[s], 1e-12f));
    }
    CHECK(worst_loss <= 1e-4f, "[%s] %d-step AdamW loss trajectory max|diff| %.3e > 1e-4", name, d.nsteps, worst_loss);
    CHECK(worst_norm <= 1e-4f, "[%s] %d-step grad norms max relative diff %.3e > 1e-4", name, d.nsteps, worst_norm);
    printf("  %d AdamW steps: loss %.6f -> %.6f (ref %.6f), loss max|diff| %.2e, norm max rel diff %.2e\n",
           d.nsteps, d.losses[0], model.loss, d.losses[d.nsteps - 1], worst_loss, worst_norm);
    debug_free(&d);
    model_free(&model);
}

// ----------------------------------------------------------------------------
// 2. top-k ties: random references never tie, so hand-made logits check the rule
//    (largest first; equal logits: the lower expert index first)

// gemm and gemm_grouped against matmul_reference (a double-precision sum over k), on shapes that take every path of
// gemm_batch: ragged tiles and blocks, several KC slices of k with a ragged last one, A read in
// place or packed, the swapped (transposed) problem, accumulation, an empty sum, and block sizes
// shrunk for a batch with few tiles. Each entry within 1e-5 of the largest |entry| of its product.
static double gemm_worst(const GemmProblem* p, const float* c0, int accumulate,
                         size_t sai, size_t sak, size_t sbk, size_t sbj) {
    double worst = 0, scale = 1e-30;
    double* ref = (double*)mallocCheck(((size_t)p->M * p->N + 1) * sizeof(double));
    for (size_t i = 0; i < (size_t)p->M * p->N; i++) ref[i] = c0 ? c0[i] : 0.0;
    matmul_reference(ref, p->a, p->b, p->M, p->N, p->K, sai, sak, sbk, sbj, accumulate);
    for (size_t i = 0; i < (size_t)p->M * p->N; i++) {
        double d = fabs(ref[i] - p->c[i]);
        if (d > worst) worst = d;
        if (fabs(ref[i]) > scale) scale = fabs(ref[i]);
    }
    free(ref);
    return worst / scale;
}

static void test_gemm(void) {
    // M, N, K; then the layout: A k-contiguous (x.W^T's x) or row-contiguous (dy^T's), B likewise
    static const int shapes[][3] = {{37, 70, 600}, {300, 45, 513}, {8, 32, 256}, {129, 257, 77}, {5, 3, 1000}, {64, 640, 40}};
    uint64_t seed = 12345;
    for (int s = 0; s < (int)(sizeof shapes / sizeof shapes[0]); s++)
        for (int layout = 0; layout < 4; layout++)
            for (int accumulate = 0; accumulate < 2; accumulate++) {
                int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
                size_t sai = layout & 1 ? 1 : (size_t)K, sak = layout & 1 ? (size_t)M : 1;
                size_t sbk = layout & 2 ? 1 : (size_t)N, sbj = layout & 2 ? (size_t)K : 1;
                float* a = (float*)mallocCheck((size_t)M * K * sizeof(float));
                float* b = (float*)mallocCheck((size_t)K * N * sizeof(float));
                float* c = (float*)mallocCheck((size_t)M * N * sizeof(float));
                float* c0 = (float*)mallocCheck((size_t)M * N * sizeof(float));
                for (size_t i = 0; i < (size_t)M * K; i++) a[i] = rng_normal(&seed);
                for (size_t i = 0; i < (size_t)K * N; i++) b[i] = rng_normal(&seed);
                for (size_t i = 0; i < (size_t)M * N; i++) c[i] = c0[i] = rng_normal(&seed);
                gemm(c, a, b, M, N, K, sai, sak, sbk, sbj, accumulate);
                GemmProblem p = {c, a, b, M, N, K};
                double w = gemm_worst(&p, c0, accumulate, sai, sak, sbk, sbj);
                CHECK(w <= 1e-5, "gemm %dx%dx%d layout %d accumulate %d: error %.2e of the largest entry",
                      M, N, K, layout, accumulate, w);
                free(a); free(b); free(c); free(c0);
            }
    // a grouped product as the experts take it: the same N and K, rows per problem from 0 to 300
    // (one problem with no rows, one with K = 0 rows of its own: an empty sum writes zeros)
    const int G = 6, N = 96, K = 520, rows[6] = {300, 0, 7, 64, 129, 1};
    GemmProblem p[6];
    float* bufs[6][3];
    for (int g = 0; g < G; g++) {
        int M = rows[g], Kg = g == 4 ? 0 : K;
        bufs[g][0] = (float*)mallocCheck(((size_t)M * Kg + 1) * sizeof(float));
        bufs[g][1] = (float*)mallocCheck(((size_t)Kg * N + 1) * sizeof(float));
        bufs[g][2] = (float*)mallocCheck(((size_t)M * N + 1) * sizeof(float));
        for (size_t i = 0; i < (size_t)M * Kg; i++) bufs[g][0][i] = rng_normal(&seed);
        for (size_t i = 0; i < (size_t)Kg * N; i++) bufs[g][1][i] = rng_normal(&seed);
        for (size_t i = 0; i < (size_t)M * N; i++) bufs[g][2][i] = 7.0f; // overwritten (accumulate 0)
        p[g] = (GemmProblem){bufs[g][2], bufs[g][0], bufs[g][1], M, N, Kg};
    }
    // A(i,k) = a[i*K + k], B(k,j) = b[j*K + k] (x.W^T); K as the stride also for the K = 0 problem,
    // whose operands are never read
    gemm_grouped(p, G, K, 1, 1, K, 0);
    for (int g = 0; g < G; g++) {
        double w = 0;
        if (p[g].K == 0) {
            for (size_t i = 0; i < (size_t)p[g].M * N; i++) w = fmax(w, fabs(p[g].c[i]));
        } else w = gemm_worst(&p[g], NULL, 0, K, 1, 1, K);
        CHECK(w <= 1e-5, "gemm_grouped problem %d (%d rows, K %d): error %.2e", g, p[g].M, p[g].K, w);
        for (int i = 0; i < 3; i++) free(bufs[g][i]);
    }
}

static void test_topk_ties(void) {
    const float z[2 * 5] = {1, 3, 3, 0, 3,   2, 2, 2, 2, 2};
    const int want2[2 * 2] = {1, 2, 0, 1};
    const int want3[2 * 3] = {1, 2, 4, 0, 1, 2};
    int topi[6];
    float gate[6];
    topk_forward(topi, gate, z, 2, 5, 2);
    int ok = memcmp(topi, want2, sizeof want2) == 0 && fabsf(gate[0] - 0.5f) < 1e-7f;
    topk_forward(topi, gate, z, 2, 5, 3);
    ok = ok && memcmp(topi, want3, sizeof want3) == 0;
    CHECK(ok, "top-k on tied logits does not pick the lower expert index first");
    printf("[topk] ties go to the lower expert index: %s\n", ok ? "yes" : "NO");
}

// non-finite router logits: NaN counts as -inf (a real expert index is always chosen) and every
// token whose logits are not all finite is counted, for router_check's error
static void test_topk_nonfinite(void) {
    const float z[3 * 4] = {NAN, NAN, NAN, NAN,   1, NAN, 2, 0,   INFINITY, 0, -1, 3};
    int topi[3 * 2];
    float gate[3 * 2];
    int bad = topk_forward(topi, gate, z, 3, 4, 2);
    int in_range = 1;
    for (int i = 0; i < 6; i++) in_range &= topi[i] >= 0 && topi[i] < 4;
    int distinct = topi[0] != topi[1] && topi[2] != topi[3] && topi[4] != topi[5];
    CHECK(bad == 3 && in_range && distinct && topi[2] == 2 && topi[3] == 0 && topi[4] == 0,
          "top-k on non-finite logits: %d tokens flagged (want 3), indices %d %d | %d %d | %d %d", bad, topi[0], topi[1],
          topi[2], topi[3], topi[4], topi[5]);
    const float fine[4] = {0.5f, -2.0f, 1e30f, 3.0f};
    CHECK(topk_forward(topi, gate, fine, 1, 4, 2) == 0, "top-k flags finite logits as non-finite");
    printf("[topk] NaN/Inf router logits: %d of 3 tokens flagged, every index in range: %s\n", bad, in_range ? "yes" : "NO");
}

// a model may have a larger V than its tokenizer (the trainer warns): decoding and byte counts skip
// ids the tokenizer lacks instead of reading past its table (found by dev/fuzz/fuzz_tokenizer.c)
static void test_tokenizer_ids_beyond_v(void) {
    char a[] = "ab", b[] = "c", c[] = "\n";
    char* pieces[3] = {a, b, c};
    Tokenizer tk = {3, 2, pieces, 1};
    int ids[5] = {0, 7, -1, 1, 3};
    size_t cap = 2;
    char* text = (char*)mallocCheck(cap);
    tokens_text(&tk, ids, 5, &text, &cap);
    int y[4] = {0, 5, -1, 2};
    float losses[4] = {1, 1, 1, 1};
    double nll = 0;
    long ntok = 0, nbytes = 0;
    task_loss_add(y, losses, 4, &tk, &nll, &ntok, &nbytes);
    int ok = strcmp(text, "abc") == 0 && ntok == 3 && nbytes == 3;
    CHECK(ok, "ids beyond the tokenizer's V: text '%s' (want 'abc'), %ld tokens %ld bytes (want 3, 3)", text, ntok, nbytes);
    printf("[tokenizer] ids beyond its V are skipped when decoding and counting bytes: %s\n", ok ? "yes" : "NO");
    free(text);
}

// gradient accumulation: two micro-batches with dloss = 1/2 each add up to the gradient of their mean
// loss; on the same batch twice that is the single-batch gradient
static void test_grad_accumulation(const char* dir, const char* name) {
    Model model;
    DebugState d;
    load_reference(dir, name, &model, &d);
    model_zero_grad(&model);
    for (int micro = 0; micro < 2; micro++) {
        model_forward(&model, d.x, d.y, d.B, d.T);
        model_backward(&model, 0.5f);
    }
    double dd = 0.0, rr = 0.0;
    for (size_t i = 0; i < model.num_params; i++) {
        double g = model.grads_memory[i], r = d.grads[i];
        dd += (g - r) * (g - r);
        rr += r * r;
    }
    float rel = (float)sqrt(dd / rr);
    CHECK(rel <= 1e-4f, "[%s] 2 accumulated half-weighted micro-batches: gradient relative error %.3e > 1e-4", name, rel);
    printf("[%s] gradient accumulation (2 x dloss 1/2 == 1 x dloss 1): relative error %.2e\n", name, rel);
    debug_free(&d);
    model_free(&model);
}

// the training step's fused classifier (crossentropy_forward with dloss: the dlogits in the forward's
// pass) against the separate backward, and every gradient with 1 thread against 2 (the channel-split
// rmsnorm and embedding backward sum over tokens in order): both must be bit for bit the same
static void grads_of(Model* model, const DebugState* d, float fused, float* out, float* ce) {
    model_zero_grad(model);
    model->fused_dloss = fused;
    model_forward(model, d->x, d->y, d->B, d->T);
    model->fused_dloss = 0.0f;
    model_backward(model, 0.5f);
    memcpy(out, model->grads_memory, model->num_params * sizeof(float));
    *ce = model->ce;
}
static void test_fused_classifier(const char* dir, const char* name) {
    Model model;
    DebugState d;
    load_reference(dir, name, &model, &d);
    float* plain = (float*)mallocCheck(model.num_params * sizeof(float));
    float* other = (float*)mallocCheck(model.num_params * sizeof(float));
    float ce0, ce1;
    grads_of(&model, &d, 0.0f, plain, &ce0);
    grads_of(&model, &d, 0.5f, other, &ce1);
    int same = ce0 == ce1 && memcmp(plain, other, model.num_params * sizeof(float)) == 0;
    CHECK(same, "[%s] the fused classifier's gradients differ from the separate backward's", name);
    printf("[%s] fused cross-entropy forward+backward == separate backward, bit for bit: %s\n", name, same ? "yes" : "NO");
#ifdef OMP
    int nt = omp_get_max_threads();
    omp_set_num_threads(1);
    grads_of(&model, &d, 0.5f, other, &ce1);
    omp_set_num_threads(nt > 1 ? nt : 2);
    same = memcmp(plain, other, model.num_params * sizeof(float)) == 0;
    CHECK(same, "[%s] gradients with 1 thread differ from %d threads", name, nt > 1 ? nt : 2);
    printf("[%s] gradients with 1 thread == %d threads, bit for bit: %s\n", name, nt > 1 ? nt : 2, same ? "yes" : "NO");
    omp_set_num_threads(nt);
#endif
    free(plain);
    free(other);
    debug_free(&d);
    model_free(&model);
}

// GRPO against dev/moe_ref.py (NAME_grpo.bin): the advantages of the rollout batch's rewards, then per
// mini-batch update the loss, the number of clipped tokens and every gradient, each update followed by
// the AdamW step, so later mini-batches run with pi != pi_old
static void test_grpo(const char* dir, const char* name) {
    Model model;
    TrainState st;
    char path[1024];
    snprintf(path, sizeof path, "%s/%s_model.bin", dir, name);
    if (checkpoint_load(&model, path, &st, 0) != 0) exit(EXIT_FAILURE);
    snprintf(path, sizeof path, "%s/%s_grpo.bin", dir, name);
    GrpoRef ref;
    if (grpo_ref_read(&ref, path, model.config.T, model.num_params) != 0) {
        printf("  FAIL: [%s grpo] cannot read its GRPO reference (above)\n", name);
        n_fail++;
        model_free(&model);
        return;
    }
    GrpoConfig gc = ref.gc;
    Rollouts ro = ref.ro;
    int rows = ro.rows, T = ro.T, P = gc.P, G = gc.G, M = gc.M, mb = rows / M;
    const float* opt = ref.opt;
    const float* adv_ref = ref.adv_ref;
    size_t N = (size_t)rows * T, np = model.num_params;
    float* w = (float*)mallocCheck(N * sizeof(float));
    int flat = grpo_advantages(ro.reward, ro.adv, rows, G);
    float adv_diff = 0.0f;
    for (int r = 0; r < rows; r++) adv_diff = fmaxf(adv_diff, fabsf(ro.adv[r] - adv_ref[r]));
    CHECK(adv_diff <= 1e-6f, "[%s grpo] advantages max|diff| %.3e > 1e-6", name, adv_diff);
    model_alloc_acts(&model, mb, T);
    CHECK(opt[3] == 1e-8f, "[%s grpo] the reference's AdamW eps %g is not the trainer's 1e-8", name, opt[3]);
    printf("[%s grpo] P=%d G=%d M=%d agg %d kl %g clip %g temp %g router losses %s decay %s | zero-variance groups %d | "
           "advantages max|diff| %.1e\n", name, P, G, M, gc.agg, gc.kl, gc.clip, gc.temp, gc.router_losses ? "in" : "out",
           gc.decay_matrices_only ? "matrices" : "all", flat, adv_diff);
    for (int m = 0; m < M; m++) {
        const float* ref3 = ref.updates + (size_t)m * (GRPO_REF_STATS + np); // loss, clipped, norm, clamped
        const float* grads = ref3 + GRPO_REF_STATS;
        size_t o = (size_t)m * mb * T;
        GrpoStats gs = {0};
        model_zero_grad(&model);
        float loss = grpo_backward(&model, ro.x + o, ro.y + o, ro.adv + m * mb, ro.old_logp + o, ro.ref_logp + o, mb, T,
                                   &gc, w, &gs);
        char what[320];
        snprintf(what, sizeof what, "%s grpo update %d/%d", name, m + 1, M);
        CHECK(fabsf(loss - ref3[0]) <= 1e-5f * fmaxf(1.0f, fabsf(ref3[0])), "[%s] loss %.7f vs %.7f", what, loss, ref3[0]);
        CHECK(gs.clipped == (long)ref3[1], "[%s] %ld clipped tokens, the reference %d", what, gs.clipped, (int)ref3[1]);
        CHECK(gs.kl_clamped == (long)ref3[3], "[%s] %ld clamped KL tokens, the reference %d", what, gs.kl_clamped,
              (int)ref3[3]);
        float worst = check_grads(what, &model, grads);
        float norm = global_grad_norm(&model);
        CHECK(fabsf(norm - ref3[2]) <= 1e-4f * ref3[2], "[%s] grad norm %.6f vs %.6f", what, norm, ref3[2]);
        printf("  update %d/%d: loss %.6f (ref %.6f) | clipped tokens %ld (ref %d), clamped KL %ld (ref %d) of %ld | worst "
               "gradient relative error %.2e | norm %.5f (ref %.5f)\n", m + 1, M, loss, ref3[0], gs.clipped, (int)ref3[1],
               gs.kl_clamped, (int)ref3[3], gs.tokens, worst, norm, ref3[2]);
        float scale = (opt[5] > 0 && norm > opt[5]) ? opt[5] / norm : 1.0f;
        grpo_adamw(&model, opt[0], opt[1], opt[2], opt[4], gc.decay_matrices_only, m + 1, scale);
    }
    grpo_ref_free(&ref);
    free(w);
    model_free(&model);
}

// the sampler's log-probs of its tokens (pi_old in GRPO) == the training forward's log-probs of them, both
// at the sampling temperature
static void test_sampler_logp(const char* dir, const char* name, float temp) {
    Model model;
    DebugState d;
    load_reference(dir, name, &model, &d);
    int T = d.T, plen = 2, V = model.config.V;
    model_alloc_acts(&model, 1, T);
    Tokenizer none;
    memset(&none, 0, sizeof none);
    int resp[64];
    float logp[64];
    uint64_t rng = 12345;
    int n = sample_response(&model, d.x, plen, T - plen, -1, 0, &none, resp, logp, 1, temp, &rng);
    Rollouts ro;
    rollouts_alloc(&ro, 1, T);
    rollouts_set_row(&ro, 0, d.x, plen, resp, n, logp, V - 1);
    model_forward(&model, ro.x, ro.y, 1, T);
    grpo_temper(&model, ro.y, T, temp);
    float worst = 0.0f;
    int counted = 0;
    for (int t = 0; t < T; t++)
        if (ro.y[t] >= 0) { worst = fmaxf(worst, fabsf(-model.losses[t] - ro.old_logp[t])); counted++; }
    CHECK(counted == n && n == T - plen, "[%s] %d response tokens laid out as %d targets (want %d)", name, n, counted, T - plen);
    CHECK(worst <= 1e-5f, "[%s] sampler log-probs vs the training forward's at temperature %g: max|diff| %.3e > 1e-5",
          name, temp, worst);
    printf("[%s] sampled %d tokens at temperature %g: sampler log-probs == training forward's, max|diff| %.2e\n", name,
           n, temp, worst);
    rollouts_free(&ro);
    debug_free(&d);
    model_free(&model);
}

// greedy decoding with the KV cache == greedy decoding by a full forward over the whole sequence
static void test_kv_cache(const char* dir, const char* name) {
    Model model;
    DebugState d;
    load_reference(dir, name, &model, &d);
    model_alloc_acts(&model, 1, d.T);
    Tokenizer none;
    memset(&none, 0, sizeof none);
    int plen = 3, want = d.T - plen, out[64], seq[64];
    int n = generate_answer(&model, d.x, plen, want, -1, 0, &none, out, 0.0f, NULL);
    memcpy(seq, d.x, plen * sizeof(int));
    int same = n == want, V = model.config.V;
    for (int t = plen; t < plen + n; t++) { // the slow way: the whole sequence again for every token
        model_forward(&model, seq, NULL, 1, t);
        const float* l = model.logits + (size_t)(t - 1) * V;
        int best = 0;
        for (int i = 1; i < V; i++) if (l[i] > l[best]) best = i;
        seq[t] = best;
        same = same && best == out[t - plen];
    }
    CHECK(same, "[%s] greedy decoding with the KV cache differs from full recomputation", name);
    printf("[%s] greedy decoding of %d tokens with the KV cache == full recomputation: %s\n", name, n, same ? "yes" : "NO");
    debug_free(&d);
    model_free(&model);
}

// answers: extraction, matching against references, the majority vote of test-time compute
static void test_answers(void) {
    char buf[256];
    int ok = 1;
    extract_answer(" 7 * 6 = 42. The answer is 3. No: The answer is 1,234.\n", TASK_REASONING, buf);
    ok &= strcmp(buf, "1234") == 0 && answer_correct(buf, "1,234", TASK_REASONING);
    extract_answer(" It is 12.", TASK_REASONING, buf);
    ok &= buf[0] == 0 && !answer_correct(buf, "12", TASK_REASONING);
    extract_answer(" Taking Photographs \n", TASK_MEMORIZATION, buf);
    ok &= answer_correct(buf, "taking photographs", TASK_MEMORIZATION);
    ok &= answer_matches(" swiss\n", "SWITZERLAND\nswiss\nsuisse", TASK_MEMORIZATION);
    ok &= !answer_matches(" sweden\n", "SWITZERLAND\nswiss", TASK_MEMORIZATION);
    char a0[] = "5", a1[] = "", a2[] = "7", a3[] = "7", a4[] = "5";
    char* votes[5] = {a0, a1, a2, a3, a4};
    ok &= majority_index(votes, 1) == 0 && majority_index(votes, 3) == 0 && majority_index(votes, 4) == 2 &&
          majority_index(votes, 5) == 0 && majority_index(votes + 1, 1) == -1;
    CHECK(ok, "answer extraction, matching or the majority vote is wrong");
    printf("[eval] answer extraction, reference matching and majority vote: %s\n", ok ? "yes" : "NO");
}

// ----------------------------------------------------------------------------
// 2b. checkpoint save -> load -> the same next step, bit for bit

static void test_checkpoint_roundtrip(const char* dir, const char* name, const char* tmpdir) {
    char ck[1024];
    Model a, b;
    DebugState d;
    load_reference(dir, name, &a, &d);
    for (int s = 0; s < 3; s++)
        train_step(&a, d.x, d.y, d.B, d.T, s, 10, 2, 1e-3f, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f);
    TrainState now = {3, {1, 2, 3}, 0x123456789abcdefull, 42};
    snprintf(ck, sizeof ck, "%s/roundtrip.bin", tmpdir);
    checkpoint_save(&a, ck, 1, &now);
    TrainState back;
    if (checkpoint_load(&b, ck, &back, 1) != 0) exit(EXIT_FAILURE);
    CHECK(back.step == 3 && back.pos.epoch == 1 && back.pos.shard == 2 && back.pos.sample == 3 &&
          back.rng == now.rng && back.seed == 42, "[%s] train state did not survive the checkpoint", name);
    train_step(&a, d.x, d.y, d.B, d.T, 3, 10, 2, 1e-3f, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f);
    train_step(&b, d.x, d.y, d.B, d.T, 3, 10, 2, 1e-3f, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f);
    int same = memcmp(a.params_memory, b.params_memory, a.num_params * sizeof(float)) == 0 &&
               memcmp(a.m_memory, b.m_memory, a.num_params * sizeof(float)) == 0 &&
               memcmp(a.v_memory, b.v_memory, a.num_params * sizeof(float)) == 0 && a.loss == b.loss;
    CHECK(same, "[%s] save -> load -> next step differs from the uninterrupted step", name);
    printf("[%s] checkpoint save -> load -> next step identical: %s\n", name, same ? "yes" : "NO");
    remove(ck);
    debug_free(&d);
    model_free(&a);
    model_free(&b);
}

// ----------------------------------------------------------------------------
// 3. the trainer binary: exact resume, the uint32 shard layout, and bad input

static void copy_file(const char* src, const char* dst) {
    FILE* in = fopenCheck(src, "rb");
    FILE* out = fopenCheck(dst, "wb");
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) fwrite(buf, 1, n, out);
    fclose(in);
    fclose(out);
}

static void expect_error(const char* what, const char* args, const char* needle, const char* keep) {
    char cmd[8192];
    char* out;
    snprintf(cmd, sizeof cmd, "%s %s", trainer, args);
    int rc = run_cmd(cmd, &out);
    int named = strstr(out, needle) != NULL;
    CHECK(rc != 0 && rc != 255 && named, "bad input '%s': exit %d, message %s '%s'; output:\n%s", what, rc,
          named ? "has" : "lacks", needle, out);
    char backup[1100];
    snprintf(backup, sizeof backup, "%s.orig", keep);
    CHECK(files_equal(keep, backup), "bad input '%s' changed the earlier checkpoint %s", what, keep);
    const char* msg = strstr(out, "Error:");
    msg = msg ? msg : out;
    const char* nl = strchr(msg, '\n');
    printf("  %-28s exit %d: %.*s\n", what, rc, nl ? (int)(nl - msg) : (int)strlen(msg), msg);
    free(out);
}

static void test_trainer_binary(const char* tmp) {
    char cmd[8192], a8[1024], b8[1024], b4[1024], train[1024], val[1024], train32[1024], path[1024];
    char* out;
    // a small learnable corpus
    int n = 12000;
    int* toks = (int*)mallocCheck(n * sizeof(int));
    uint64_t rng = 7;
    for (int i = 0; i < n; i++) toks[i] = (i % 41 == 0) ? (int)(rng_u64(&rng) % 200) : (toks[i ? i - 1 : 0] * 7 + 3) % 200;
    snprintf(train, sizeof train, "%s/tr_000.bin", tmp);
    snprintf(train32, sizeof train32, "%s/tr32_000.bin", tmp);
    snprintf(val, sizeof val, "%s/va_000.bin", tmp);
    write_shard(train, toks, n, 0);
    write_shard(train32, toks, n, 1);
    write_shard(val, toks, 3000, 0);
    const char* common = "-nv 200 -nl 2 -nc 32 -nh 4 -nkv 2 -ne 4 -nk 2 -nf 48 -b 4 -t 32 -x 8 -u 2 -l 3e-3 -v 4 -m 2 -s 4 -g 8 -k none";
    // straight 8 steps vs 4 + resume + 4
    snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s' %s -o %s/runs/straight", trainer, train, val, common, tmp); // -o makes missing parents
    int rc1 = run_cmd(cmd, &out); free(out);
    snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s' %s -n 4 -o %s/resumed", trainer, train, val, common, tmp);
    int rc2 = run_cmd(cmd, &out); free(out);
    snprintf(b8, sizeof b8, "%s/resumed/model_00000008.bin", tmp);
    snprintf(b4, sizeof b4, "%s/resumed/model_00000004.bin", tmp);
    remove(b8); // as if the run had died after step 4
    snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s' %s -n 4 -o %s/resumed -y 1", trainer, train, val, common, tmp);
    int rc3 = run_cmd(cmd, &out);
    int resumed_from_4 = strstr(out, "model_00000004.bin") != NULL;
    free(out);
    snprintf(a8, sizeof a8, "%s/runs/straight/model_00000008.bin", tmp);
    int same = rc1 == 0 && rc2 == 0 && rc3 == 0 && resumed_from_4 && files_equal(a8, b8);
    CHECK(same, "8 steps straight != 4 + resume + 4 (exit codes %d %d %d, resumed from step 4: %d)", rc1, rc2, rc3, resumed_from_4);
    printf("[trainer] 8 steps straight == 4 + resume + 4, bit for bit (weights, AdamW, data position, RNG): %s\n", same ? "yes" : "NO");
    // the uint32 shard layout trains to the same bits
    snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s' %s -o %s/u32", trainer, train32, val, common, tmp);
    int rc4 = run_cmd(cmd, &out); free(out);
    snprintf(path, sizeof path, "%s/u32/model_00000008.bin", tmp);
    same = rc4 == 0 && files_equal(a8, path);
    CHECK(same, "uint32 shards (magic %d) do not train like the same uint16 shards", SHARD_MAGIC_U32);
    printf("[trainer] uint32 shards train to the same bits as uint16 shards: %s\n", same ? "yes" : "NO");

    // -pf: the phase table every 4 steps (its rows, and shares that add up to the step)
    snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s' %s -pf 4", trainer, train, val, common);
    int rc6 = run_cmd(cmd, &out);
    int tables = 0, rows = 0;
    double share = 0;
    for (char* q = strstr(out, "phases (ms per step"); q; q = strstr(q + 1, "phases (ms per step")) tables++;
    char* first = strstr(out, "phases (ms per step");
    for (char* line = first ? strchr(first, '\n') : NULL; line && rows < NUM_PHASES + 1; line = strchr(line + 1, '\n')) {
        double ms, pct; // a row: name (no digits), ms, share%
        if (sscanf(line + 1, " %*[^0-9\n]%lf %lf%%", &ms, &pct) != 2) break;
        share += pct;
        rows++;
    }
    int ok = rc6 == 0 && tables == 2 && rows == NUM_PHASES + 1 && fabs(share - 100.0) < 0.5;
    CHECK(ok, "-pf 4 over 8 steps: exit %d, %d tables (want 2), %d rows (want %d), shares add to %.2f%%:\n%s", rc6, tables,
          rows, NUM_PHASES + 1, share, out);
    printf("[trainer] -pf 4: %d phase tables of %d rows, shares adding to %.1f%%\n", tables, rows, share);
    free(out);

    // bad input: each exits non-zero naming the problem, and the checkpoint in -o stays intact
    char keep[1024], backup[1100], bad[1024], args[6144];
    snprintf(keep, sizeof keep, "%s/resumed/model_00000004.bin", tmp);
    snprintf(backup, sizeof backup, "%s.orig", keep);
    if (access(keep, R_OK) != 0) { CHECK(0, "the trainer wrote no checkpoint %s: bad-input tests not run", keep); free(toks); return; }
    copy_file(keep, backup);
    printf("[trainer] bad input:\n");
    char base[2048];
    snprintf(base, sizeof base, "-j '%s' %s -o %s/resumed", val, common, tmp);
    // shards
    snprintf(bad, sizeof bad, "%s/badmagic.bin", tmp);
    copy_file(train, bad);
    { FILE* fp = fopenCheck(bad, "r+b"); int m = 1234; fwrite(&m, 4, 1, fp); fclose(fp); }
    snprintf(args, sizeof args, "-i %s %s", bad, base);
    expect_error("shard with a bad magic", args, "badmagic.bin' is not a token shard", keep);
    snprintf(bad, sizeof bad, "%s/truncated.bin", tmp);
    write_shard(bad, toks, n, 0);
    if (truncate(bad, 1024 + 2 * (n / 2)) != 0) printf("  (truncate failed)\n");
    snprintf(args, sizeof args, "-i %s %s", bad, base);
    expect_error("truncated shard", args, "truncated.bin' is", keep);
    snprintf(bad, sizeof bad, "%s/bigtoken.bin", tmp);
    toks[777] = 250;
    write_shard(bad, toks, n, 0);
    toks[777] = 1;
    snprintf(args, sizeof args, "-i %s %s", bad, base);
    expect_error("token id >= V", args, "token 777 is id 250, outside the vocabulary (V=200)", keep);
    snprintf(args, sizeof args, "-i '%s/nothing_here_*.bin' %s", tmp, base);
    expect_error("missing shard", args, "no data shard matches -i", keep);
    // checkpoints
    snprintf(bad, sizeof bad, "%s/trunc_ckpt.bin", tmp);
    copy_file(keep, bad);
    if (truncate(bad, 5000) != 0) printf("  (truncate failed)\n");
    snprintf(args, sizeof args, "-i %s -e %s %s", train, bad, base);
    expect_error("truncated checkpoint", args, "trunc_ckpt.bin' is 5000 bytes but its header needs", keep);
    snprintf(bad, sizeof bad, "%s/mismatch_ckpt.bin", tmp);
    copy_file(keep, bad);
    { FILE* fp = fopenCheck(bad, "r+b"); int e = 8; fseek(fp, 8 * 4, SEEK_SET); fwrite(&e, 4, 1, fp); fclose(fp); }
    snprintf(args, sizeof args, "-i %s -e %s %s", train, bad, base);
    expect_error("checkpoint header mismatch", args, "mismatch_ckpt.bin' header is inconsistent", keep);
    snprintf(args, sizeof args, "-i %s -e %s %s -ne 8", train, keep, base);
    expect_error("checkpoint vs -ne flag", args, "has -ne 4 but -ne 8 was given", keep);
    snprintf(args, sizeof args, "-i %s -e %s/missing_ckpt.bin %s", train, tmp, base);
    expect_error("missing checkpoint", args, "cannot open", keep);
    // impossible shapes
    snprintf(args, sizeof args, "-i %s %s -nk 5", train, base);
    expect_error("K > E", args, "K=5 experts per token exceeds E=4", keep);
    snprintf(args, sizeof args, "-i %s %s -nc 30", train, base);
    expect_error("C not divisible by H", args, "C=30 is not divisible by H=4", keep);
    snprintf(args, sizeof args, "-i %s %s -nkv 3", train, base);
    expect_error("H not divisible by Hkv", args, "H=4 is not divisible by Hkv=3", keep);
    snprintf(args, sizeof args, "-i %s %s -nc 12", train, base);
    expect_error("odd head size", args, "head size D=C/H=3 must be even", keep);
    // eval files: one that disagrees with its header, and a prompt longer than T
    {
        int h[256] = {0};
        int item[2 + 5] = {4, 1, 1, 2, 3, 4, 5}; // prompt 1 2 3 4, answer 5
        int rl = 1;
        h[0] = 20251125; h[1] = 1; h[2] = 1; h[3] = 4; h[4] = 1; h[5] = 1; h[6] = 200; h[7] = 0; h[8] = 1; h[9] = 4; h[10] = 1; h[11] = 1;
        snprintf(bad, sizeof bad, "%s/good_eval.bin", tmp);
        FILE* fp = fopenCheck(bad, "wb");
        fwrite(h, 4, 256, fp); fwrite(item, 4, 7, fp); fwrite(&rl, 4, 1, fp); fwrite("5", 1, 1, fp);
        fclose(fp);
        snprintf(args, sizeof args, "-i %s %s -ev %s -t 3", train, base, bad);
        expect_error("eval prompt longer than T", args, "good_eval.bin' item 0: prompt of 4 tokens is longer than the sequence length T=3", keep);
        snprintf(args, sizeof args, "-i %s %s -ev %s:loss -t 3", train, base, bad); // loss only: such items are left out
        expect_error("loss-only eval file with no prompt that fits", args, "good_eval.bin': no prompt fits in T=3", keep);
        h[10] = 2; // the header now promises a second answer token
        snprintf(bad, sizeof bad, "%s/bad_eval.bin", tmp);
        fp = fopenCheck(bad, "wb");
        fwrite(h, 4, 256, fp); fwrite(item, 4, 7, fp); fwrite(&rl, 4, 1, fp); fwrite("5", 1, 1, fp);
        fclose(fp);
        snprintf(args, sizeof args, "-i %s %s -ev %s", train, base, bad);
        expect_error("eval file vs its header", args, "bad_eval.bin': its size does not match its header", keep);
    }
    // a corrupt newest checkpoint stops a resume (and is not silently skipped)
    snprintf(bad, sizeof bad, "%s/resumed/model_00000099.bin", tmp);
    copy_file(keep, bad);
    if (truncate(bad, 3000) != 0) printf("  (truncate failed)\n");
    snprintf(args, sizeof args, "-i %s %s -y 1", train, base);
    expect_error("corrupt newest checkpoint", args, "model_00000099.bin' is 3000 bytes", keep);
    remove(bad);
    // a checkpoint whose body holds a NaN: refused, naming the tensor
    Model mk;
    TrainState sk;
    if (checkpoint_load(&mk, keep, &sk, 1) != 0) exit(EXIT_FAILURE);
    snprintf(bad, sizeof bad, "%s/nan_ckpt.bin", tmp);
    mk.params.w2[5] = NAN;
    checkpoint_save(&mk, bad, 1, &sk);
    snprintf(args, sizeof args, "-i %s -e %s %s", train, bad, base);
    expect_error("NaN in a checkpoint body", args, "nan_ckpt.bin' holds parameter nan in tensor w2 (element 5)", keep);
    mk.params.w2[5] = 0.0f;
    // finite weights whose router logits overflow: the run stops naming step and layer
    size_t per_layer = (size_t)mk.config.E * mk.config.C;
    for (size_t i = 0; i < per_layer; i++) mk.params.wr[per_layer + i] = 3e38f; // layer 1 of 2
    snprintf(bad, sizeof bad, "%s/inf_router.bin", tmp);
    checkpoint_save(&mk, bad, 1, &sk);
    snprintf(args, sizeof args, "-i %s -e %s %s", train, bad, base);
    expect_error("overflowing router logits", args, "step 1, layer 1: non-finite router logits (NaN or Inf)", keep);
    model_free(&mk);
    // a tokenizer file that is cut short, and impossible loss coefficients
    snprintf(bad, sizeof bad, "%s/tok_short.bin", tmp);
    {
        uint32_t th[256] = {20240328, 2, 200, 199};
        FILE* fp = fopenCheck(bad, "wb");
        fwrite(th, 4, 256, fp);
        for (int i = 0; i < 150; i++) { unsigned char len = 1; fwrite(&len, 1, 1, fp); fputc('a' + i % 26, fp); }
        fclose(fp);
    }
    snprintf(args, sizeof args, "-i %s %s -k %s", train, base, bad);
    expect_error("truncated tokenizer", args, "tok_short.bin' is truncated", keep);
    snprintf(args, sizeof args, "-i %s %s -ac -0.5", train, base);
    expect_error("negative aux coefficient", args, "aux and z loss coefficients must be finite and >= 0", keep);
    snprintf(args, sizeof args, "-i %s %s -pf -1", train, base);
    expect_error("negative -pf", args, "-pf (profile every N steps) must be >= 0", keep);
    // a checkpoint write killed before its rename leaves NAME.tmp: resume removes it, names it, and
    // resumes from the newest complete checkpoint, to the same bits as the straight run
    char stale[512], done8[1100];
    snprintf(stale, sizeof stale, "%s/stale", tmp);
    mkdir(stale, 0755);
    snprintf(path, sizeof path, "%s/model_00000004.bin", stale);
    copy_file(keep, path);
    snprintf(bad, sizeof bad, "%s/model_00000006.bin.tmp", stale);
    copy_file(keep, bad);
    if (truncate(bad, 2000) != 0) printf("  (truncate failed)\n");
    snprintf(cmd, sizeof cmd, "%s -i '%s' -j '%s' %s -n 4 -o %s -y 1", trainer, train, val, common, stale);
    int rc5 = run_cmd(cmd, &out);
    int named = strstr(out, "model_00000006.bin.tmp', left by a checkpoint write that did not finish") != NULL &&
                strstr(out, "model_00000004.bin with optimizer state") != NULL;
    snprintf(done8, sizeof done8, "%s/model_00000008.bin", stale);
    same = rc5 == 0 && named && access(bad, F_OK) != 0 && files_equal(a8, done8);
    CHECK(same, "resume beside a stale .tmp: exit %d, named %d, .tmp still there %d, final == straight %d:\n%s", rc5,
          named, access(bad, F_OK) == 0, files_equal(a8, done8), out);
    printf("[trainer] resume removes a partial model_*.bin.tmp, names it, and ends equal to the straight run: %s\n",
           same ? "yes" : "NO");
    free(out);
    free(toks);
}

// 4. the trainer's GRPO mode (-rl): exact resume, and the errors on bad flags and files. Starts from
//    the 8-step checkpoint of test_trainer_binary; the prompts are an eval file written here.
static void write_prompts(const char* path, const char* ref, int kind) {
    EvalSet es;
    memset(&es, 0, sizeof es);
    strcpy(es.name, "rl_test");
    es.n = 8; es.kind = kind;
    int plen[8], alen[8], buf[8][5];
    int* toks[8];
    char* refs[8];
    for (int i = 0; i < 8; i++) {
        plen[i] = 3; alen[i] = 2;
        for (int j = 0; j < 5; j++) buf[i][j] = (i * 17 + j * 7) % 200;
        toks[i] = buf[i];
        refs[i] = (char*)ref;
    }
    es.plen = plen; es.alen = alen; es.toks = toks; es.ref = refs;
    write_eval(path, &es, 200);
}

// a log's per-item lines ("step S items NAME 0110...") against its task lines' accuracy and item count:
// returns how many items lines agree (-1 if one disagrees or none is there)
static int check_item_lines(const char* log_path) {
    FILE* fp = fopen(log_path, "r");
    if (!fp) return -1;
    char line[8192], name[128], bits[4096];
    int step, n = 0, ok = 1, agree = 0;
    double acc = -1.0;
    while (fgets(line, sizeof line, fp)) {
        if (sscanf(line, "step %d task %127s %*s %*s %*s %*s acc %lf n %d", &step, name, &acc, &n) == 4) continue;
        if (sscanf(line, "step %d items %127s %4095s", &step, name, bits) != 3) continue;
        int ones = 0, len = (int)strlen(bits);
        for (int i = 0; i < len; i++) ones += bits[i] == '1';
        ok &= len == n && fabs((double)ones / len - acc) < 1e-6;
        agree++;
    }
    fclose(fp);
    return ok && agree ? agree : -1;
}

static void test_grpo_binary(const char* tmp) {
    char cmd[16384], start[1024], prompts[1024], blank[1024], a4[1024], b4[1024], b2[1024], args[12288], other[1024];
    char* out;
    snprintf(start, sizeof start, "%s/runs/straight/model_00000008.bin", tmp);
    if (access(start, R_OK) != 0) { CHECK(0, "no starting checkpoint %s: GRPO trainer tests not run", start); return; }
    snprintf(prompts, sizeof prompts, "%s/rl_prompts.bin", tmp);
    snprintf(blank, sizeof blank, "%s/rl_blank.bin", tmp);
    write_prompts(prompts, "7", TASK_MEMORIZATION);
    write_prompts(blank, " \n ", TASK_MEMORIZATION);
    char common[6144];
    snprintf(common, sizeof common, "-e %s -rl %s -j %s/va_000.bin -k none -t 32 -rp 4 -rg 3 -rm 2 -rr 12 -rt 1.0 -rk 0.05 "
             "-l 1e-3 -x 4 -v 2 -m 1 -s 0 -ev %s -ea 4", start, prompts, tmp, prompts);
    snprintf(cmd, sizeof cmd, "%s %s -o %s/rl_straight", trainer, common, tmp);
    int rc1 = run_cmd(cmd, &out);
    int lines = 0;
    for (char* q = strstr(out, "rl step"); q; q = strstr(q + 1, "rl step")) lines++;
    CHECK(rc1 == 0 && lines == 4 && strstr(out, "task rl_test") != NULL,
          "GRPO run: exit %d, %d 'rl step' lines (want 4), held-out eval line %s:\n%s", rc1, lines,
          strstr(out, "task rl_test") ? "present" : "missing", out);
    free(out);
    char logp[1100];
    snprintf(logp, sizeof logp, "%s/rl_straight/log.txt", tmp);
    int items_lines = check_item_lines(logp);
    CHECK(items_lines == 3, "[trainer] %s: %d per-item lines agreeing with the task lines' accuracy (want 3: steps 0, 2, 4)",
          logp, items_lines);
    printf("[trainer] per-item eval lines (step S items NAME 0110...): %d, each agreeing with its task line's accuracy\n",
           items_lines);
    snprintf(cmd, sizeof cmd, "%s %s -n 2 -o %s/rl_resumed", trainer, common, tmp);
    int rc2 = run_cmd(cmd, &out); free(out);
    snprintf(b4, sizeof b4, "%s/rl_resumed/model_00000004.bin", tmp);
    snprintf(b2, sizeof b2, "%s/rl_resumed/model_00000002.bin", tmp);
    remove(b4);
    snprintf(cmd, sizeof cmd, "%s %s -n 2 -o %s/rl_resumed -y 1", trainer, common, tmp);
    int rc3 = run_cmd(cmd, &out);
    int from2 = strstr(out, "model_00000002.bin") != NULL;
    free(out);
    snprintf(a4, sizeof a4, "%s/rl_straight/model_00000004.bin", tmp);
    int same = rc2 == 0 && rc3 == 0 && from2 && files_equal(a4, b4);
    CHECK(same, "GRPO: 4 RL steps straight != 2 + resume + 2 (exit codes %d %d, resumed from step 2: %d)", rc2, rc3, from2);
    printf("[trainer] GRPO: 4 RL steps straight == 2 + resume + 2, bit for bit (policy, AdamW, prompt order, sampler RNG): %s\n",
           same ? "yes" : "NO");
    // bad input: a clear error, a non-zero exit, and the RL checkpoint in -o untouched
    char backup[1100];
    snprintf(backup, sizeof backup, "%s.orig", b2);
    copy_file(b2, backup);
    printf("[trainer] GRPO bad input:\n");
    char base[4096];
    snprintf(base, sizeof base, "-j %s/va_000.bin -k none -t 32 -rp 4 -rg 3 -rm 2 -rr 12 -x 4 -v 0 -s 0 -o %s/rl_resumed", tmp, tmp);
    snprintf(args, sizeof args, "-rl %s %s", prompts, base);
    expect_error("-rl without -e", args, "-rl needs -e", b2);
    snprintf(args, sizeof args, "-e %s -rl %s %s -rg 1", start, prompts, base);
    expect_error("-rg 1", args, "-rg (samples per prompt) must be >= 2", b2);
    snprintf(args, sizeof args, "-e %s -rl %s %s -rm 3", start, prompts, base);
    expect_error("-rm not dividing -rp", args, "-rm (mini-batches) must be positive and divide -rp", b2);
    snprintf(args, sizeof args, "-e %s -rl %s %s -rr 30", start, prompts, base);
    expect_error("prompt + R > T", args, "+ -rr R=30 exceeds -t T=32", b2);
    snprintf(args, sizeof args, "-e %s -rl %s %s", start, blank, base);
    expect_error("prompts without answers", args, "rl_blank.bin' (flag -rl) item 0 has no reference answer", b2);
    // a reference (-e) of another shape than the checkpoint being resumed
    snprintf(cmd, sizeof cmd, "%s -i %s/tr_000.bin -j %s/va_000.bin -nv 200 -nl 1 -nc 16 -nh 2 -ne 2 -nk 1 -nf 16 -b 2 -t 32 "
             "-x 1 -v 0 -s 0 -k none -o %s/other", trainer, tmp, tmp, tmp);
    int rc4 = run_cmd(cmd, &out); free(out);
    snprintf(other, sizeof other, "%s/other/model_00000001.bin", tmp);
    CHECK(rc4 == 0, "could not train the other-shape checkpoint %s", other);
    snprintf(args, sizeof args, "-e %s -rl %s %s -y 1", other, prompts, base);
    expect_error("reference of another shape", args, "other/model_00000001.bin' (flag -e) has another shape", b2);
}

// an eval set of two prompts of plen tokens cut from the debug batch's tokens x (at offsets 0 and 1), a
// reasoning task (no stop at newlines) with answers "1" and "2"; its arrays live in *two
typedef struct { int pl[2], al[2]; int* toks[2]; char* refs[2]; } TwoPrompts;
static EvalSet two_prompts(TwoPrompts* two, const char* name, int* x, int plen, int max_answer) {
    EvalSet es;
    memset(&es, 0, sizeof es);
    snprintf(es.name, sizeof es.name, "%s", name);
    for (int i = 0; i < 2; i++) { two->pl[i] = plen; two->al[i] = 1; two->toks[i] = x + i; }
    two->refs[0] = (char*)"1";
    two->refs[1] = (char*)"2";
    es.n = 2; es.kind = TASK_REASONING; es.max_prompt = plen; es.max_answer = max_answer;
    es.plen = two->pl; es.alen = two->al; es.toks = two->toks; es.ref = two->refs;
    return es;
}

// GRPO's rollout streams, the scheme train_moe.cu's grpo_rollouts follows on the GPU so that the same
// checkpoint and seed give the same rollouts there: row r of a rollout batch samples from its own
// stream hash3(seed, r, 0x7011), so its tokens and log-probs are those of sample_response run alone on
// that stream, with one decoder thread or several; another seed gives other rollouts
static void test_rollout_streams(const char* dir, const char* name) {
    Model model;
    DebugState d;
    load_reference(dir, name, &model, &d);
    int T = d.T, V = model.config.V, eot = V - 1, plen = 2;
    GrpoConfig gc = {2, 3, T - plen, 1, AGG_TOKEN_MEAN, 1.0f, 0.2f, 0.0f, 0, 0}; // P G R M agg temp clip kl ..
    int rows = gc.P * gc.G, items[2] = {0, 1};
    TwoPrompts two;
    EvalSet es = two_prompts(&two, "streams", d.x, plen, gc.R);
    int** toks = two.toks;
    Tokenizer tk; // no pieces: every answer reads empty (reward 0), which these checks do not need
    memset(&tk, 0, sizeof tk);
    const uint64_t seed = 0x5EED;
    Rollouts ro[3], alone;
    int threads[3] = {1, 2, 1};
    uint64_t seeds[3] = {seed, seed, seed + 1};
#ifdef OMP
    int nt = omp_get_max_threads();
#endif
    for (int k = 0; k < 3; k++) {
#ifdef OMP
        omp_set_num_threads(threads[k]);
#endif
        Decoders dec = decoders_make(&model, T);
        rollouts_alloc(&ro[k], rows, T);
        grpo_rollouts(&dec, &es, items, &gc, &tk, eot, seeds[k], &ro[k]);
        decoders_free(&dec);
    }
#ifdef OMP
    omp_set_num_threads(nt);
#endif
    // each row by itself, on the stream the GPU gives it
    rollouts_alloc(&alone, rows, T);
    model_alloc_acts(&model, 1, T);
    int resp[64], longest = 0;
    float logp[64];
    for (int r = 0; r < rows; r++) {
        uint64_t rng = hash3(seed, (uint64_t)r, 0x7011);
        int n = sample_response(&model, toks[items[r / gc.G]], plen, gc.R, eot, 0, &tk, resp, logp, 1, gc.temp, &rng);
        rollouts_set_row(&alone, r, toks[items[r / gc.G]], plen, resp, n, logp, eot);
        longest = n > longest ? n : longest;
    }
    size_t N = (size_t)rows * T;
    int same[3];
    for (int k = 0; k < 3; k++)
        same[k] = memcmp(ro[k].x, alone.x, N * sizeof(int)) == 0 && memcmp(ro[k].y, alone.y, N * sizeof(int)) == 0 &&
                  memcmp(ro[k].old_logp, alone.old_logp, N * sizeof(float)) == 0 &&
                  memcmp(ro[k].rlen, alone.rlen, rows * sizeof(int)) == 0;
    CHECK(same[0], "[%s] GRPO rollouts (1 thread): a row differs from sample_response alone on hash3(seed, r, 0x7011)", name);
    CHECK(same[1], "[%s] GRPO rollouts (2 threads): a row differs from sample_response alone on hash3(seed, r, 0x7011)", name);
    CHECK(!same[2], "[%s] GRPO rollouts with another seed are the same", name);
    CHECK(longest > 1, "[%s] every rollout row stopped after one token: the streams were hardly drawn", name);
    printf("[%s] GRPO rollouts: row r == sample_response alone on hash3(seed, r, 0x7011), 1 thread: %s, 2 threads: %s; "
           "another seed differs: %s (longest response %d tokens)\n", name, same[0] ? "yes" : "NO",
           same[1] ? "yes" : "NO", same[2] ? "NO" : "yes", longest);
    for (int k = 0; k < 3; k++) rollouts_free(&ro[k]);
    rollouts_free(&alone);
    debug_free(&d);
    model_free(&model);
}

// a real rollout batch for dev/moe_ref.py --check-rollouts: grpo_rollouts of the NAME_model.bin policy
// at temperature 0.8 (the sampler's log-probs, pi_old) and grpo_ref_logp of NAME_grpo_reference.bin, a
// model that differs from the policy. Written to DIR/NAME_rollouts.bin; the check in PyTorch (make test
// runs it after test_moe) recomputes both log-probs from the two checkpoints, so a reference computed
// with the policy, or log-probs at temperature 1, would fail it.
#define ROLLOUTS_MAGIC 20251128
static void test_rollouts_for_pytorch(const char* dir, const char* name) {
    Model model, ref;
    DebugState d;
    TrainState st;
    char path[1024];
    load_reference(dir, name, &model, &d);
    snprintf(path, sizeof path, "%s/%s_grpo_reference.bin", dir, name);
    if (checkpoint_load(&ref, path, &st, 0) != 0) {
        CHECK(0, "[%s] no GRPO reference model %s: the rollout check against PyTorch was not prepared", name, path);
        debug_free(&d); model_free(&model);
        return;
    }
    int T = d.T, V = model.config.V, eot = V - 1, plen = 2;
    GrpoConfig gc = {2, 3, T - plen, 1, AGG_TOKEN_MEAN, 0.8f, 0.2f, 0.05f, 0, 0}; // P G R M agg temp clip kl ..
    int rows = gc.P * gc.G, items[2] = {0, 1};
    TwoPrompts two;
    EvalSet es = two_prompts(&two, "rollouts", d.x, plen, gc.R);
    Tokenizer tk;
    memset(&tk, 0, sizeof tk);
    Decoders dec = decoders_make(&model, T);
    Rollouts ro;
    rollouts_alloc(&ro, rows, T);
    grpo_rollouts(&dec, &es, items, &gc, &tk, eot, 0xB0A7, &ro);
    decoders_free(&dec);
    model_alloc_acts(&ref, rows, T);
    grpo_ref_logp(&ref, &ro, gc.M, gc.temp);
    int ntok = 0;
    for (int i = 0; i < rows * T; i++) ntok += ro.y[i] >= 0;
    snprintf(path, sizeof path, "%s/%s_rollouts.bin", dir, name);
    int h[256] = {ROLLOUTS_MAGIC, 1, rows, T};
    memcpy(&h[4], &gc.temp, 4);
    FILE* fp = fopenCheck(path, "wb");
    size_t N = (size_t)rows * T;
    int ok = fwrite(h, sizeof(int), 256, fp) == 256 && fwrite(ro.x, sizeof(int), N, fp) == N &&
             fwrite(ro.y, sizeof(int), N, fp) == N && fwrite(ro.old_logp, sizeof(float), N, fp) == N &&
             fwrite(ro.ref_logp, sizeof(float), N, fp) == N;
    ok = (fclose(fp) == 0) && ok;
    CHECK(ok && ntok > rows, "[%s] writing the rollout batch %s (%d response tokens in %d rows)", name, path, ntok, rows);
    printf("[%s] a rollout batch of %d rows, %d response tokens, at temperature %g, with the reference's log-probs: %s "
           "(make test checks it with dev/moe_ref.py --check-rollouts)\n", name, rows, ntok, gc.temp, path);
    rollouts_free(&ro);
    model_free(&ref);
    debug_free(&d);
    model_free(&model);
}

int main(int argc, char** argv) {
    const char* dir = argc > 1 ? argv[1] : "dev/ref";
    if (argc > 2) trainer = argv[2];
    char path[1024], name[256];
    snprintf(path, sizeof path, "%s/manifest.txt", dir);
    FILE* mf = fopenCheck(path, "r");
    int nconf = 0;
    char first[256] = "";
    while (fscanf(mf, "%255s", name) == 1) {
        test_reference(dir, name);
        if (!nconf) strcpy(first, name);
        nconf++;
    }
    fclose(mf);
    CHECK(nconf >= 6, "only %d reference configurations in %s", nconf, path);
    char tmp[] = "/tmp/test_moe_XXXXXX";
    if (!mkdtemp(tmp)) { perror("mkdtemp"); return 1; }
    test_gemm();
    test_topk_ties();
    test_topk_nonfinite();
    test_tokenizer_ids_beyond_v();
    test_answers();
    test_grad_accumulation(dir, "gqa");
    test_fused_classifier(dir, "gqa");
    test_fused_classifier(dir, "e6");
    test_kv_cache(dir, "mqa");
    test_kv_cache(dir, "e6");
    snprintf(path, sizeof path, "%s/grpo_manifest.txt", dir);
    mf = fopenCheck(path, "r");
    int ngrpo = 0;
    while (fscanf(mf, "%255s", name) == 1) { test_grpo(dir, name); ngrpo++; }
    fclose(mf);
    CHECK(ngrpo >= 5, "only %d GRPO reference cases in %s", ngrpo, path);
    test_sampler_logp(dir, "e6", 1.0f);
    test_sampler_logp(dir, "dense", 1.0f);
    test_sampler_logp(dir, "e6", 0.7f);
    test_sampler_logp(dir, "gqa", 1.3f);
    test_rollout_streams(dir, "e6");
    test_rollouts_for_pytorch(dir, "e6");
    test_checkpoint_roundtrip(dir, first, tmp);
    test_trainer_binary(tmp);
    test_grpo_binary(tmp);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    if (system(cmd) != 0) printf("(could not remove %s)\n", tmp);
    CHECK(sanitizer_reports == 0, "%d trainer runs printed a sanitizer report (above)", sanitizer_reports);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
