# ConceptSmith developer entry points. Every target installs what it needs and is idempotent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test lint demo bench chromium

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install --quiet "torch>=2.4"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) chromium

# Headless Chromium renders the HTML reports in tests/test_report_html.py. Installed with apt only where that needs
# no prompt (root); elsewhere the test fails and says how to install it.
CHROMIUM := $(shell command -v chromium || command -v chromium-browser || command -v google-chrome)
chromium:
ifeq ($(CHROMIUM),)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else \
	  echo "note: tests/test_report_html.py needs Chromium: sudo apt-get install -y chromium"; \
	fi
endif

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/conceptsmith bench shapes-smoke --out out/demo

bench: install
	$(PY) bench/closed_form.py
	$(PY) bench/training_erasure.py

lint: install
	$(VENV)/bin/ruff check conceptsmith erasure customization evaluation tests bench
