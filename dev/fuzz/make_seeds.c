// Writes the seed corpus of the fuzz harnesses: small valid files of every kind the trainer reads,
// made by the trainer's own writers, so the fuzzer starts from inputs that pass every check.
//   make -C dev/fuzz seeds      (writes corpus/<harness>/seed_*)
#include "fuzz.h"

static void path_of(char* p, size_t n, const char* dir, const char* name) { snprintf(p, n, "%s/%s", dir, name); }

static void seed_shards(const char* dir) {
    int toks[40];
    for (int i = 0; i < 40; i++) toks[i] = (i * 131 + 7) % 4096;
    char p[512];
    path_of(p, sizeof p, dir, "seed_u16"); write_shard(p, toks, 40, 0);
    path_of(p, sizeof p, dir, "seed_u32"); write_shard(p, toks, 40, 1);
    path_of(p, sizeof p, dir, "seed_empty"); write_shard(p, toks, 0, 0);
}

static void seed_tokenizer(const char* dir) {
    char p[512];
    path_of(p, sizeof p, dir, "seed_tokenizer");
    FILE* fp = fopenCheck(p, "wb");
    uint32_t h[256] = {20240328, 2, 12, 11};
    fwrite(h, 4, 256, fp);
    const char* pieces[12] = {"a", "b", "the", " ", "\n", "The answer is ", "1", "2", ",", ".", "\xe2\x82\xac", ""};
    for (int i = 0; i < 12; i++) {
        unsigned char len = (unsigned char)strlen(pieces[i]);
        fwrite(&len, 1, 1, fp);
        fwrite(pieces[i], 1, len, fp);
    }
    fclose(fp);
}

static void seed_checkpoints(const char* dir) {
    MoEConfig c = {16, 8, 1, 4, 2, 1, 3, 2, 4, 10000.0f, 1e-5f, 0.01f, 0.001f}; // 1 layer, C=4, E=3, K=2
    Model m;
    model_build(&m, &c);
    model_init_random(&m, 5, 0.02f);
    for (size_t i = 0; i < m.num_params; i++) { m.m_memory[i] = 1e-3f * (float)(i % 7); m.v_memory[i] = 1e-6f * (float)(i % 5); }
    TrainState st = {12, {1, 0, 3}, 0x1234567887654321ull, 1337};
    char p[512];
    path_of(p, sizeof p, dir, "seed_with_optimizer"); checkpoint_save(&m, p, 1, &st);
    path_of(p, sizeof p, dir, "seed_weights_only"); checkpoint_save(&m, p, 0, &st);
    model_free(&m);
}

static void seed_evals(const char* dir) {
    int t0[6] = {3, 5, 7, 1, 2, 9}, t1[4] = {11, 4, 8, 8};
    int* toks[2] = {t0, t1};
    int plen[2] = {4, 2}, alen[2] = {2, 2};
    char r0[] = "42", r1[] = "1,000\n1000";
    char* refs[2] = {r0, r1};
    EvalSet es;
    memset(&es, 0, sizeof es);
    es.n = 2; es.plen = plen; es.alen = alen; es.toks = toks; es.ref = refs;
    char p[512];
    strcpy(es.name, "seed_reasoning"); es.kind = TASK_REASONING;
    path_of(p, sizeof p, dir, "seed_reasoning"); write_eval(p, &es, 4096);
    strcpy(es.name, "seed_memorization"); es.kind = TASK_MEMORIZATION;
    char r2[] = "Paris", r3[] = "a b\nb";
    refs[0] = r2; refs[1] = r3;
    path_of(p, sizeof p, dir, "seed_memorization"); write_eval(p, &es, 4096);
}

// the layout dev/moe_ref.py writes (dev/FORMATS.md, "Debug state"), for fuzz_debug.c's model shape
static void seed_debug(const char* dir) {
    const MoEConfig c = {16, 8, 2, 8, 2, 1, 4, 2, 8, 10000.0f, 1e-5f, 0.01f, 0.001f};
    size_t sizes[NUM_PARAM_TENSORS], n = 0;
    fill_param_sizes(sizes, &c);
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) n += sizes[i];
    int B = 1, T = 4, nsteps = 2, N = B * T;
    int h[256] = {0};
    h[0] = DEBUG_MAGIC; h[1] = 1; h[2] = B; h[3] = T; h[4] = nsteps;
    h[5] = f2i(1e-3f); h[6] = f2i(0.9f); h[7] = f2i(0.95f); h[8] = f2i(1e-8f); h[9] = f2i(0.1f); h[10] = f2i(1.0f);
    h[11] = 1; h[12] = f2i(1e-4f);
    char p[512];
    path_of(p, sizeof p, dir, "seed_debug");
    FILE* fp = fopenCheck(p, "wb");
    fwrite(h, 4, 256, fp);
    for (int i = 0; i < 2 * N; i++) { int t = (i * 5 + 1) % c.V; fwrite(&t, 4, 1, fp); }         // x, y
    size_t nfloat = (size_t)N * c.V + 1 + 2 * c.L + 1;                                             // logits .. loss
    for (size_t i = 0; i < nfloat; i++) { float f = 0.01f * (float)(i % 13); fwrite(&f, 4, 1, fp); }
    for (int i = 0; i < c.L * N * c.K; i++) { int e = i % c.E; fwrite(&e, 4, 1, fp); }             // experts
    for (size_t i = 0; i < n + 2 * (size_t)nsteps; i++) { float f = 1e-3f * (float)(i % 11); fwrite(&f, 4, 1, fp); }
    fclose(fp);
}

int main(int argc, char** argv) {
    const char* root = argc > 1 ? argv[1] : "corpus";
    const char* names[5] = {"shard", "tokenizer", "checkpoint", "eval", "debug"};
    void (*writers[5])(const char*) = {seed_shards, seed_tokenizer, seed_checkpoints, seed_evals, seed_debug};
    for (int i = 0; i < 5; i++) {
        char dir[512];
        snprintf(dir, sizeof dir, "%s/%s", root, names[i]);
        mkdir(root, 0755);
        mkdir(dir, 0755);
        writers[i](dir);
        printf("wrote %s/seed_*\n", dir);
    }
    return 0;
}
