# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# mediapipe's own pins clash with numpy 2; its run-time needs are in pyproject.toml.
	# open_clip_torch is only read for CLIP's BPE vocabulary (it would pull torchvision).
	$(BIN)/python -m pip install --quiet --no-deps mediapipe==0.10.21 open_clip_torch==3.3.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ipfacediff demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs
