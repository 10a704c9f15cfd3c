# The whole set-up on a fresh machine is `make demo` or `make test`: each creates (or reuses) .venv
# and installs what is missing. `make lab` opens JupyterLab on the notebooks.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
# any recent torch works; CI pins the build our machines serve from local disk
TORCH_SPEC  ?= torch torchvision
# test profile: fast (CI-sized). Learners can run `make test MINILCM_PROFILE=cpu`.
MINILCM_PROFILE ?= fast
export MINILCM_PROFILE
# the offline CIFAR-10 archive, if it sits beside the checkout
SHARED_CIFAR := $(abspath ../shared/data/cifar10-jpeg.tar.gz)
ifeq ($(MINILCM_CIFAR),)
ifneq ($(wildcard $(SHARED_CIFAR)),)
MINILCM_CIFAR := $(SHARED_CIFAR)
export MINILCM_CIFAR
endif
endif

.PHONY: demo test lab clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[dev,sd]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/minilcm demo

# The test command: unit tests plus every notebook executed by nbval.
test: $(VENV)/.installed
	$(PY) -m pytest tests notebooks --nbval-lax -q --durations=15

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf runs data/cache .pytest_cache
