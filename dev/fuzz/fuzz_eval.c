// Fuzz the eval-file reader (evalset_load) and what the task eval does with an accepted file: the
// task-loss batch layout (task_loss_batch) and answer extraction and matching on its references.
#include "fuzz.h"

int LLVMFuzzerInitialize(int* argc, char*** argv) { fuzz_quiet(); return 0; }

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const int V = 4096, T = 64, B = 3;
    EvalSet es;
    if (evalset_load(&es, fuzz_file(data, size), V, T) != 0) {
        FUZZ_ASSERT(es.n == 0 && es.toks == NULL, "a refused eval file keeps nothing");
        return 0;
    }
    int x[B * T], y[B * T];
    for (int i0 = 0; i0 < es.n; i0 += B) {
        task_loss_batch(&es, i0, B, T, 0, x, y);
        for (int i = 0; i < B * T; i++) FUZZ_ASSERT(x[i] >= 0 && x[i] < V && y[i] >= -1 && y[i] < V, "batch tokens in range");
    }
    for (int i = 0; i < es.n; i++) {
        FUZZ_ASSERT(es.plen[i] >= 1 && es.plen[i] <= T && es.alen[i] >= 1, "accepted item lengths");
        size_t rl = strlen(es.ref[i]);
        char* gen = (char*)mallocCheck(rl + 32);
        snprintf(gen, rl + 32, "The answer is %s.", es.ref[i]);
        answer_matches(gen, es.ref[i], es.kind);
        answer_matches(es.ref[i], es.ref[i], es.kind);
        free(gen);
    }
    evalset_free(&es);
    return 0;
}
