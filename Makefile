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

.PHONY: demo test test-fast lab notebooks student site site-check screenshots wheelhouse clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -e ".[dev,sd,site]"
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

# The course site: every chapter as executed (the committed outputs; nothing is run), the notation sheet, the
# architecture, a page per shipped checkpoint, the instructor guide and the classroom kit, with search and maths,
# offline (no CDN: open build/site/index.html, or serve the folder). Built by Sphinx + MyST-NB (docs/site/).
site: | $(VENV)/.installed
	$(PY) docs/site/build_site.py build/site

# Every page of build/site opened in headless Chromium (Debian's chromium package: apt-get install chromium):
# titles, typeset maths, images, console errors, requests outside the site, internal links, the search box.
site-check: site
	$(PY) docs/site/site_browser.py build/site

# The README's and the site's screenshots: the index and chapters 1 and 5 at a desktop and a phone width.
screenshots: site
	$(PY) docs/site/site_browser.py build/site --screenshots docs/screenshots

# Every wheel the course needs, for a classroom without network: copy the folder (and the course folder) to a USB
# stick, then on each machine, in the course folder:
#   python3 -m venv .venv && .venv/bin/pip install --no-index --find-links wheelhouse -e ".[dev,sd]" && touch .venv/.installed
# PyTorch's CPU-only build on Linux and Windows (no nvidia-* libraries; macOS wheels are CPU builds anyway); set
# WHEEL_TORCH_INDEX= (empty) for PyPI's default build. Build it on the OS and Python version of the room's machines.
WHEELHOUSE ?= wheelhouse
WHEEL_TORCH_INDEX ?= $(if $(filter Darwin,$(shell uname -s)),,https://download.pytorch.org/whl/cpu)
wheelhouse: | $(VENV)/.installed
	$(PY) -m pip download --dest $(WHEELHOUSE) $(TORCH_SPEC) \
	  $(if $(WHEEL_TORCH_INDEX),--index-url $(WHEEL_TORCH_INDEX) --extra-index-url https://pypi.org/simple)
	$(PY) -m pip download --dest $(WHEELHOUSE) pip "setuptools>=68" wheel
	$(PY) -m pip wheel --wheel-dir $(WHEELHOUSE) --find-links $(WHEELHOUSE) ".[dev,sd,site]"
	du -sh $(WHEELHOUSE)

clean:
	rm -rf runs data/cache .pytest_cache build/student build/site build/site-src
