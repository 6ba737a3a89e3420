# The README's two commands: `make demo` (the main job) and `make test`. Both install first.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install test demo demo-full clean-install

$(STAMP): scripts/install.sh scripts/build_detectron2.py constraints.txt setup.py
	bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m slurm pipeline --config configs/pipeline/demo.yaml

# The main job over three seeds (each its own pretraining and supervised control); reuses seed 0 of `make demo`.
demo-full: $(STAMP)
	$(PY) -m slurm pipeline --config configs/pipeline/demo.yaml "seeds=[0,1,2]"

clean-install:
	rm -rf .venv
