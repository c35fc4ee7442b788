# `make demo`: the whole pipeline on a generated CBIS-DDSM-shaped set (CPU, minutes).
# `make test`: lint and the test suite. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data/synthetic
DEMO_FLAGS ?= --backbone resnet18 --decoder-channels 64 --size 256 160 --epochs 30 --batch-size 8 \
              --lr 1e-3 --workers 2

.PHONY: demo test lint benchmark study clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) synthetic.py --out $(DATA) --overwrite
	$(PY) main_retrieval.py --data-root $(DATA) --out-dir csv --val-fraction 0.2
	rm -f checkpoint/*.pth checkpoint/log.csv
	$(PY) Train_deep_labv3+.py --csv-dir csv --checkpoint-dir checkpoint $(DEMO_FLAGS)
	$(PY) Test_deep_labV3+.py --checkpoint checkpoint/best.pth --csv csv/test.csv --out results/demo

lint: $(VENV)/.installed
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest

benchmark: $(VENV)/.installed
	$(PY) benchmark.py --quick

# The resolution study of README.md (realistic synthetic set; 37 minutes on 2 CPU cores).
study: $(VENV)/.installed
	$(PY) study.py --out runs/study --overwrite

clean:
	rm -rf data cache results checkpoint/*.pth checkpoint/log.csv csv/*.csv csv/*.json
