# Everything a fresh machine needs: `make test`, `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
FMNIST_DEB_ROOT := /usr/share/datasets/fashion-mnist

.PHONY: setup data test test-all lint demo classifier clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned, so no other package pulls a different build
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[test,metrics,apps]'
	# k-diffusion's samplers, a test oracle, without its training stack (which pins numpy < 2)
	$(PIP) install -q --no-deps k-diffusion==0.1.1.post1
	touch $(STAMP)

# Fashion-MNIST from Debian where apt is available; otherwise torchvision downloads it on first use.
data:
	@if [ -f $(FMNIST_DEB_ROOT)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST found in $(FMNIST_DEB_ROOT)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "apt-get could not install dataset-fashion-mnist; torchvision will download it"; \
	else echo "no apt-get: torchvision will download Fashion-MNIST on first use"; fi

# -rs lists each skipped test with its reason (the apps' browser test without Chromium, a missing fixture)
test: setup data
	$(PY) -m pytest -q -rs -m "not slow and not gpu"

test-all: setup data
	$(PY) -m pytest -q -m "not gpu"

lint: setup
	$(VENV)/bin/ruff check .

demo: setup data
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
