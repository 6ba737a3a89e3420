# The README's two commands: `make demo` (the main job) and `make test`. Both install first.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install test demo demo-full clean-install

$(STAMP): scripts/install.sh scripts/build_detectron2.py scripts/build_target.py constraints.txt setup.py
	bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest tests

# FP32=1: the same numbers on any x86-64 CPU with AVX2: fp32 pretraining and the AVX2 kernels of ATen, oneDNN,
# MKL and OpenBLAS (common/numerics.py), into runs/demo-fp32; every job runs on one thread either way
# (configs/slurm/local.yaml). Without it, a CPU with native bf16 pretrains in bf16 (faster) and its numbers differ
# from the table's.
FP32 ?= 0
ifeq ($(FP32),1)
DEMO_ENV := env ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2 OPENBLAS_CORETYPE=Haswell
DEMO_ARGS := root=runs/demo-fp32 "pretrain_overrides=[train.cpu_amp=false]"
endif

demo: $(STAMP)
	$(DEMO_ENV) $(PY) -m slurm pipeline --config configs/pipeline/demo.yaml $(DEMO_ARGS)

# The main job over three seeds (each its own pretraining and supervised control); reuses seed 0 of `make demo`.
demo-full: $(STAMP)
	$(DEMO_ENV) $(PY) -m slurm pipeline --config configs/pipeline/demo.yaml $(DEMO_ARGS) "seeds=[0,1,2]"

clean-install:
	rm -rf .venv
