# moe.c: make train (default run), make test (everything CI runs)
CC ?= gcc
CFLAGS = -O3 -Wall -Wextra -Wno-unused-parameter -Wno-unused-function
LDLIBS = -lm
PYTHON_REF ?= $(shell [ -x /usr/bin/python3 ] && /usr/bin/python3 -c "import torch" 2>/dev/null && echo /usr/bin/python3 || echo python3)

# -march=native where the compiler takes it
ifeq ($(shell $(CC) -march=native -x c -c /dev/null -o /dev/null 2>/dev/null && echo ok),ok)
  CFLAGS += -march=native
endif
# OpenMP unless NO_OMP=1
ifeq ($(NO_OMP),1)
  $(info OpenMP off (NO_OMP=1))
else ifeq ($(shell echo 'int main(){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo ok),ok)
  CFLAGS += -fopenmp -DOMP
else
  $(info OpenMP not found: building single-threaded)
endif

.PHONY: all train test test-hf ref cuda-check clean

all: train_moe test_moe

train_moe: train_moe.c
	$(CC) $(CFLAGS) $< $(LDLIBS) -o $@

test_moe: test_moe.c train_moe.c
	$(CC) $(CFLAGS) $< $(LDLIBS) -o $@

# the default job: the bundled data, a small MoE, under 10 minutes on 2 cores
train: train_moe
	./train_moe -o out/default

# the PyTorch reference states that test_moe checks against (never stale: rebuilt every time)
ref:
	$(PYTHON_REF) dev/moe_ref.py --outdir dev/ref

test: test_moe train_moe ref
	$(MAKE) --no-print-directory cuda-check
	$(MAKE) --no-print-directory test-hf
	python3 scripts/test_sweep.py
	./test_moe dev/ref

# HF interchange: export -> MixtralForCausalLM logits == train_moe's (where transformers is installed)
test-hf: train_moe
	@if python3 -c "import transformers, torch" 2>/dev/null; then python3 scripts/test_hf.py --require-c; \
	else echo "SKIP test-hf: transformers is not installed (pip install transformers safetensors torch)"; fi

# CUDA: compile everything with warnings as errors wherever nvcc exists; run the GPU tests where a GPU exists
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
cuda-check:
	@if [ -z "$(NVCC)" ]; then echo "SKIP cuda-check: no nvcc"; \
	else $(MAKE) --no-print-directory -j2 -f dev/cuda_build.mk NVCC=$(NVCC) cuda-compile-check && \
	     $(MAKE) --no-print-directory -j2 -C dev/cuda NVCC=$(NVCC) compile-check && \
	     if nvidia-smi >/dev/null 2>&1; then $(MAKE) --no-print-directory -f dev/cuda_build.mk NVCC=$(NVCC) cuda-test; \
	     else echo "no GPU here: CUDA code compiled, not run"; fi; fi

clean:
	rm -f train_moe test_moe
	$(MAKE) --no-print-directory -f dev/cuda_build.mk cuda-clean
	$(MAKE) --no-print-directory -C dev/cuda clean
