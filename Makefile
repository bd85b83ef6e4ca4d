# sam3_nn: `make all` installs and builds the CPU library; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TARGET ?= llvm
DTYPE  ?=
MODEL  ?=
OUT    ?= dist
ROPE   ?=

.PHONY: all install compile test test-slow bench clean

all: compile

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

compile: install
	$(PY) compile.py --target $(TARGET) --output $(OUT) \
	  $(if $(DTYPE),--dtype $(DTYPE)) $(if $(MODEL),--model $(MODEL)) $(if $(ROPE),--rope-mode $(ROPE))

test: install
	$(PY) -m pytest -q tests

test-slow: install
	$(PY) -m pytest -q -m slow tests

bench: install
	$(PY) bench/vision_cpu.py

clean:
	rm -rf $(OUT) build *.egg-info
