# Everything installs from nothing into .venv: torch first (the pinned build lies on this
# machine's disk; any other version downloads gigabytes), then the package with its test extras.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench clean digits-model

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=10 tests

demo: $(STAMP)
	$(VENV)/bin/ray-dafusion demo

bench: $(STAMP)
	$(PY) benchmarks/augment_overhead.py
	$(PY) benchmarks/train_overhead.py

# Rebuild the shipped `digits` model (ray_dafusion/assets/digits) with the commands its manifest records
# (models.DIGITS_COMMANDS): about 30 minutes on one CPU core.
digits-model: $(STAMP)
	$(PY) -c "from ray_dafusion.sample_data import write_digits; write_digits('runs/digits-pretrain', half='pretrain', labelled=False)"
	$(VENV)/bin/ray-dafusion pretrain --config jobs/configs/pretrain_digits.yaml
	$(PY) -c "from ray_dafusion.models import ship_model, DIGITS_COMMANDS; ship_model('runs/digits-model', 'digits', DIGITS_COMMANDS)"

clean:
	rm -rf $(VENV) runs .pytest_cache
