# voicebridge — every target sets itself up: a fresh machine needs only Python 3.11+ and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

BENCH_STAMP = $(VENV)/.installed-bench
LINT_STAMP  = $(VENV)/.installed-lint

.PHONY: demo test lint run check bench clean promtool scaleout

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m voicebridge.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 3 --dist loadfile

$(LINT_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,lint]'
	@touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	$(PY) -m ruff check voicebridge tests bench
	$(PY) -m mypy

run: $(STAMP)
	$(PY) -m voicebridge --config config.toml

check: $(STAMP)
	$(PY) -m voicebridge --config config.toml --check

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m bench $(BENCH_ARGS)

# promtool (for tests/test_metrics.py's `promtool check metrics`): Debian's prometheus package
promtool:
	@command -v promtool >/dev/null || { echo "promtool missing: installing Debian's prometheus package with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }
	promtool --version

# scale-out check (bench/scaleout.py): three instances behind HAProxy on 127.0.0.1, 100 calls,
# one instance drained with SIGTERM mid-run; Debian's haproxy package, installed with apt if missing
scaleout: $(BENCH_STAMP)
	@{ command -v haproxy >/dev/null || test -x /usr/sbin/haproxy; } || { echo "haproxy missing: installing Debian's haproxy package with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy; }
	$(PY) -m bench.scaleout $(SCALEOUT_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
