/*
dev/moe/profile.h: where a training step's time goes (flag -pf N), for train_moe.c.

Defines, and where train_moe.c calls it:
  phase_mark(PH_...)   model_forward/model_backward and the training loop, between the calls of the
                       model's parts; it does nothing unless phase_clock.on (main sets it for the
                       training steps of a -pf run, not for the evals)
  print_phase_table    main, every -pf N steps: the mean ms per step of each phase
*/

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
