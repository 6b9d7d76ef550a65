# Developer entry points. `make demo` and `make test` are the README's two commands.
VENV ?= .venv
BIN := $(VENV)/bin
# Within pyproject's range; built with llama.cpp's RPC backend by hack/llama-wheel.sh.
LLAMA_CPP_PYTHON ?= 0.3.36

.PHONY: setup tools images demo demo-cluster down test test-isolation lint crds bench bench-smoke clean

$(BIN)/.installed: pyproject.toml hack/llama-wheel.sh
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-index --force-reinstall --no-deps \
		--find-links "$$(hack/llama-wheel.sh $(BIN)/pip $(LLAMA_CPP_PYTHON))" \
		'llama-cpp-python==$(LLAMA_CPP_PYTHON)'
	$(BIN)/pip install --quiet --editable '.[dev]'
	touch $@

setup: $(BIN)/.installed  ## Python environment with EdgeLLM and its dev tools

tools:  ## pinned etcd, Kubernetes, KWOK, Helm, Kubo, containerd and runc binaries in ~/.cache/edgellm/bin
	hack/host-packages.sh
	hack/tools.sh

images: setup tools  ## the operator, router and worker images, built with podman; archives in ~/.cache/edgellm/images
	hack/images.sh $(BIN)/pip

demo: setup tools  ## a local federation, a llama.cpp worker, the example request answered
	PATH="$(CURDIR)/$(BIN):$$PATH" hack/demo.sh

demo-cluster: setup tools images  ## a local cluster with a real node, EdgeLLM installed with Helm, a worker pod answering
	PATH="$(CURDIR)/$(BIN):$$PATH" hack/demo-cluster.sh

down: setup  ## stop what `make demo` and `make demo-cluster` started
	PATH="$(CURDIR)/$(BIN):$$PATH" hack/demo-down.sh

test: setup tools images  ## every check: lint, types, import layers, CRD drift, unit and e2e tests
	PATH="$(CURDIR)/$(BIN):$$PATH" hack/test.sh

test-isolation: setup tools images  ## each e2e module alone, in order and reversed: no test leans on another's state
	for module in tests/e2e/test_*.py; do \
		for order in "" --reverse; do \
			echo "== $$module $$order"; \
			PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -q -p no:cacheprovider $$order "$$module" \
				|| exit 1; \
		done; \
	done

lint: setup  ## the static checks alone
	PATH="$(CURDIR)/$(BIN):$$PATH" hack/test.sh --lint-only

crds: setup  ## regenerate crds/ and the chart's CRDs from the API models
	$(BIN)/edgellm crds

bench: setup tools images  ## benchmarks at full size; figures in bench-results/
	$(BIN)/python -m benchmarks.federation --peers 1000 --out bench-results/federation.json
	$(BIN)/python -m benchmarks.inference_requests --out bench-results/requests.json
	$(BIN)/python -m benchmarks.router --out bench-results/router.json
	$(BIN)/python -m benchmarks.kv_ipfs --out bench-results/kv-ipfs.json
	$(BIN)/python -m benchmarks.layer_split --out bench-results/layer-split.json
	$(BIN)/python -m benchmarks.in_cluster --out bench-results/in-cluster.json
	$(BIN)/python -m benchmarks.status_page --out bench-results/status-page.json

bench-smoke: setup tools images  ## the benchmarks at a size that takes a minute each
	$(BIN)/python -m benchmarks.federation --peers 120 --out bench-results/federation-smoke.json
	$(BIN)/python -m benchmarks.inference_requests --smoke --out bench-results/requests-smoke.json
	$(BIN)/python -m benchmarks.router --smoke --out bench-results/router-smoke.json
	$(BIN)/python -m benchmarks.kv_ipfs --smoke --out bench-results/kv-ipfs-smoke.json
	$(BIN)/python -m benchmarks.layer_split --smoke --out bench-results/layer-split-smoke.json
	$(BIN)/python -m benchmarks.in_cluster --out bench-results/in-cluster-smoke.json
	$(BIN)/python -m benchmarks.status_page --loads 5 --out bench-results/status-page-smoke.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
