/*
dev/moe/tasks.h: what the eval loop of train_moe.c needs beyond a forward pass, for the paper's task
loss and task accuracy, and test-time compute.

Defines, and where train_moe.c calls it:
  EvalSet, evalsets_load, evalset_free   main: the eval files of -ev (layout: data/tasks/README.md)
  task_loss_batch, task_loss_add         eval_task_loss: an eval file's items as rows, their answer NLL
  generate_answer (sample_response)      eval_task_accuracy: decoding with a KV cache, greedy or sampled
  tokens_text, answer_matches            eval_task_accuracy: the answer check (exact text, or the number
                                         after "The answer is")
  run_test_time_compute                  run_task_evals (-tn N): maj@n and pass@n, n = 1, 2, 4 .. N
  run_forward_only                       main, with -fi/-fo: a checkpoint's logits on given tokens
The CUDA trainer and dev/moe/grpo.h use the same file reader, answer checks and tallies.

Eval file layout: header 256 x int32 (magic 20251125, version 1, items, max prompt, max answer, max
ref bytes, V, eot, kind, total prompt tokens, total answer tokens, total ref bytes, seed; bytes 64..127
the name), then per item: int32 prompt length, int32 answer length, the tokens, int32 ref length, the
ref bytes.
*/

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

// the two steps of eval_task_loss that both trainers share: rows x[B,T], y[B,T] for items i0..i0+B (targets -1 outside the
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
// receives log pi(out[i]) under the distribution it samples from, softmax(logits / temperature) (GRPO
// takes every log-prob at its sampling temperature), computed as the training forward's cross-entropy
// computes it.
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
        if (logp) { // of the logits / temperature, as crossentropy_forward: max + log(sum exp(l - max)) - l[next]
            for (int i = 0; i < V; i++) probs[i] = last[i] / temperature;
            float mx = vmax(probs, V), lnext = probs[next];
            for (int i = 0; i < V; i++) probs[i] = vexpf(probs[i] - mx);
            logp[n] = -(mx + logf(vsum(probs, V)) - lnext);
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

// -tn: test-time compute on one eval file (nsamples per item at a temperature, drawn from rng, its
// own stream), on the console and in the log
void run_test_time_compute(Model* model, const EvalSet* es, const Tokenizer* tk, int eot, int max_items, int nsamples,
                           float temperature, uint64_t rng, FILE* logf, int step) {
    int ns[16], scored;
    double maj[16], pass[16];
    int nn = eval_test_time_compute(model, es, tk, eot, max_items, nsamples, temperature, &rng, ns, maj, pass, &scored);
    report_ttc(logf, step, es, nn, ns, maj, pass, scored, temperature);
}

// -fi/-fo: the logits of the loaded model on B*T raw int32 tokens read from fwd_in, written to fwd_out
// as B*T*V float32 (the checks against PyTorch and Hugging Face read them)
int run_forward_only(Model* model, const char* fwd_in, const char* fwd_out, int B, int T) {
    size_t n = (size_t)B * T;
    int* toks = (int*)mallocCheck(n * sizeof(int));
    FILE* fp = fopenCheck(fwd_in, "rb");
    if (file_size(fp) != (long)(n * sizeof(int))) {
        fprintf(stderr, "Error: '%s' is %ld bytes, expected B*T=%zu int32 tokens\n", fwd_in,
                file_size(fp), n);
        exit(EXIT_FAILURE);
    }
    freadCheck(toks, sizeof(int), n, fp, fwd_in);
    fclose(fp);
    model_forward(model, toks, NULL, B, T);
    char* tmp = (char*)mallocCheck(strlen(fwd_out) + 5);
    sprintf(tmp, "%s.tmp", fwd_out);
    fp = fopenCheck(tmp, "wb");
    size_t nl = n * model->config.V;
    int ok = fwrite(model->logits, sizeof(float), nl, fp) == nl;
    ok = (fclose(fp) == 0) && ok;
    if (!ok || rename(tmp, fwd_out) != 0) {
        remove(tmp);
        fprintf(stderr, "Error: writing '%s' failed\n", fwd_out);
        exit(EXIT_FAILURE);
    }
    free(tmp); free(toks);
    return 0;
}
