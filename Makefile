# Two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first (torch first: the CPU wheel
# on disk; any other torch spec would pull several GB of CUDA packages).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunepipe-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

test: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest

# The demo: CPT -> SFT -> DPO on the embedded tiny model, tracked in MLflow, champion registered. One torch thread:
# the tiny model's matrices are too small to gain from more, and a busy 2-core machine loses a lot with them.
demo: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV)/bin/tunepipe run

clean:
	rm -rf $(VENV) .pytest_cache
