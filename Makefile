# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs,
# with constraints.txt pinning the CPU torch that lies on disk (never a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megalong-installed

.PHONY: demo test install clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder tests

demo: $(STAMP)
	$(PY) -m megalong.demo

clean:
	rm -rf $(VENV) build *.egg-info
