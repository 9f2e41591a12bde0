# moe.c: make train (default run), make test (everything CI runs)
CC ?= gcc
CFLAGS = -O3 -fno-math-errno -Wall -Wextra -Wno-unused-parameter -Wno-unused-function
LDLIBS = -lm
# the Python of the tests and the reference: .venv/ (git ignores it), made once by dev/setup_venv.sh
VENV ?= .venv
PY = $(VENV)/bin/python

# -march=native where the compiler takes it
ifeq ($(shell $(CC) -march=native -x c -c /dev/null -o /dev/null 2>/dev/null && echo ok),ok)
  CFLAGS += -march=native
  # on AVX-512 processors GCC's tuning keeps vectors at 256 bits; the GEMM micro-kernel's 8 x 32
  # tile is 16 accumulators at 512 bits (32 at 256, more than the registers hold)
  ifeq ($(shell $(CC) -march=native -dM -E -x c /dev/null 2>/dev/null | grep -c __AVX512F__),1)
    CFLAGS += -mprefer-vector-width=512
  endif
endif
# OpenMP unless NO_OMP=1
ifeq ($(NO_OMP),1)
  $(info OpenMP off (NO_OMP=1))
else ifeq ($(shell echo 'int main(){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo ok),ok)
  CFLAGS += -fopenmp -DOMP
else
  $(info OpenMP not found: building single-threaded)
endif

# USE_BLAS=1 builds (train_moe_blas, test_moe_blas): every matmul through OpenBLAS's cblas_sgemm
# (Debian: apt-get install libopenblas-dev); make test also runs the C suite on them where it is installed
# OpenBLAS's OpenMP build where Debian has it (libopenblas0-openmp): it shares the trainer's OpenMP
# threads, where the pthread build's own threads would spin against them (measured 9x slower)
BLAS_FLAGS = -DUSE_BLAS
BLAS_OMP_DIR = /usr/lib/x86_64-linux-gnu/openblas-openmp
BLAS_LIBS = $(if $(wildcard $(BLAS_OMP_DIR)/libopenblas.so.0),-L$(BLAS_OMP_DIR) -Wl$(comma)-rpath$(comma)$(BLAS_OMP_DIR) -l:libopenblas.so.0,-lopenblas)
comma := ,
HAVE_BLAS := $(shell echo '#include <cblas.h>' | $(CC) -x c -E - >/dev/null 2>&1 && echo 'int main(){return 0;}' | $(CC) -x c - -lopenblas -o /dev/null 2>/dev/null && echo yes)

.PHONY: all train help train_moe_cu train_moe_cu_fp32 train_moe_cu_mpi test_moe_cu test_moe_cu_fp32 gpu-bench arith grpo-demo study study3 test-data test venv test-hf test-blas test-dist bench-dist bench-gemm ref test-sanitize fuzz-smoke fuzz cuda-check gpu-check gpu-check-build clean

all: train_moe test_moe

help:
	@echo "moe.c: mixture-of-experts training in C and CUDA (README.md)"
	@echo "  make train          the default run: a small MoE on the bundled data (out/default, ~7 min on 2 cores)"
	@echo "  make test           everything CI runs (first time: the Python environment .venv from PyPI)"
	@echo "  make train_moe      the CPU trainer (./train_moe -h lists its flags)"
	@echo "  make train_moe_blas the CPU trainer with OpenBLAS's sgemm (Debian: libopenblas-dev)"
	@echo "  make train_moe_mpi  the CPU trainer across processes (mpirun -np R ./train_moe_mpi ...)"
	@echo "  make train_moe_cu   the CUDA trainer (PRECISION=FP32 for fp32, USE_CUDNN=1 for cuDNN attention)"
	@echo "  make grpo-demo      pre-train on arithmetic, then GRPO (~20 min on 2 cores)"
	@echo "  make study          the sparsity study in miniature, second design, in resumable chunks (HOURS=2.5)"
	@echo "  make study3         its third design: the gate, then the rest in resumable chunks (HOURS=2.5)"
	@echo "  make gpu-check-build / gpu-check   build here every GPU binary / run them all on a GPU machine"
	@echo "developer targets:"
	@echo "  make test-hf test-dist test-blas test-sanitize fuzz-smoke test-data   parts of make test"
	@echo "  make ref            the PyTorch reference states in dev/ref (dev/moe_ref.py)"
	@echo "  make cuda-check     compile every CUDA file, warnings as errors (and run the GPU tests on a GPU)"
	@echo "  make bench-gemm bench-dist   benchmarks: the GEMM against cblas, processes R = 1, 2"
	@echo "  make fuzz           long fuzzing of every file reader (FUZZ_SECONDS=600)"
	@echo "  make -C dev/cuda    the kernel lab (dev/cuda/README.md)"
	@echo "  make clean"

# the CUDA trainer and its GPU test, built by dev/cuda_build.mk (its header lists the options)
train_moe_cu train_moe_cu_fp32 train_moe_cu_mpi test_moe_cu test_moe_cu_fp32 gpu-bench:
	$(MAKE) --no-print-directory -f dev/cuda_build.mk $@

# the trainer is train_moe.c and the headers it includes from dev/moe/
MOE_SRC = train_moe.c $(wildcard dev/moe/*.h)

train_moe: $(MOE_SRC)
	$(CC) $(CFLAGS) $< $(LDLIBS) -o $@

test_moe: test_moe.c $(MOE_SRC)
	$(CC) $(CFLAGS) $< $(LDLIBS) -o $@

train_moe_blas: $(MOE_SRC)
	$(CC) $(CFLAGS) $(BLAS_FLAGS) $< $(BLAS_LIBS) $(LDLIBS) -o $@
test_moe_blas: test_moe.c $(MOE_SRC)
	$(CC) $(CFLAGS) $(BLAS_FLAGS) $< $(BLAS_LIBS) $(LDLIBS) -o $@

# USE_MPI: train_moe_mpi, training across processes (mpirun -np R ./train_moe_mpi ..., dev/DISTRIBUTED.md).
# MPICC: an MPI compiler wrapper on PATH, else MPICH's from PyPI in .venv (make venv installs it)
MPICC ?= $(or $(shell command -v mpicc 2>/dev/null),$(wildcard $(VENV)/bin/mpicc))
MPIEXEC ?= $(or $(wildcard $(dir $(MPICC))mpiexec),mpiexec)
train_moe_mpi: $(MOE_SRC)
	@if [ -z "$(MPICC)" ]; then echo "train_moe_mpi: no MPI compiler (mpicc): make venv installs MPICH into $(VENV)"; exit 1; fi
	$(MPICC) $(CFLAGS) -DUSE_MPI $< $(LDLIBS) -o $@

# the default job: the bundled data, a small MoE, under 10 minutes on 2 cores
train: train_moe
	./train_moe -o out/default

# the arithmetic task of the GRPO demo (generated, seconds; git ignores the .bin files)
ARITH_DATA = data/arith/arith_train_000.bin data/arith/arith_val_000.bin data/arith/arith_rl.bin data/arith/arith_eval.bin
$(ARITH_DATA) &: data/build_arith.py data/build_default.py data/build_tasks.py
	python3 data/build_arith.py > /dev/null
arith: $(ARITH_DATA)

# GRPO in miniature: pre-train on data/arith, then GRPO from its last checkpoint (~20 min on 2 cores)
grpo-demo: train_moe arith
	bash scripts/grpo_demo.sh

# the sparsity study in miniature: resumable chunks of HOURS (default 2.5) hours, figures and verdict
# in scripts/sweep_results/study/
study: train_moe venv
	bash scripts/study.sh
# the third design (scripts/sweep_results/study_v3/): the gate, then the rest in chunks of HOURS hours
study3: train_moe venv
	bash scripts/study3.sh

# everything: the Python environment (first time only), the CUDA compile check, the HF interchange,
# the sweep scripts and figures, the C suite against PyTorch, the C suite again under ASan+UBSan, and
# a short run of every fuzz harness
test: venv test_moe train_moe ref
	$(MAKE) --no-print-directory cuda-check
	$(PY) scripts/test_gpu_check.py
	$(MAKE) --no-print-directory test-hf
	$(if $(filter yes,$(HAVE_BLAS)),$(MAKE) --no-print-directory train_moe_blas)
	$(PY) scripts/test_sweep.py --require-all
	$(PY) scripts/test_study_report.py
	$(MAKE) --no-print-directory test-data
	$(MAKE) --no-print-directory test-dist
	./test_moe dev/ref
	$(PY) dev/moe_ref.py --check-rollouts dev/ref/e6_rollouts.bin --outdir dev/ref
	$(MAKE) --no-print-directory test-blas
	$(MAKE) --no-print-directory test-sanitize
	$(MAKE) --no-print-directory fuzz-smoke

venv:
	@dev/setup_venv.sh

# the study's data is reproducible: build_study.py at its defaults writes exactly the committed
# manifest (every file's sha256 in it), so the committed study results match what `make study` builds
test-data:
	@d=$$(mktemp -d) && python3 data/build_study.py --out $$d > /dev/null && \
	if cmp -s $$d/manifest.json data/study/manifest.json; then echo "test-data: build_study.py rebuilds data/study/manifest.json byte for byte"; rm -rf $$d; \
	else echo "test-data: FAILED: build_study.py's output differs from data/study/manifest.json"; diff $$d/manifest.json data/study/manifest.json | head; rm -rf $$d; exit 1; fi

# across processes: data and expert parallel runs under mpiexec equal the one-process run (scripts/test_dist.py)
test-dist: train_moe train_moe_mpi
	$(PY) scripts/test_dist.py --mpiexec $(MPIEXEC) --trainer ./train_moe --mpi-trainer ./train_moe_mpi

# step time and tokens/s of R = 1, 2 processes on this machine's cores, OMP threads split (a benchmark)
bench-dist: train_moe train_moe_mpi
	$(PY) scripts/bench_dist.py --mpiexec $(MPIEXEC)

# the products of one training step on the model's shapes: the built-in GEMM vs cblas_sgemm (a benchmark;
# OpenBLAS's AVX-512 kernels on AVX-512 machines, as scripts/bench_cpu.py runs the BLAS build). BENCH_GEMM_ARGS:
# L C E K F B T [repeats], default E8's
BENCH_GEMM_ARGS ?=
dev/bench_gemm: dev/bench_gemm.c $(MOE_SRC)
	$(CC) $(CFLAGS) $< $(BLAS_LIBS) $(LDLIBS) -o $@
bench-gemm: dev/bench_gemm
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(if $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo y),OPENBLAS_CORETYPE=$${OPENBLAS_CORETYPE:-SkylakeX}) dev/bench_gemm $(BENCH_GEMM_ARGS)

# the C suite on the OpenBLAS build, where OpenBLAS is installed
test-blas: dev/ref/manifest.txt
ifeq ($(HAVE_BLAS),yes)
	$(MAKE) --no-print-directory test_moe_blas train_moe_blas dev/bench_gemm
	./test_moe_blas dev/ref ./train_moe_blas
	OMP_NUM_THREADS=2 dev/bench_gemm 2 64 8 2 96 4 32 0
	OMP_NUM_THREADS=2 dev/bench_gemm 2 64 6 3 40 3 16 0
else
	@echo "test-blas: OpenBLAS not installed (Debian: apt-get install libopenblas-dev): the USE_BLAS=1 build was not tested"
endif

# the PyTorch reference states that test_moe checks against (never stale: make test rebuilds them;
# the suites run on their own, test-blas and test-sanitize, make them only if missing)
ref: venv
	$(PY) dev/moe_ref.py --outdir dev/ref
dev/ref/manifest.txt:
	$(MAKE) --no-print-directory ref

# HF interchange: export -> MixtralForCausalLM logits == train_moe's
test-hf: venv train_moe
	$(PY) scripts/test_hf.py --require-c --require-hf

# the whole C suite, and every train_moe run it drives, built with AddressSanitizer (+ LeakSanitizer)
# and UndefinedBehaviorSanitizer: a report in test_moe_san itself ends it with exit code 86 (ASan,
# LSan) or 87 (UBSan); one in a train_moe_san run it drives is found in that run's output and fails
# the suite (run_cmd in train_moe.c)
SAN_FLAGS = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
SAN_ENV = ASAN_OPTIONS=detect_leaks=1:exitcode=86 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:exitcode=87
train_moe_san: $(MOE_SRC)
	$(CC) $(CFLAGS) $(SAN_FLAGS) $< $(LDLIBS) -o $@
test_moe_san: test_moe.c $(MOE_SRC)
	$(CC) $(CFLAGS) $(SAN_FLAGS) $< $(LDLIBS) -o $@
test-sanitize: test_moe_san train_moe_san dev/ref/manifest.txt
	$(SAN_ENV) ./test_moe_san dev/ref ./train_moe_san
	@echo "test-sanitize: clean (no ASan, LSan or UBSan report from test_moe_san or the train_moe_san runs it drove)"

# fuzzing of every file reader (dev/fuzz): fuzz-smoke replays the committed corpus and regression
# inputs under ASan+UBSan, then runs each libFuzzer harness FUZZ_SECONDS (default 30);
# `make fuzz FUZZ_SECONDS=600` for a long run (dev/fuzz/Makefile)
fuzz-smoke:
	$(MAKE) --no-print-directory -C dev/fuzz replay smoke
fuzz:
	$(MAKE) --no-print-directory -C dev/fuzz run

# CUDA: compile everything with warnings as errors wherever nvcc exists; run the GPU tests where a GPU exists
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
cuda-check:
	@if [ -z "$(NVCC)" ]; then echo "SKIP cuda-check: no nvcc"; \
	else $(MAKE) --no-print-directory -j2 -f dev/cuda_build.mk NVCC=$(NVCC) cuda-compile-check && \
	     $(MAKE) --no-print-directory -j2 -C dev/cuda NVCC=$(NVCC) compile-check && \
	     if nvidia-smi >/dev/null 2>&1; then $(MAKE) --no-print-directory -f dev/cuda_build.mk NVCC=$(NVCC) cuda-test; \
	     else echo "no GPU here: CUDA code compiled, not run"; fi; fi

# all CUDA verification and measurement in one command, on a machine with an NVIDIA GPU (dev/gpu_check.sh)
# (gpu-check-build: every binary it needs, built here for sm_90 into GPU_BIN, to carry to a GPU machine)
gpu-check:
	$(MAKE) --no-print-directory -f dev/cuda_build.mk gpu-check
gpu-check-build:
	$(MAKE) --no-print-directory -f dev/cuda_build.mk gpu-check-build

clean:
	rm -f train_moe test_moe train_moe_san test_moe_san train_moe_blas test_moe_blas train_moe_mpi dev/bench_gemm
	$(MAKE) --no-print-directory -C dev/fuzz clean
	$(MAKE) --no-print-directory -f dev/cuda_build.mk cuda-clean
	$(MAKE) --no-print-directory -C dev/cuda clean
