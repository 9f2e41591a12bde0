// A main for the fuzz harnesses without libFuzzer: runs the harness once on every file named on the
// command line (or in the directories named), as libFuzzer does for a corpus. With gcc's sanitizers
// it replays the committed corpus and the regression inputs where clang is not installed.
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerInitialize(int* argc, char*** argv);
int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

static FILE* err; // stderr before the harness quiets it

static int replay_file(const char* path) {
    FILE* fp = fopen(path, "rb");
    if (!fp) { fprintf(err, "replay: cannot open %s\n", path); exit(1); }
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    uint8_t* buf = (uint8_t*)malloc(n ? n : 1);
    if (!buf || fread(buf, 1, n, fp) != (size_t)n) { fprintf(err, "replay: cannot read %s\n", path); exit(1); }
    fclose(fp);
    LLVMFuzzerTestOneInput(buf, n);
    free(buf);
    return 1;
}

int main(int argc, char** argv) {
    FILE* out = stdout;
    err = stderr;
    LLVMFuzzerInitialize(&argc, &argv);
    int count = 0;
    for (int i = 1; i < argc; i++) {
        struct stat sb;
        if (stat(argv[i], &sb) != 0) { fprintf(err, "replay: no such input %s\n", argv[i]); return 1; }
        if (!S_ISDIR(sb.st_mode)) { count += replay_file(argv[i]); continue; }
        DIR* d = opendir(argv[i]);
        struct dirent* e;
        while (d && (e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.') continue;
            char p[4096];
            snprintf(p, sizeof p, "%s/%s", argv[i], e->d_name);
            count += replay_file(p);
        }
        if (d) closedir(d);
    }
    fprintf(out, "replayed %d inputs\n", count);
    return 0;
}
