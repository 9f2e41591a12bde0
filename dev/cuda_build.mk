# The CUDA trainer (train_moe.cu) and its GPU test (test_moe_cu.cu). The Makefile runs it as
# `make -f dev/cuda_build.mk TARGET` from the repository root; it also works when included.
#
#   make train_moe_cu          the trainer, PRECISION=BF16 (default) or PRECISION=FP32
#   make train_moe_cu_fp32     the trainer, always fp32 (the build diffed against the CPU at 1e-4)
#   make test_moe_cu           the GPU test in PRECISION; test_moe_cu_fp32 always fp32
#   make cuda-compile-check    every CUDA target, both precisions, warnings as errors (no GPU needed)
#   make cuda-test             the GPU test in both precisions (needs a GPU; builds dev/ref if missing)
#   make cuda-ci               what `make test` wants: the compile check wherever nvcc exists, and the
#                              GPU test too wherever a GPU answers nvidia-smi
#   make cuda-clean
# Variables: NVCC (default nvcc, else /usr/local/cuda/bin/nvcc), GPU_ARCH (the first GPU's compute
# capability from nvidia-smi, else 90 = Hopper), PRECISION (BF16 | FP32), NO_OMP=1 (host code without
# OpenMP), NVCC_EXTRA (more flags). Needs CUDA >= 12.5 (cublasGemmGroupedBatchedEx) and cuBLAS.
#
# USE_CUDNN=1 (bf16 only): attention through cuDNN 9's fused kernels. libcudnn comes with the CUDA
# install; the header-only C++ frontend does not: `pip install nvidia-cudnn-frontend` puts it in
# <site-packages>/include, found below; or point CUDNN_FRONTEND_PATH at any directory holding
# cudnn_frontend.h (e.g. a checkout of NVIDIA/cudnn-frontend: its include/). Without the headers
# nothing needs them: the default build has its own attention kernels. The frontend headers are heavy
# (a cuDNN build takes ~3 minutes on 2 cores), so cuda-compile-check adds the cuDNN trainer only
# where they are found.

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

CUDNN_FRONTEND_PATH ?= $(shell python3 -c "import importlib.util as u, os; s = u.find_spec('cudnn'); print(os.path.join(os.path.dirname(os.path.dirname(s.origin)), 'include') if s and s.origin else '')" 2>/dev/null)
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
CUDA_DEPS = train_moe.cu train_moe.c dev/cuda_build.mk
CUDA_CHECK_DIR ?= $(or $(TMPDIR),/tmp)/moe-cuda-check

.PHONY: cuda-compile-check cuda-check-train-bf16 cuda-check-train-fp32 cuda-check-test-bf16 cuda-check-test-fp32 cuda-check-train-cudnn \
        cuda-test cuda-ci cuda-clean

train_moe_cu: $(CUDA_DEPS)
	$(NVCC) $(NVCC_FLAGS) $(PRECISION_FLAG) $(CUDNN_FLAGS) train_moe.cu $(NVCC_LDLIBS) $(CUDNN_LIBS) -o $@

train_moe_cu_fp32: $(CUDA_DEPS)
	$(NVCC) $(NVCC_FLAGS) -DPRECISION_FP32 train_moe.cu $(NVCC_LDLIBS) -o $@

test_moe_cu: test_moe_cu.cu $(CUDA_DEPS)
	$(NVCC) $(NVCC_FLAGS) $(PRECISION_FLAG) $(CUDNN_FLAGS) test_moe_cu.cu $(NVCC_LDLIBS) $(CUDNN_LIBS) -o $@

test_moe_cu_fp32: test_moe_cu.cu $(CUDA_DEPS)
	$(NVCC) $(NVCC_FLAGS) -DPRECISION_FP32 test_moe_cu.cu $(NVCC_LDLIBS) -o $@

# compile + link each CUDA program in both precisions with every warning an error (parallel under -j)
cuda-compile-check: cuda-check-train-bf16 cuda-check-train-fp32 cuda-check-test-bf16 cuda-check-test-fp32 \
                    $(if $(CUDNN_FOUND),cuda-check-train-cudnn)
	@echo "cuda-compile-check: train_moe.cu and test_moe_cu.cu compile cleanly for sm_$(GPU_ARCH), bf16 and fp32$(if $(CUDNN_FOUND),, (cuDNN variant skipped: no cudnn_frontend.h))"
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

cuda-clean:
	rm -f train_moe_cu train_moe_cu_fp32 test_moe_cu test_moe_cu_fp32
	rm -rf $(CUDA_CHECK_DIR)
