# `make demo`: the whole pipeline on a generated CBIS-DDSM-shaped set (CPU, minutes); run again,
# every step replaces its previous output. `make test`: lint and the test suite. Both create
# .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data/synthetic
DEMO_FLAGS ?= --backbone resnet18 --decoder-channels 64 --size 256 160 --epochs 30 --batch-size 8 \
              --lr 1e-3 --workers 2
DEMO_DATA_FLAGS ?=
DEMO_TEST_FLAGS ?=

.PHONY: demo test lint flags benchmark study clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# tests/test_demo.py runs these commands twice (make -n demo) with tiny DEMO_*FLAGS.
demo: $(VENV)/.installed
	$(PY) synthetic.py --out $(DATA) --overwrite $(DEMO_DATA_FLAGS)
	$(PY) main_retrieval.py --data-root $(DATA) --out-dir csv --val-fraction 0.2
	$(PY) Train_deep_labv3+.py --csv-dir csv --checkpoint-dir checkpoint $(DEMO_FLAGS) --overwrite
	$(PY) Test_deep_labV3+.py --checkpoint checkpoint/best.pth --csv csv/test.csv --out results/demo $(DEMO_TEST_FLAGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest

# docs/flags.md from every script's --help (a test fails when it is out of date).
flags: $(VENV)/.installed
	$(PY) helptext.py

benchmark: $(VENV)/.installed
	$(PY) benchmark.py --quick

# The resolution study of docs/study.md (realistic synthetic set; 29 minutes on 2 CPU cores).
study: $(VENV)/.installed
	$(PY) study.py run --out runs/study --overwrite

# Everything the demo wrote; checkpoint/ and csv/ keep only their .gitkeep.
clean:
	rm -rf data cache results checkpoint/* csv/*.csv csv/*.json
