# The CUDA trainer (train_moe.cu) and its GPU test (test_moe_cu.cu). The Makefile runs it as
# `make -f dev/cuda_build.mk TARGET` from the repository root; it also works when included.
#
#   make train_moe_cu          the trainer, PRECISION=BF16 (default) or PRECISION=FP32
#   make train_moe_cu_fp32     the trainer, always fp32 (the build diffed against the CPU at 1e-4)
#   make train_moe_cu_mpi      the trainer with USE_MPI=1 (PRECISION as above): data parallel over NCCL, one
#                              process per GPU, `mpirun -n R ./train_moe_cu_mpi ...` (-b: the global batch)
#   make test_moe_cu           the GPU test in PRECISION; test_moe_cu_fp32 always fp32
#   make cuda-compile-check    every CUDA target, both precisions, warnings as errors (no GPU needed);
#                              the cuDNN trainer and GPU test too where the cuDNN frontend headers are found,
#                              the USE_MPI=1 trainer (both precisions) where an MPI compiler is found
#   make cuda-test             the GPU test in both precisions (needs a GPU; builds dev/ref if missing)
#   make cuda-ci               what `make test` wants: the compile check wherever nvcc exists, and the
#                              GPU test too wherever a GPU answers nvidia-smi
#   make gpu-check-build       every binary dev/gpu_check.sh runs, into GPU_BIN (default out/gpu_bin), for
#                              sm_$(GPU_ARCH) (with an MPI compiler: train_moe_cu_mpi and the MPI runtime it needs
#                              there), packed into one archive GPU_BIN.tar.xz with a MANIFEST (file, bytes, sha256,
#                              build info; also beside it as GPU_BIN.manifest.txt); prints the size that travels to
#                              a GPU machine (the files git sees + the archive) and fails above 56 MiB
#   make gpu-check-size        that size check alone, on the archive as it is
#   make gpu-check             dev/gpu_check.sh (see its header), on the GPU machine: unpacks the archive,
#                              rebuilds data/arith and dev/ref there, then the parts, in 6 minutes on one H100;
#                              PARTS=fp32,bf16 (names or numbers) reruns only some. GPU_CHECK_DRY=1: no GPU parts.
#                              Back: $OUT (else out/gpu_check)/summary.txt and gpu_check.tgz (the logs)
#   make gpu-bench             the benchmark against PyTorch (scripts/bench_gpu.py), a second command (~2.5 min)
#   make cuda-clean
# Variables: NVCC (default nvcc, else /usr/local/cuda/bin/nvcc), GPU_ARCH (the first GPU's compute
# capability from nvidia-smi, else 90 = Hopper), PRECISION (BF16 | FP32), NO_OMP=1 (host code without
# OpenMP), NVCC_EXTRA (more flags), MPICC (below). Needs CUDA >= 12.5 (cublasGemmGroupedBatchedEx) and cuBLAS.
#
# USE_CUDNN=1 (bf16 only): attention through cuDNN 9's fused kernels. libcudnn comes with the CUDA
# install; the header-only C++ frontend does not: `pip install nvidia-cudnn-frontend` puts it in
# <site-packages>/include, found below through .venv/bin/python (the environment `make test` makes),
# else python3; or point CUDNN_FRONTEND_PATH at any directory holding cudnn_frontend.h (e.g. a
# checkout of NVIDIA/cudnn-frontend: its include/). Without the headers nothing needs them: the
# default build has its own attention kernels, and cuda-compile-check says in one line that it left
# the cuDNN builds out.
#
# The USE_MPI=1 builds (train_moe_cu_mpi, its compile check, its gpu-check binary; the others are built
# without it): MPI's compile and link flags from `$(MPICC) -show` (MPICH; Open MPI's --showme also
# works), MPICC by default mpicc on PATH, else .venv/bin/mpicc (PyPI's mpich wheel:
# .venv/bin/python -m pip install mpich==5.0.2); NCCL (-lnccl) from the CUDA install. Without an MPI
# compiler nothing else needs one, and cuda-compile-check says in one line that it left these builds out.

NVCC ?= $(if $(shell command -v nvcc 2>/dev/null),nvcc,$(or $(wildcard /usr/local/cuda/bin/nvcc),nvcc))
NVCC_OK := $(if $(shell command -v $(NVCC) 2>/dev/null),yes,)
GPU_CC := $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '.[:space:]')
GPU_ARCH ?= $(if $(GPU_CC),$(GPU_CC),90)

PRECISION ?= BF16
ifeq ($(PRECISION),FP32)
  PRECISION_FLAG := -DPRECISION_FP32
else ifeq ($(PRECISION),BF16)
  PRECISION_FLAG := -DPRECISION_BF16
else
  $(error PRECISION must be BF16 or FP32, not '$(PRECISION)')
endif

CUDNN_PYTHON := $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
CUDNN_FRONTEND_PATH ?= $(shell $(CUDNN_PYTHON) -c "import importlib.util as u, os; s = u.find_spec('cudnn'); print(os.path.join(os.path.dirname(os.path.dirname(s.origin)), 'include') if s and s.origin else '')" 2>/dev/null)
CUDNN_FOUND := $(if $(CUDNN_FRONTEND_PATH),$(if $(wildcard $(CUDNN_FRONTEND_PATH)/cudnn_frontend.h),yes,),)
CUDNN_BUILD_FLAGS = -DUSE_CUDNN -isystem $(CUDNN_FRONTEND_PATH)
CUDNN_LDLIBS = -lcudnn -lnvrtc
ifeq ($(USE_CUDNN),1)
  ifneq ($(CUDNN_FOUND),yes)
    $(error USE_CUDNN=1: cudnn_frontend.h not found (pip install nvidia-cudnn-frontend, or set CUDNN_FRONTEND_PATH))
  endif
  ifeq ($(PRECISION),FP32)
    $(error USE_CUDNN=1 needs PRECISION=BF16: cuDNN's fused attention has no fp32 kernels)
  endif
  CUDNN_FLAGS = $(CUDNN_BUILD_FLAGS)
  CUDNN_LIBS = $(CUDNN_LDLIBS)
endif

NVCC_FLAGS = -O3 -std=c++17 -arch=sm_$(GPU_ARCH) -Xcompiler -Wall $(NVCC_EXTRA)
ifneq ($(NO_OMP),1)
  NVCC_FLAGS += -Xcompiler -fopenmp -DOMP
endif
NVCC_WERROR = -Xcompiler -Werror -Werror all-warnings
NVCC_LDLIBS = -lcublas -lcublasLt
CUDA_DEPS = train_moe.cu train_moe.c dev/cuda_build.mk $(wildcard dev/moe/*.h dev/moe/*.cuh)
CUDA_CHECK_DIR ?= $(or $(TMPDIR),/tmp)/moe-cuda-check

MPICC ?= $(if $(shell command -v mpicc 2>/dev/null),mpicc,$(or $(wildcard .venv/bin/mpicc),mpicc))
MPI_SHOW := $(shell $(MPICC) -show 2>/dev/null || $(MPICC) --showme 2>/dev/null)
MPI_FOUND := $(if $(filter -lmpi%,$(MPI_SHOW)),yes,)
comma := ,
# the -I/-D of the wrapper's command line; its -L/-l, with each -Wl,x (the rpath) as nvcc's -Xlinker x
MPI_FLAGS = -DUSE_MPI $(filter -I% -D%,$(MPI_SHOW))
MPI_LDLIBS = $(filter -L% -l%,$(MPI_SHOW)) $(patsubst -Wl$(comma)%,-Xlinker %,$(filter -Wl$(comma)%,$(MPI_SHOW))) -lnccl
MPI_NEEDED = @$(if $(MPI_FOUND),true,echo "Error: no MPI compiler: '$(MPICC) -show' gives no -lmpi (.venv/bin/python -m pip install mpich==5.0.2, or set MPICC)" >&2; exit 1)

.PHONY: cuda-compile-check cuda-check-train-bf16 cuda-check-train-fp32 cuda-check-test-bf16 cuda-check-test-fp32 cuda-check-train-cudnn \
        cuda-check-test-cudnn cuda-check-train-mpi cuda-check-train-mpi-fp32 cuda-test cuda-ci cuda-clean gpu-check gpu-check-build \
        gpu-check-size gpu-bench

train_moe_cu: $(CUDA_DEPS)
	$(NVCC) $(NVCC_FLAGS) $(PRECISION_FLAG) $(CUDNN_FLAGS) train_moe.cu $(NVCC_LDLIBS) $(CUDNN_LIBS) -o $@

train_moe_cu_fp32: $(CUDA_DEPS)
	$(NVCC) $(NVCC_FLAGS) -DPRECISION_FP32 train_moe.cu $(NVCC_LDLIBS) -o $@

train_moe_cu_mpi: $(CUDA_DEPS)
	$(MPI_NEEDED)
	$(NVCC) $(NVCC_FLAGS) $(PRECISION_FLAG) $(CUDNN_FLAGS) $(MPI_FLAGS) train_moe.cu $(NVCC_LDLIBS) $(CUDNN_LIBS) $(MPI_LDLIBS) -o $@

test_moe_cu: test_moe_cu.cu $(CUDA_DEPS)
	$(NVCC) $(NVCC_FLAGS) $(PRECISION_FLAG) $(CUDNN_FLAGS) test_moe_cu.cu $(NVCC_LDLIBS) $(CUDNN_LIBS) -o $@

test_moe_cu_fp32: test_moe_cu.cu $(CUDA_DEPS)
	$(NVCC) $(NVCC_FLAGS) -DPRECISION_FP32 test_moe_cu.cu $(NVCC_LDLIBS) -o $@

# compile + link each CUDA program in both precisions with every warning an error (parallel under -j)
cuda-compile-check: cuda-check-train-bf16 cuda-check-train-fp32 cuda-check-test-bf16 cuda-check-test-fp32 \
                    $(if $(CUDNN_FOUND),cuda-check-train-cudnn cuda-check-test-cudnn) \
                    $(if $(MPI_FOUND),cuda-check-train-mpi cuda-check-train-mpi-fp32)
	@echo "cuda-compile-check: train_moe.cu and test_moe_cu.cu compile cleanly for sm_$(GPU_ARCH), bf16 and fp32$(if $(CUDNN_FOUND), and with cuDNN ($(CUDNN_FRONTEND_PATH)))$(if $(MPI_FOUND),; train_moe.cu also with USE_MPI=1 ($(MPICC)))"
	@$(if $(CUDNN_FOUND),true,echo "cuda-compile-check: cuDNN builds (USE_CUDNN=1) skipped: no cudnn_frontend.h (pip install nvidia-cudnn-frontend, or set CUDNN_FRONTEND_PATH)")
	@$(if $(MPI_FOUND),true,echo "cuda-compile-check: MPI builds (USE_MPI=1) skipped: no MPI compiler ('$(MPICC) -show' gives no -lmpi; .venv/bin/python -m pip install mpich==5.0.2, or set MPICC)")
cuda-check-train-bf16: $(CUDA_DEPS)
	@mkdir -p $(CUDA_CHECK_DIR)
	$(NVCC) $(NVCC_FLAGS) $(NVCC_WERROR) -DPRECISION_BF16 train_moe.cu $(NVCC_LDLIBS) -o $(CUDA_CHECK_DIR)/train_moe_cu_bf16
cuda-check-train-fp32: $(CUDA_DEPS)
	@mkdir -p $(CUDA_CHECK_DIR)
	$(NVCC) $(NVCC_FLAGS) $(NVCC_WERROR) -DPRECISION_FP32 train_moe.cu $(NVCC_LDLIBS) -o $(CUDA_CHECK_DIR)/train_moe_cu_fp32
cuda-check-test-bf16: test_moe_cu.cu $(CUDA_DEPS)
	@mkdir -p $(CUDA_CHECK_DIR)
	$(NVCC) $(NVCC_FLAGS) $(NVCC_WERROR) -DPRECISION_BF16 test_moe_cu.cu $(NVCC_LDLIBS) -o $(CUDA_CHECK_DIR)/test_moe_cu_bf16
cuda-check-train-cudnn: $(CUDA_DEPS)
	@mkdir -p $(CUDA_CHECK_DIR)
	$(NVCC) $(NVCC_FLAGS) $(NVCC_WERROR) -DPRECISION_BF16 $(CUDNN_BUILD_FLAGS) train_moe.cu $(NVCC_LDLIBS) $(CUDNN_LDLIBS) -o $(CUDA_CHECK_DIR)/train_moe_cu_cudnn
cuda-check-test-fp32: test_moe_cu.cu $(CUDA_DEPS)
	@mkdir -p $(CUDA_CHECK_DIR)
	$(NVCC) $(NVCC_FLAGS) $(NVCC_WERROR) -DPRECISION_FP32 test_moe_cu.cu $(NVCC_LDLIBS) -o $(CUDA_CHECK_DIR)/test_moe_cu_fp32
cuda-check-test-cudnn: test_moe_cu.cu $(CUDA_DEPS)
	@mkdir -p $(CUDA_CHECK_DIR)
	$(NVCC) $(NVCC_FLAGS) $(NVCC_WERROR) -DPRECISION_BF16 $(CUDNN_BUILD_FLAGS) test_moe_cu.cu $(NVCC_LDLIBS) $(CUDNN_LDLIBS) -o $(CUDA_CHECK_DIR)/test_moe_cu_cudnn
cuda-check-train-mpi: $(CUDA_DEPS)
	$(MPI_NEEDED)
	@mkdir -p $(CUDA_CHECK_DIR)
	$(NVCC) $(NVCC_FLAGS) $(NVCC_WERROR) -DPRECISION_BF16 $(MPI_FLAGS) train_moe.cu $(NVCC_LDLIBS) $(MPI_LDLIBS) -o $(CUDA_CHECK_DIR)/train_moe_cu_mpi
cuda-check-train-mpi-fp32: $(CUDA_DEPS)
	$(MPI_NEEDED)
	@mkdir -p $(CUDA_CHECK_DIR)
	$(NVCC) $(NVCC_FLAGS) $(NVCC_WERROR) -DPRECISION_FP32 $(MPI_FLAGS) train_moe.cu $(NVCC_LDLIBS) $(MPI_LDLIBS) -o $(CUDA_CHECK_DIR)/train_moe_cu_mpi_fp32

# fp32 first (the strict diff), then the default precision. The CPU trainer (for the interchange
# tests) and the reference states (if missing) come from the Makefile.
cuda-test: train_moe_cu train_moe_cu_fp32 test_moe_cu test_moe_cu_fp32
	$(MAKE) --no-print-directory -f Makefile train_moe
	@[ -f dev/ref/manifest.txt ] || $(MAKE) --no-print-directory -f Makefile ref
	./test_moe_cu_fp32 dev/ref ./train_moe_cu_fp32
	./test_moe_cu dev/ref ./train_moe_cu

ifeq ($(NVCC_OK),yes)
cuda-ci: cuda-compile-check $(if $(GPU_CC),cuda-test)
	@$(if $(GPU_CC),true,echo "cuda-ci: no GPU answers nvidia-smi: the GPU test was not run")
else
cuda-ci:
	@echo "cuda-ci: $(NVCC) not found: the CUDA files were not compiled"
endif

# ----------------------------------------------------------------------------------------------------
# gpu-check: the binaries of dev/gpu_check.sh, built where there is no GPU and carried to one as a single
# archive (nothing compiles on the GPU machine's clock). Host code without -march=native (the GPU
# machine's CPU may lack what this one has); device code for sm_$(GPU_ARCH) with line info
# (compute-sanitizer names source lines). SOURCES.sha256 records what they were built from: gpu_check.sh
# fails its binaries row when the sources there differ (and runs them all the same). dev/ref and
# data/arith do not travel: gpu_check.sh rebuilds them there (torch's python, the standard library).
GPU_BIN ?= out/gpu_bin
GPU_BIN_ARCHIVE = $(GPU_BIN).tar.xz
GPU_CHECK_SOURCES = train_moe.c train_moe.cu test_moe_cu.cu $(sort $(wildcard dev/moe/*.h dev/moe/*.cuh dev/cuda/*.cu dev/cuda/*.h))
GPU_BIN_NVCC = $(NVCC) $(NVCC_FLAGS) -lineinfo
GPU_BIN_PROGS = train_moe_cu train_moe_cu_fp32 test_moe_cu test_moe_cu_fp32 $(if $(CUDNN_FOUND),train_moe_cu_cudnn test_moe_cu_cudnn) train_moe \
                $(if $(MPI_FOUND),train_moe_cu_mpi mpi_runtime.tar.xz)

gpu-check-build: $(addprefix $(GPU_BIN)/,$(GPU_BIN_PROGS))
	$(MAKE) --no-print-directory -C dev/cuda NVCC=$(NVCC) GPU_ARCH=$(GPU_ARCH) BIN_DIR=$(abspath $(GPU_BIN))/lab bin
	@$(if $(CUDNN_FOUND),true,rm -f $(GPU_BIN)/train_moe_cu_cudnn $(GPU_BIN)/test_moe_cu_cudnn; \
	    echo "gpu-check-build: no cudnn_frontend.h: no cuDNN binaries (gpu_check.sh reports their parts as not run)")
	@$(if $(MPI_FOUND),true,rm -f $(GPU_BIN)/train_moe_cu_mpi $(GPU_BIN)/mpi_runtime.tar.xz; \
	    echo "gpu-check-build: no MPI compiler ($(MPICC)): no train_moe_cu_mpi (gpu_check.sh reports its parts as not run)")
	@sha256sum $(GPU_CHECK_SOURCES) > $(GPU_BIN)/SOURCES.sha256
	@printf 'sm_%s, %s, cuDNN %s, MPI %s, built %s from %s\n' "$(GPU_ARCH)" "$$($(NVCC) --version | tail -n 1)" \
	    "$(if $(CUDNN_FOUND),yes,no)" "$(if $(MPI_FOUND),yes,no)" "$$(date -u '+%Y-%m-%d %H:%M UTC')" \
	    "$$(git rev-parse --short HEAD 2>/dev/null || echo '?')$$(git diff --quiet HEAD -- $(GPU_CHECK_SOURCES) 2>/dev/null || echo '+changes')" > $(GPU_BIN)/BUILD_INFO
	@cat $(GPU_BIN)/BUILD_INFO
	@bash dev/gpu_check.sh pack $(GPU_BIN) $(GPU_BIN_ARCHIVE)
	@bash dev/gpu_check.sh travel-size $(GPU_BIN_ARCHIVE)
	@echo "gpu-check-build: carry $(GPU_BIN_ARCHIVE) with the tree; there: make gpu-check (dev/cuda/README.md, \"Running the GPU check\")"

gpu-check-size:
	@bash dev/gpu_check.sh travel-size $(GPU_BIN_ARCHIVE)

$(GPU_BIN)/train_moe_cu: $(CUDA_DEPS)
	@mkdir -p $(@D)
	$(GPU_BIN_NVCC) -DPRECISION_BF16 train_moe.cu $(NVCC_LDLIBS) -o $@
$(GPU_BIN)/train_moe_cu_fp32: $(CUDA_DEPS)
	@mkdir -p $(@D)
	$(GPU_BIN_NVCC) -DPRECISION_FP32 train_moe.cu $(NVCC_LDLIBS) -o $@
$(GPU_BIN)/train_moe_cu_cudnn: $(CUDA_DEPS)
	@mkdir -p $(@D)
	$(GPU_BIN_NVCC) -DPRECISION_BF16 $(CUDNN_BUILD_FLAGS) train_moe.cu $(NVCC_LDLIBS) $(CUDNN_LDLIBS) -o $@
$(GPU_BIN)/test_moe_cu: test_moe_cu.cu $(CUDA_DEPS)
	@mkdir -p $(@D)
	$(GPU_BIN_NVCC) -DPRECISION_BF16 test_moe_cu.cu $(NVCC_LDLIBS) -o $@
$(GPU_BIN)/test_moe_cu_fp32: test_moe_cu.cu $(CUDA_DEPS)
	@mkdir -p $(@D)
	$(GPU_BIN_NVCC) -DPRECISION_FP32 test_moe_cu.cu $(NVCC_LDLIBS) -o $@
$(GPU_BIN)/test_moe_cu_cudnn: test_moe_cu.cu $(CUDA_DEPS)
	@mkdir -p $(@D)
	$(GPU_BIN_NVCC) -DPRECISION_BF16 $(CUDNN_BUILD_FLAGS) test_moe_cu.cu $(NVCC_LDLIBS) $(CUDNN_LDLIBS) -o $@
$(GPU_BIN)/train_moe_cu_mpi: $(CUDA_DEPS)
	@mkdir -p $(@D)
	$(GPU_BIN_NVCC) -DPRECISION_BF16 $(MPI_FLAGS) train_moe.cu $(NVCC_LDLIBS) $(MPI_LDLIBS) -o $@
# the MPI runtime train_moe_cu_mpi was linked with, for a GPU machine that has none: the libraries it
# loads from MPI's lib dir (as ldd resolves them here, sub-folders kept) in lib/, the launcher mpiexec
# (and MPICH's hydra_pmi_proxy beside it) in bin/, one archive (~4.5 MB for PyPI's mpich) that
# gpu_check.sh unpacks and runs with LD_LIBRARY_PATH=lib
MPI_LIBDIR = $(patsubst -L%,%,$(firstword $(filter -L%,$(MPI_SHOW))))
MPI_BINDIR = $(dir $(shell command -v $(MPICC) 2>/dev/null))
$(GPU_BIN)/mpi_runtime.tar.xz: $(GPU_BIN)/train_moe_cu_mpi
	@rm -rf $(@D)/mpi_runtime && mkdir -p $(@D)/mpi_runtime/bin $(@D)/mpi_runtime/lib
	cp $(MPI_BINDIR)mpiexec $(wildcard $(MPI_BINDIR)hydra_pmi_proxy) $(@D)/mpi_runtime/bin/
	ldd $< | awk -v d="$(MPI_LIBDIR)/" 'index($$3, d) == 1 { print substr($$3, length(d) + 1) }' | \
	    (cd $(MPI_LIBDIR) && xargs cp --parents -t $(abspath $(@D))/mpi_runtime/lib)
	tar -C $(@D) -cJf $@ mpi_runtime && rm -rf $(@D)/mpi_runtime
$(GPU_BIN)/train_moe: train_moe.c $(wildcard dev/moe/*.h)
	@mkdir -p $(@D)
	$(CC) -O3 -Wall -Wno-unused-function -fopenmp -DOMP train_moe.c -lm -o $@

# on the GPU machine; PARTS (default all) as given on the command line or in the environment
gpu-check:
	@GPU_BIN=$(GPU_BIN) PARTS=$(or $(PARTS),all) bash dev/gpu_check.sh
gpu-bench:
	@GPU_BIN=$(GPU_BIN) bash dev/gpu_check.sh bench

cuda-clean:
	rm -f train_moe_cu train_moe_cu_fp32 train_moe_cu_mpi test_moe_cu test_moe_cu_fp32
	rm -rf $(CUDA_CHECK_DIR)
