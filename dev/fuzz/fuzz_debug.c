// Fuzz the reader of dev/moe_ref.py's debug states (debug_read), which test_moe.c and test_moe_cu.cu
// check the trainers against, for one fixed small model shape.
#include "fuzz.h"

// the shape of corpus/debug's seeds (make_seeds.c writes them for it)
static const MoEConfig fuzz_debug_config = {16, 8, 2, 8, 2, 1, 4, 2, 8, 10000.0f, 1e-5f, 0.01f, 0.001f};

int LLVMFuzzerInitialize(int* argc, char*** argv) { fuzz_quiet(); return 0; }

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    size_t sizes[NUM_PARAM_TENSORS], n = 0;
    fill_param_sizes(sizes, &fuzz_debug_config);
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) n += sizes[i];
    DebugState d;
    if (debug_read(&d, fuzz_file(data, size), &fuzz_debug_config, n) != 0) {
        FUZZ_ASSERT(d.x == NULL && d.grads == NULL, "a refused debug state keeps nothing");
        return 0;
    }
    FUZZ_ASSERT(d.B > 0 && d.T > 0 && d.T <= fuzz_debug_config.T && d.nsteps >= 0, "accepted debug state shape");
    debug_free(&d);
    return 0;
}
