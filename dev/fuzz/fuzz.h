// Shared by the fuzz harnesses of dev/fuzz: each includes train_moe.c and dev/moe/testing.h (for
// the debug-state reader and the seed writers) and hands the fuzzer's bytes to one reader as a file.
// The readers take paths, so the bytes go into a memory file (memfd) named /proc/self/fd/N.
#define TESTING
#define _GNU_SOURCE
#include "../../train_moe.c"
#include "../moe/testing.h"
#include <sys/mman.h>

// the fuzzer's bytes as a file; returns its path (valid until the next call)
static const char* fuzz_file(const uint8_t* data, size_t size) {
    static int fd = -1;
    static char path[64];
    if (fd < 0) {
        fd = memfd_create("fuzz_input", 0);
        if (fd < 0) { perror("memfd_create"); abort(); }
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    }
    if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != (ssize_t)size) { perror("fuzz_file"); abort(); }
    return path;
}

// the readers' "Error: ..." lines go to stderr's FILE, the sanitizers' and libFuzzer's reports to
// file descriptor 2 directly: pointing the stream at /dev/null keeps the log to what matters.
// FUZZ_VERBOSE=1 keeps the readers' messages.
static void fuzz_quiet(void) {
    const char* v = getenv("FUZZ_VERBOSE");
    if (v && v[0] == '1') return;
    FILE* null = fopen("/dev/null", "w");
    if (null) { stderr = null; stdout = null; }
}

// a property the reader must have: a failure is a crash, which the fuzzer reports and keeps
#define FUZZ_ASSERT(cond, what) do { if (!(cond)) { \
    dprintf(2, "fuzz property failed: %s (%s:%d)\n", what, __FILE__, __LINE__); abort(); } } while (0)
