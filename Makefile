# plateau-serve.  `make run`: set up (CPU) and serve config.yaml.  `make test`: the test suite.
VENV ?= .venv

.PHONY: setup run test unit bench clean
setup:
	bash scripts/setup.sh $(VENV)

run: setup
	$(VENV)/bin/serve run config.yaml

test: setup
	$(VENV)/bin/python -m pytest tests/unit tests/ray tests/gpu -v -p no:cacheprovider

unit: setup
	$(VENV)/bin/python -m pytest tests/unit -q

bench: setup
	$(VENV)/bin/python bench/serve_overhead.py

clean:
	rm -rf $(VENV)
