/*
dev/moe/grpo.h: GRPO post-training for train_moe.c (flag -rl FILE; dev/GRPO.md).

Defines, and where train_moe.c calls it:
  grpo_usage, grpo_flag, grpo_flags_error, grpo_optim_defaults
                usage, parse_args and args_error: GRPO's flags (GrpoConfig, the settings, is with the
                flags in train_moe.c, which declares these)
  run_grpo      main, with -rl: the whole RL loop in place of pre-training, from the -e checkpoint
and what run_grpo is made of, which the CUDA trainer and the tests share: grpo_advantages,
grpo_token_weights (the objective as per-token weights of the classifier's backward), Rollouts,
grpo_rollouts (sampling with the KV-cached decoder of dev/moe/tasks.h), grpo_temper (log-probs at the
sampling temperature), grpo_ref_logp, grpo_adamw (verl's AdamW), grpo_report.
*/

// ----------------------------------------------------------------------------
// the flags

void grpo_usage(void) {
    printf("  -rp P prompts per rollout batch (16)   -rg G samples per prompt (5)   -rr R max response tokens (64)\n"
           "  -rm M mini-batch updates per rollout batch, dividing P (4)   -rt sampling temperature (1.0; the log-probs\n"
           "        of pi_old, pi and the reference are taken at it too)\n"
           "  -rc clip epsilon (0.2)   -rk k3 KL coefficient (0.001, 0 = no reference model)\n"
           "  -ra loss aggregation: 0 token mean (default), 1 per-sequence mean (DeepSeekMath), 2 token sum / R (Dr. GRPO)\n"
           "  -rx 1: the router's aux and z losses in the RL loss (default 0: the surrogate and the KL only, as verl)\n"
           "  -rd 1: weight decay on the matrices only, as in pre-training (default 0: every parameter, as verl's AdamW)\n"
           "  with -rl the defaults of -l, -u, -q, -b2, -c become 5e-6, 0, 1, 0.999, 0.01: the paper's constant lr\n"
           "  without warm-up, and verl's AdamW\n");
}

// one of GRPO's flags into gc (1), or 0 if flag is not one of them
int grpo_flag(GrpoConfig* gc, const char* f, const char* v) {
    const char* int_flags[7] = {"-rp", "-rg", "-rr", "-rm", "-ra", "-rx", "-rd"};
    int* ints[7] = {&gc->P, &gc->G, &gc->R, &gc->M, &gc->agg, &gc->router_losses, &gc->decay_matrices_only};
    const char* float_flags[3] = {"-rt", "-rc", "-rk"};
    float* floats[3] = {&gc->temp, &gc->clip, &gc->kl};
    for (int i = 0; i < 7; i++) if (!strcmp(f, int_flags[i])) { *ints[i] = parse_int(f, v); return 1; }
    for (int i = 0; i < 3; i++) if (!strcmp(f, float_flags[i])) { *floats[i] = parse_float(f, v); return 1; }
    return 0;
}

// what is wrong with GRPO's settings (NULL: nothing)
const char* grpo_flags_error(const GrpoConfig* gc) {
    if (gc->P < 1) return "-rp (prompts per rollout batch) must be positive";
    if (gc->G < 2) return "-rg (samples per prompt) must be >= 2: a group of one has no advantage";
    if (gc->R < 1) return "-rr (max response tokens) must be positive";
    if (gc->M < 1 || gc->P % gc->M != 0) return "-rm (mini-batches) must be positive and divide -rp (prompts per rollout batch)";
    if (gc->agg < 0 || gc->agg > 2) return "-ra (loss aggregation) must be 0, 1 or 2";
    if (!(gc->temp > 0) || !isfinite(gc->temp)) return "-rt (sampling temperature) must be positive";
    if (!(gc->clip > 0 && gc->clip < 1)) return "-rc (clip epsilon) must be in (0, 1)";
    if (!(gc->kl >= 0) || !isfinite(gc->kl)) return "-rk (KL coefficient) must be >= 0";
    if (gc->router_losses != 0 && gc->router_losses != 1) return "-rx (router losses in the RL loss) must be 0 or 1";
    if (gc->decay_matrices_only != 0 && gc->decay_matrices_only != 1) return "-rd (decay the matrices only) must be 0 or 1";
    return NULL;
}

// under -rl, the flags not given take the paper's post-training values: a constant lr of 5e-6 without
// warm-up, and the AdamW of its verl (betas 0.9 and 0.999, weight decay 0.01)
void grpo_optim_defaults(Args* a) {
    if (!a->optim_given[0]) a->lr = 5e-6f;
    if (!a->optim_given[1]) a->warmup = 0;
    if (!a->optim_given[2]) a->min_lr_frac = 1.0f;
    if (!a->optim_given[3]) a->beta2 = 0.999f;
    if (!a->optim_given[4]) a->weight_decay = 0.01f;
}

// ----------------------------------------------------------------------------
// the objective

// One RL step:
//   rollouts   P prompts of an eval-format file, G responses each, sampled with the KV-cached decoder
//              (sample_response) at a temperature, up to R tokens, the stop token kept
//   reward     1 if the response's answer passes the task eval's check (answer_matches), else 0
//   advantage  per group of G: A = (r - mean) / (std + 1e-6), std with Bessel's correction (as
//              torch.std); a group whose rewards are all equal gets A = 0
//   update     the P*G rows in M mini-batches, one AdamW step each (one pass). Per response token i
//              of a row with advantage A, with logp = log pi(token), ratio = exp(logp - logp_old):
//                pg_i = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))       (PPO-clip)
//                kl_i = min(exp(d) - d - 1, 10),  d = logp_ref - logp               (k3, clamped)
//                loss = agg_i(pg_i + beta * kl_i)   [+ aux_coef * sum_l aux_l + z_coef * sum_l z_l with -rx 1]
//              Every log-prob is of the logits divided by the sampling temperature (as verl does):
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

// the statistics of one mini-batch update (sums over its response tokens, and counts)
typedef struct { double loss, pg, kl, entropy; long tokens, clipped, kl_clamped; } GrpoStats;

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
                else { kl = GRPO_KL_MAX; st->kl_clamped++; }
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

// after model_forward on the mini-batch (and grpo_temper): its whole GRPO loss (with -rx 1 the router
// terms too) and the weights w of its backward; adds to *st, with the policy's entropy at the response
// tokens
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
    if (gc->router_losses)
        for (int l = 0; l < c->L; l++) loss += (double)c->aux_coef * model->aux[l] + (double)c->z_coef * model->zl[l];
    st->loss += loss;
    return (float)loss;
}

// after a forward with targets y over N positions: the log-probs at temperature temp, that is the
// logits divided by temp, their probabilities and the per-token losses (-logp) computed again from them.
// At temp 1 nothing changes.
void grpo_temper(Model* model, const int* y, int N, float temp) {
    if (temp == 1.0f) return;
    int V = model->config.V;
    for (size_t i = 0; i < (size_t)N * V; i++) model->logits[i] /= temp;
    crossentropy_forward(model->losses, model->dlogits, model->logits, y, N, V, 0.0f);
}

// one mini-batch's gradient (added to model->grads): forward, weights, weighted backward. Returns the loss.
// The weights are of the tempered logits: d loss / d logits = (1 / temp) x theirs. Without -rx 1 the
// backward leaves out the router's aux and z terms (their coefficients are 0 for it).
float grpo_backward(Model* model, const int* x, const int* y, const float* adv, const float* old_logp,
                    const float* ref_logp, int rows, int T, const GrpoConfig* gc, float* w, GrpoStats* st) {
    model_forward(model, x, y, rows, T);
    grpo_temper(model, y, rows * T, gc->temp);
    float loss = grpo_loss_weights(model, y, adv, old_logp, ref_logp, rows, T, gc, w, st);
    if (gc->temp != 1.0f)
        for (size_t n = 0; n < (size_t)rows * T; n++) w[n] /= gc->temp;
    MoEConfig keep = model->config;
    if (!gc->router_losses) model->config.aux_coef = model->config.z_coef = 0.0f;
    model->token_weights = w;
    model_backward(model, 1.0f);
    model->token_weights = NULL;
    model->config = keep;
    return loss;
}

// one AdamW step t of GRPO's update: model_update, which decays the matrices only, after the decay of
// every other parameter (norm weights) unless decay_matrices_only. p - lr * wd * p, then the Adam
// step: the same update as torch's AdamW, which verl uses, up to rounding.
void grpo_adamw(Model* model, float lr, float beta1, float beta2, float weight_decay, int decay_matrices_only, int t,
                float grad_scale) {
    size_t off = 0;
    for (int ti = 0; ti < NUM_PARAM_TENSORS; ti++) {
        float* p = model->params_memory + off;
        if (!param_is_matrix[ti] && !decay_matrices_only)
            for (size_t i = 0; i < model->param_sizes[ti]; i++) p[i] -= lr * weight_decay * p[i];
        off += model->param_sizes[ti];
    }
    model_update(model, lr, beta1, beta2, 1e-8f, weight_decay, t, grad_scale);
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

// the random stream row r of a rollout batch samples from, given the step's seed: the same rollouts
// for any number of threads, and on the GPU (train_moe.cu) as on the CPU
uint64_t grpo_row_stream(uint64_t seed, int r) { return hash3(seed, (uint64_t)r, 0x7011); }

// G responses to each of the P items of es listed in items[], rewards from the answer check. Row r
// samples with its own stream, grpo_row_stream(seed, r). Returns how many rows earned reward 1.
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
        uint64_t rng = grpo_row_stream(seed, r);
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

// the reference model's log-probs of the response tokens at temperature temp, mini-batch by mini-batch
// (rows/M rows each)
void grpo_ref_logp(Model* ref, Rollouts* ro, int M, float temp) {
    int mb = ro->rows / M, T = ro->T;
    for (int m = 0; m < M; m++) {
        size_t o = (size_t)m * mb * T;
        model_forward(ref, ro->x + o, ro->y + o, mb, T);
        grpo_temper(ref, ro->y + o, mb * T, temp);
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

// -rl: GRPO post-training of the loaded model (dev/GRPO.md). The reference model is
// the -e checkpoint, re-read on resume; a checkpoint holds the policy, AdamW, the RL step, the
// position in the prompt order and the sampler's RNG, so resuming continues bit for bit.
int run_grpo(Model* model, const Args* a, TrainState* st, const Tokenizer* tk, EvalSet* sets, int nsets,
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
    printf("grpo: %s (%d prompts) | P=%d G=%d R=%d M=%d (%d rows per update) temp=%g clip=%g kl=%g agg=%s router "
           "losses %s | lr=%g AdamW betas (%g, %g) wd %g on %s\n",
           a->rl_file, es.n, gc->P, gc->G, gc->R, gc->M, mb, gc->temp, gc->clip, gc->kl,
           gc->agg == AGG_TOKEN_MEAN ? "token-mean" : gc->agg == AGG_SEQ_MEAN ? "seq-mean" : "dr-grpo",
           gc->router_losses ? "in" : "out", a->lr, a->beta1, a->beta2, a->weight_decay,
           gc->decay_matrices_only ? "the matrices" : "every parameter");
    Rollouts ro;
    rollouts_alloc(&ro, rows, T);
    float* w = (float*)mallocCheck((size_t)mb * T * sizeof(float));
    int* perm = (int*)mallocCheck((size_t)es.n * sizeof(int));
    int* items = (int*)mallocCheck((size_t)gc->P * sizeof(int));
    int perm_epoch = -1;
    DataPos pos = st->pos;
    Decoders dec = decoders_make(model, T);
    if (a->val_every > 0 && st->step == 0) evaluate(model, val, sets, nsets, tk, a, logf, 0); // the start, as step 0
    for (int step = st->step; step < a->steps; step++) {
        double t0 = now_ms();
        model->step = step + 1;
        for (int i = 0; i < dec.n; i++) dec.m[i].step = step + 1;
        grpo_next_prompts(perm, &perm_epoch, es.n, &pos, st->seed, items, gc->P);
        grpo_rollouts(&dec, &es, items, gc, tk, eot, rng_u64(&st->rng), &ro);
        int flat = grpo_advantages(ro.reward, ro.adv, rows, gc->G);
        if (use_ref) grpo_ref_logp(&ref, &ro, gc->M, gc->temp);
        double t1 = now_ms();
        GrpoStats gs = {0};
        float lr = lr_schedule(step, a->steps, a->warmup, a->lr, a->lr * a->min_lr_frac), norm = 0.0f;
        for (int m = 0; m < gc->M; m++) { // one AdamW step per mini-batch, pi_old fixed for the whole batch
            size_t o = (size_t)m * mb * T;
            model_zero_grad(model);
            grpo_backward(model, ro.x + o, ro.y + o, ro.adv + m * mb, ro.old_logp + o, ro.ref_logp + o, mb, T, gc, w, &gs);
            norm = global_grad_norm(model);
            float scale = (a->grad_clip > 0 && norm > a->grad_clip) ? a->grad_clip / norm : 1.0f;
            grpo_adamw(model, lr, a->beta1, a->beta2, a->weight_decay, gc->decay_matrices_only, step * gc->M + m + 1, scale);
        }
        grpo_report(logf, step + 1, a->steps, gc, &ro, flat, &gs, lr, norm, t1 - t0, now_ms() - t1);
        int last = step + 1 == a->steps;
        if (a->val_every > 0 && ((step + 1) % a->val_every == 0 || last))
            evaluate(model, val, sets, nsets, tk, a, logf, step + 1);
        if (a->out_dir && ((a->ckpt_every > 0 && (step + 1) % a->ckpt_every == 0) || last))
            save_checkpoint(model, a->out_dir, (TrainState){step + 1, pos, st->rng, st->seed});
        if (logf) fflush(logf);
    }
    if (use_ref) model_free(&ref);
    decoders_free(&dec);
    rollouts_free(&ro);
    free(w); free(perm); free(items);
    evalset_free(&es);
    return 0;
}

