# Trellis: `make demo` runs the lab demo, `make test` runs every test. Both as root
# on Debian 12; `make setup` (which both call) installs everything they need.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TRELLIS := $(VENV)/bin/trellis

DEBIAN_PACKAGES := iptables iproute2 curl tcpdump python3-venv python3-dev gcc \
	netcat-openbsd socat procps psmisc stunnel4 iperf3

.PHONY: setup demo test test-unit lint down clean bench

setup: .setup-stamp

# Re-run set-up when the dependencies change; otherwise it is a no-op.
.setup-stamp: pyproject.toml Makefile
	@echo "==> installing Debian packages"
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@echo "==> creating $(VENV) (system site packages, for bcc)"
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@$(PIP) install -q --upgrade pip
	@$(PIP) install -q -e '.[test]'
	@touch $@
	@echo "==> set-up done"

demo: setup
	$(TRELLIS) lab demo

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-unit: setup
	$(PY) -m pytest -q -m "unit or inprocess"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(TRELLIS) bench

down:
	-$(TRELLIS) lab down

clean: down
	rm -rf $(VENV) .setup-stamp build *.egg-info
