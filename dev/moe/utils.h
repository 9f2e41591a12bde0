/*
dev/moe/utils.h: checked I/O and allocation for train_moe.c, as llm.c keeps them in llmc/utils.h.

Defines, and where train_moe.c calls it:
  fopenCheck, freadCheck, mallocCheck, callocCheck   everywhere: exit non-zero with an error that
                                        names the file (or the size) and the source line
  read_error, fopen_report, fread_report             the file readers (shards, tokenizer, checkpoints,
                                        eval files): print "Error: ..." naming the file and return, so
                                        the trainer exits and the fuzz harnesses (dev/fuzz) go on
  file_size, mkdir_p                    the readers; main's output directory (-o)
  gentle_omp_wait_policy                main, first: OpenMP threads that sleep soon at a barrier
*/

static void die(const char* fmt, const char* a, const char* file, int line) {
    fprintf(stderr, "Error: ");
    fprintf(stderr, fmt, a);
    fprintf(stderr, "\n  (at %s:%d)\n", file, line);
    exit(EXIT_FAILURE);
}

static FILE* fopen_check(const char* path, const char* mode, const char* file, int line) {
    FILE* fp = fopen(path, mode);
    if (fp == NULL) {
        fprintf(stderr, "Error: cannot open '%s' (mode %s): %s\n  (at %s:%d)\n", path, mode, strerror(errno), file, line);
        exit(EXIT_FAILURE);
    }
    return fp;
}
#define fopenCheck(path, mode) fopen_check(path, mode, __FILE__, __LINE__)

// read exactly n items or fail naming the file
static void fread_check(void* ptr, size_t size, size_t n, FILE* fp, const char* path, const char* file, int line) {
    size_t got = fread(ptr, size, n, fp);
    if (got != n) {
        fprintf(stderr, "Error: '%s' is truncated: wanted %zu items of %zu bytes, got %zu\n  (at %s:%d)\n",
                path, n, size, got, file, line);
        exit(EXIT_FAILURE);
    }
}
#define freadCheck(ptr, size, n, fp, path) fread_check(ptr, size, n, fp, path, __FILE__, __LINE__)

static void* malloc_check(size_t size, const char* file, int line) {
    void* p = malloc(size ? size : 1);
    if (p == NULL) {
        fprintf(stderr, "Error: out of memory allocating %zu bytes\n  (at %s:%d)\n", size, file, line);
        exit(EXIT_FAILURE);
    }
    return p;
}
#define mallocCheck(size) malloc_check(size, __FILE__, __LINE__)

static void* calloc_check(size_t n, size_t size, const char* file, int line) {
    void* p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL) {
        fprintf(stderr, "Error: out of memory allocating %zu x %zu bytes\n  (at %s:%d)\n", n, size, file, line);
        exit(EXIT_FAILURE);
    }
    return p;
}
#define callocCheck(n, size) calloc_check(n, size, __FILE__, __LINE__)

// The file readers (shards, tokenizer, checkpoints, eval files, the test's debug state) report and
// return instead of exiting: on bad bytes each prints "Error: ..." naming the file, frees what it
// allocated and returns NULL or -1. The trainer then exits; the fuzz harnesses in dev/fuzz go on.
static int read_error(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "Error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    return -1;
}

static FILE* fopen_report(const char* path) {
    FILE* fp = fopen(path, "rb");
    if (fp == NULL) read_error("cannot open '%s': %s", path, strerror(errno));
    return fp;
}

static int fread_report(void* ptr, size_t size, size_t n, FILE* fp, const char* path) {
    size_t got = fread(ptr, size, n, fp);
    if (got == n) return 0;
    return read_error("'%s' is truncated: wanted %zu items of %zu bytes, got %zu", path, n, size, got);
}

static long file_size(FILE* fp) {
    long here = ftell(fp);
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, here, SEEK_SET);
    return n;
}

// mkdir -p: create dir and any missing parents
void mkdir_p(const char* dir) {
    size_t n = strlen(dir);
    char* p = (char*)mallocCheck(n + 1);
    memcpy(p, dir, n + 1);
    for (size_t i = 1; i <= n; i++)
        if (p[i] == '/' || p[i] == 0) {
            char keep = p[i];
            p[i] = 0;
            if (mkdir(p, 0755) != 0 && errno != EEXIST) {
                fprintf(stderr, "Error: cannot create output directory '%s' (flag -o): %s\n", p, strerror(errno));
                exit(EXIT_FAILURE);
            }
            p[i] = keep;
        }
    free(p);
}

// libgomp reads its wait policy once, when the program loads, and by default a thread that reaches
// a barrier first spins 300,000 times before it sleeps. A step has over a thousand barriers, so on a
// machine where another process wants the cores the spinning threads take the time the lagging one
// needs, and a step can take 10x longer. A spin count of 3000 costs nothing measurable on a quiet
// machine and degrades gently on a busy one (dev/SPEED.md, "Threads on a busy machine"). Since the
// setting must be in the environment before libgomp starts, the trainer sets it and re-executes
// itself, unless the user chose a policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT).
void gentle_omp_wait_policy(char** argv) {
#ifdef OMP
    if (getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT")) return;
    setenv("GOMP_SPINCOUNT", "3000", 1);
    execv("/proc/self/exe", argv); // returns only if it failed: then run as we are
    unsetenv("GOMP_SPINCOUNT");
#else
    (void)argv;
#endif
}
