// Fuzz the token shard reader (shard_open + shard_read): llm.c's uint16 layout (magic 20240520,
// version 1) and the uint32 one (magic 20240801, version 7). A shard it accepts has exactly the
// tokens its header promises, each below V.
#include "fuzz.h"

int LLVMFuzzerInitialize(int* argc, char*** argv) { fuzz_quiet(); return 0; }

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const int V = 4096;
    long ntok = -1;
    int* toks = shard_read(fuzz_file(data, size), V, &ntok);
    if (!toks) return 0;
    int width = size >= 4 && data[0] == (SHARD_MAGIC_U32 & 0xff) ? 4 : 2;
    FUZZ_ASSERT(1024 + ntok * width == (long)size, "accepted shard size matches its header");
    for (long i = 0; i < ntok; i++) FUZZ_ASSERT(toks[i] >= 0 && toks[i] < V, "accepted token inside the vocabulary");
    free(toks);
    return 0;
}
