# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv and installs what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-smoke demo-full demo-whisper test test-fast fuzz bench clean

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# espeak-ng and sox synthesise the test and demo speech
$(STAMP): pyproject.toml
	command -v espeak-ng >/dev/null && command -v sox >/dev/null && test -d /usr/share/games/fortunes || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq espeak-ng sox fortunes >/dev/null; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[all,dev,ray]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/asr-merge demo

demo-smoke: $(STAMP)
	$(BIN)/asr-merge demo --smoke

# every procedure of the demo's experiment file (~52 min on 2 CPU cores)
demo-full: $(STAMP)
	$(BIN)/asr-merge demo --full

# the AoDE paper's scenarios with a real pretrained generalist (Whisper tiny.en from its pinned wheel)
demo-whisper: $(STAMP)
	$(BIN)/asr-merge demo --toolkit speechbrain --generalist whisper-tiny.en

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# the hardening tests with many more generated inputs, kill moments and races than CI's
fuzz: $(STAMP)
	ASR_MERGE_FUZZ_EXAMPLES=$${ASR_MERGE_FUZZ_EXAMPLES:-500} ASR_MERGE_CRASH_SEEDS=$${ASR_MERGE_CRASH_SEEDS:-5} \
		ASR_MERGE_RACE_ROUNDS=$${ASR_MERGE_RACE_ROUNDS:-10} $(BIN)/python -m pytest -q tests/hardening --hypothesis-show-statistics

bench: $(STAMP)
	$(BIN)/python -m benchmarks.merge_bench
	$(BIN)/python -m benchmarks.nemo_merge_bench
	$(BIN)/python -m benchmarks.nemo_eval_bench
	$(BIN)/python -m benchmarks.nemo_train_overhead
	$(BIN)/python -m benchmarks.sb_merge_bench
	$(BIN)/python -m benchmarks.greedy_cost
	$(BIN)/python -m benchmarks.search_cost   # one asr-merge search trial vs merge + eval; trials per minute
	$(BIN)/python -m benchmarks.experiment_executors   # the smoke experiment on local vs Ray

clean:
	rm -rf $(VENV)
