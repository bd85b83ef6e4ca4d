# sam3_nn: `make all` installs and builds the CPU library; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TARGET ?= llvm
DTYPE  ?=
MODEL  ?=
OUT    ?= dist
ROPE   ?=
ARCH   ?=
PARTS  ?=
# apache-tvm 0.27.0.post1 is ABI-compatible with this tvm-ffi only: 0.1.15.x segfaults
# in ToJSONGraph (every sch.tensorize). See docs/targets.md.
TVM_FFI_PIN := apache-tvm-ffi==0.1.14.post1
# the original SAM 3 package, the tests' reference (tests/original_ref.py); --no-deps: its
# timm / torchvision / triton / pycocotools do not install beside the CPU torch (stand-ins)
SAM3_ORIGINAL_PIN := sam3==0.1.4

.PHONY: all install compile deps-metal deps-lld deps-cuda list-targets app test bench clean

all: compile

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps '$(SAM3_ORIGINAL_PIN)'
	touch $@

$(VENV)/.tvm-ffi-pinned: $(VENV)/.installed Makefile
	$(PY) -m pip install -q '$(TVM_FFI_PIN)'
	touch $@

# ld.lld / ld64.lld (LLVM 19) link the cross-built libraries (metal, llvm-macos, llvm-aarch64).
# Best effort in `install`: skipped without apt-get or root; `make deps-metal` insists.
LD64 := $(firstword $(shell command -v ld64.lld-19 ld64.lld 2>/dev/null))
deps-lld:
	@if [ -z "$(LD64)" ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q lld-19 >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
	   apt-get install -y -q lld-19 >/dev/null 2>&1)) || echo "note: apt-get install lld-19 failed"; fi

deps-metal: deps-lld
	@command -v ld64.lld-19 >/dev/null 2>&1 || command -v ld64.lld >/dev/null 2>&1 || \
	  { echo "error: ld64.lld not found: install lld-19 (Debian/Ubuntu: sudo apt-get install lld-19)"; exit 1; }

# CUTLASS headers for the cuda targets' GEMM kernels (headers only: --no-deps skips
# cuda-python & co.); CPU builds never need it. Same pin as pyproject's [cuda] extra.
CUTLASS_PIN := nvidia-cutlass==4.2.0.0
$(VENV)/.cutlass: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps '$(CUTLASS_PIN)'
	touch $@

deps-cuda: $(VENV)/.cutlass

install: $(VENV)/.installed $(VENV)/.tvm-ffi-pinned
	-@$(MAKE) --no-print-directory deps-lld

compile: install $(if $(filter metal metal-ios llvm-macos llvm-aarch64,$(TARGET)),deps-metal) \
  $(if $(filter cuda%,$(TARGET)),deps-cuda)
	$(PY) compile.py --target $(TARGET) --output $(OUT) \
	  $(if $(DTYPE),--dtype $(DTYPE)) $(if $(MODEL),--model $(MODEL)) $(if $(ROPE),--rope-mode $(ROPE)) \
	  $(if $(ARCH),--arch $(ARCH)) $(if $(PARTS),--parts $(PARTS))

list-targets: install
	$(PY) compile.py --list-targets

# The native app (app/README.md): C++ over TVM's runtime, TVM found through this environment's
# Python; system libjpeg, libpng, zlib and ICU (Debian: libjpeg62-turbo-dev libpng-dev
# zlib1g-dev libicu-dev).
APP_BUILD ?= app/build
app: install
	cmake -S app -B $(APP_BUILD) -DSAM3_PYTHON=$(abspath $(PY))
	cmake --build $(APP_BUILD) -j$$(nproc 2>/dev/null || echo 2)

test: install app
	$(PY) -m pytest -q tests

# CPU: our llvm library vs transformers' Sam3Model, full size (bench/pipeline.py --help; GPU: README)
BENCH_ARGS ?=
bench: install
	$(PY) bench/pipeline.py --device cpu $(BENCH_ARGS)

clean:
	rm -rf $(OUT) build *.egg-info $(APP_BUILD)
