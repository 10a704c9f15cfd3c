# The whole set-up on a fresh machine is `make demo` or `make test`: each creates (or reuses) .venv
# and installs what is missing. `make lab` opens JupyterLab on the notebooks.
# CIFAR-10 is found by the package itself (minilcm.datasets.cifar_source): MINILCM_CIFAR, else
# ../shared/data/cifar10-jpeg.tar.gz, else data/cifar10-jpeg.tar.gz, else the official release in data/cifar10.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
# any recent torch works. The default is PyPI's build (with CUDA on Linux: several GB); without a GPU,
# `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` installs PyTorch's CPU-only build instead.
TORCH_SPEC  ?= torch torchvision
TORCH_INDEX ?=
# extra arguments for `make demo` / `make lab`, e.g. make lab ARGS="--port 9999 --no-browser"
ARGS        ?=
# test profile: fast (CI-sized). Learners can run `make test MINILCM_PROFILE=cpu`.
MINILCM_PROFILE ?= fast
export MINILCM_PROFILE
# JupyterLab refuses to start as root (containers, classroom VMs) unless told it may
ALLOW_ROOT  := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: demo test test-fast lab notebooks student clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -e ".[dev,sd]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/minilcm demo $(ARGS)

# The test command CI runs: unit tests plus every notebook executed by nbval.
test: $(VENV)/.installed
	$(PY) -m pytest tests notebooks --nbval-lax -q --durations=15

# The unit tests without the slow ones (@pytest.mark.slow) and without the notebooks: a few minutes on 2 cores.
test-fast: $(VENV)/.installed
	$(PY) -m pytest tests -m "not slow" -q --durations=10

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/ $(ALLOW_ROOT) $(ARGS)

# The notebooks are edited as jupytext percent sources, notebooks/src/NN_name.py; this writes each into its
# notebooks/NN_name.ipynb, keeping the outputs of every cell whose code is unchanged (jupytext --update).
# tests/test_notebook_sources.py fails while a source and its notebook differ. It executes nothing.
notebooks: | $(VENV)/.installed
	for src in notebooks/src/*.py; do \
	  $(PY) -m jupytext --to ipynb --update -o notebooks/$$(basename $$src .py).ipynb $$src || exit 1; \
	done

# The student edition: every notebook with its exercise solutions replaced by stubs, outputs cleared, checks kept
# (minilcm/exercises/edition.py). Written to build/student/; the instructor notebooks are notebooks/*.ipynb.
student: | $(VENV)/.installed
	$(PY) -m minilcm.exercises.edition notebooks/src build/student

clean:
	rm -rf runs data/cache .pytest_cache build/student
