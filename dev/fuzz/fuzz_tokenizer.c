// Fuzz the tokenizer reader (tokenizer_init) and what decodes with it (tokenizer_print, the text of
// generated tokens that the task eval matches).
#include "fuzz.h"

int LLVMFuzzerInitialize(int* argc, char*** argv) { fuzz_quiet(); return 0; }

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    Tokenizer tk;
    int rc = tokenizer_init(&tk, fuzz_file(data, size));
    FUZZ_ASSERT(rc == 0 || (rc == -1 && !tk.ok && tk.tokens == NULL), "a refused tokenizer keeps nothing");
    if (rc != 0) return 0;
    FUZZ_ASSERT(tk.ok && tk.V > 0 && tk.eot >= 0 && tk.eot < tk.V, "an accepted tokenizer has V > eot >= 0");
    int ids[8];
    for (int i = 0; i < 8; i++) ids[i] = (i * 977 + 3) % (tk.V + 2) - 1; // a few ids, -1 and V among them
    for (int i = 0; i < 8; i++) tokenizer_print(&tk, ids[i]);
    size_t cap = 16;
    char* text = (char*)mallocCheck(cap);
    tokens_text(&tk, ids, 8, &text, &cap);
    FUZZ_ASSERT(strlen(text) < cap, "decoded text fits its buffer");
    free(text);
    tokenizer_free(&tk);
    return 0;
}
