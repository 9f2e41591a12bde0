// Fuzz the checkpoint reader (checkpoint_open + checkpoint_load): the header, the parameters, and
// the AdamW state when the file holds it, loaded both with and without the optimizer state. A
// checkpoint it accepts saves back (checkpoint_save) to the same header fields and body bytes.
#include "fuzz.h"

int LLVMFuzzerInitialize(int* argc, char*** argv) { fuzz_quiet(); return 0; }

static char saved[64];

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (!saved[0]) snprintf(saved, sizeof saved, "/dev/shm/fuzz_checkpoint_%d.bin", (int)getpid());
    const char* path = fuzz_file(data, size);
    for (int with_opt = 1; with_opt >= 0; with_opt--) {
        Model model;
        TrainState st;
        if (checkpoint_load(&model, path, &st, with_opt) != 0) continue;
        int has_opt;
        memcpy(&has_opt, data + 15 * 4, 4);
        FUZZ_ASSERT(!with_opt || has_opt == 1, "the optimizer state loads only from a file that has it");
        checkpoint_save(&model, saved, with_opt, &st);
        FILE* fp = fopenCheck(saved, "rb");
        size_t n = (size_t)file_size(fp);
        uint8_t* back = (uint8_t*)mallocCheck(n);
        freadCheck(back, 1, n, fp, saved);
        fclose(fp);
        size_t body = model.num_params * 4 * (with_opt ? 3 : 1);
        FUZZ_ASSERT(n == 1024 + body && 1024 + body <= size, "the saved checkpoint has the loaded size");
        FUZZ_ASSERT(memcmp(back, data, 15 * 4) == 0, "the saved header has the loaded shape");
        FUZZ_ASSERT(memcmp(back + 16 * 4, data + 16 * 4, 10 * 4) == 0, "the saved header has the loaded train state");
        FUZZ_ASSERT(memcmp(back + 1024, data + 1024, body) == 0, "the saved body equals the loaded one");
        free(back);
        remove(saved);
        model_free(&model);
        break;
    }
    return 0;
}
