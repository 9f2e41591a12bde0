/*
dev/moe/testing.h: what the tests need beside train_moe.c: the readers of dev/moe_ref.py's reference
states, and small file and process helpers. Included after train_moe.c by test_moe.c, the fuzz
harnesses (dev/fuzz) and, inside namespace cpu, test_moe_cu.cu; the trainer never includes it.

Defines:
  DebugState, debug_read, debug_free   NAME_debug.bin: a batch, its logits, losses, routing, gradients
                                       and a few AdamW steps of the PyTorch reference (dev/TESTS.md)
  GrpoRef, grpo_ref_read, grpo_ref_free  NAME_grpo.bin: a rollout batch and the reference's updates
  files_equal, write_shard, write_eval  files for the trainer-binary tests and the fuzz seeds
  run_cmd, sanitizer_reports           run a trainer binary, catching sanitizer reports in its output
*/
#include <sys/wait.h>

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
#define GRPO_REF_STATS 4 // per update: loss, clipped tokens, grad norm, clamped KL tokens
typedef struct {
    GrpoConfig gc;  // with the temperature, router losses in or out, the weight decay's reach
    float opt[6];   // AdamW: lr, beta1, beta2, eps, weight decay, grad clip
    Rollouts ro;    // x, y, rewards, old and reference log-probs (ro.adv is left to the reader)
    float* adv_ref; // per row: the reference's advantages
    float* updates; // per update: loss, clipped tokens, grad norm, clamped KL tokens, then num_params gradients
} GrpoRef;

void grpo_ref_free(GrpoRef* g) { rollouts_free(&g->ro); free(g->adv_ref); free(g->updates); memset(g, 0, sizeof(*g)); }

int grpo_ref_read(GrpoRef* g, const char* path, int maxT, size_t num_params) {
    memset(g, 0, sizeof(*g));
    FILE* fp = fopen_report(path);
    if (!fp) return -1;
    int h[256];
    if (fread_report(h, sizeof(int), 256, fp, path)) { fclose(fp); return -1; }
    int rows = h[2], T = h[3], M = h[6];
    if (h[0] != GRPO_REF_MAGIC || h[1] != 2 || rows <= 0 || T <= 0 || T > maxT || M < 1 || rows % M || h[5] < 2) {
        fclose(fp);
        return read_error("'%s' is not a GRPO reference for this model (magic, version or sizes)", path);
    }
    size_t N = (size_t)rows * T;
    long expect = 1024 + 4L * (4 * (long)N + 2L * rows) + 4L * M * (GRPO_REF_STATS + (long)num_params);
    if (file_size(fp) != expect) { fclose(fp); return read_error("'%s' has the wrong size for its header", path); }
    GrpoConfig gc = {h[4], h[5], h[8], M, h[7], 1.0f, 0.0f, 0.0f, h[18], h[19]};
    memcpy(&gc.clip, &h[9], 4);
    memcpy(&gc.kl, &h[10], 4);
    memcpy(g->opt, &h[11], sizeof g->opt);
    memcpy(&gc.temp, &h[17], 4);
    g->gc = gc;
    rollouts_alloc(&g->ro, rows, T);
    g->adv_ref = (float*)mallocCheck(rows * sizeof(float));
    g->updates = (float*)mallocCheck((size_t)M * (GRPO_REF_STATS + num_params) * sizeof(float));
    int bad = fread_report(g->ro.x, sizeof(int), N, fp, path) || fread_report(g->ro.y, sizeof(int), N, fp, path) ||
              fread_report(g->ro.reward, sizeof(float), rows, fp, path) ||
              fread_report(g->adv_ref, sizeof(float), rows, fp, path) ||
              fread_report(g->ro.old_logp, sizeof(float), N, fp, path) ||
              fread_report(g->ro.ref_logp, sizeof(float), N, fp, path) ||
              fread_report(g->updates, sizeof(float), (size_t)M * (GRPO_REF_STATS + num_params), fp, path);
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
