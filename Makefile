# Two commands do everything on a fresh Debian 12 machine (as root): `make demo` and `make test`.
# Both install what they need (Debian packages, a virtual environment at .venv) and are idempotent.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
APT_PACKAGES := nftables libseccomp2 python3.11 python3-venv iproute2 util-linux passwd \
                bubblewrap ca-certificates strace dnsmasq-base squashfs-tools erofs-utils graphviz
# Only the tests need these: the exports are run for real (systemd-analyze comes with systemd;
# podman with runc, slirp4netns and catatonit runs the Kubernetes export; sqlite3-tools' sqldiff
# cross-checks the journal's changesets).
TEST_PACKAGES := podman runc slirp4netns catatonit sqlite3-tools
# The real servers of tests/test_servers.py and their clients. Installed with starts denied
# (policy-rc.d): a test must never start, or leave running, the host's own nginx, redis or
# PostgreSQL; only the binaries are used, contained, from examples/.
SERVER_PACKAGES := nginx redis-server redis-tools postgresql-15 postgresql-client-15 wrk curl
STAMP := $(VENV)/.corral-installed

# The host image's boot test needs these too (mmdebstrap, squashfs, qemu, mkfs.ext4).
BOOT_PACKAGES := mmdebstrap squashfs-tools qemu-system-x86 e2fsprogs

.PHONY: servers demo test boot-test lint layers system venv bench clean

demo: venv
	bash examples/demo.sh

test: venv
	@$(MAKE) --no-print-directory system APT_PACKAGES="$(TEST_PACKAGES)"
	@$(MAKE) --no-print-directory servers
	$(VENV)/bin/python -m pytest -q tests

# Builds a Debian host image and boots it twice in qemu (docs/host-image.md): several minutes,
# so not part of `make test`; CI runs it after. Writes bench/host-image.md.
boot-test: venv
	@$(MAKE) --no-print-directory system APT_PACKAGES="$(BOOT_PACKAGES)"
	CORRAL_BOOT_TEST=1 $(VENV)/bin/python -m pytest -q tests/test_hostimage_boot.py

# Style and bugs (ruff), types (mypy), the pipeline's layers (import-linter, contract in
# pyproject.toml), and declared against imported dependencies (deptry). CI runs it before the tests.
lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/deptry src

# docs/layers.dot and .svg: the folders and their imports, drawn from the code (Graphviz's dot,
# in APT_PACKAGES since `corral graph --format svg|png` runs it too).
layers: venv
	$(VENV)/bin/python docs/layers.py

bench: venv
	bash bench/run.sh

# The server packages, with service starts denied while apt runs: an existing policy-rc.d is
# left as it is (this image's denies every start); else a temporary one that denies, removed
# afterwards whatever apt did.
servers:
	@missing=$$(for p in $(SERVER_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  made=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made=1; fi; \
	  $(MAKE) --no-print-directory system APT_PACKAGES="$$missing"; rc=$$?; \
	  [ -n "$$made" ] && rm -f /usr/sbin/policy-rc.d; exit $$rc; \
	fi

# Debian packages: installed only when one is missing, so a second run needs no network.
system:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y --no-install-recommends $$missing || \
	    { apt-get update && apt-get install -y --no-install-recommends $$missing; }; \
	fi

# The bytecode cache is written here, once, not left to the first run: a Python told not to
# write it (PYTHONDONTWRITEBYTECODE) would compile every module at every start (~50 ms of each
# `corral run`). Cheap when nothing changed.
venv: system $(STAMP)
	$(VENV)/bin/python -m compileall -q src/corral

$(STAMP): pyproject.toml bin/corral
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test,lint]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .demo build src/*.egg-info .pytest_cache .hypothesis
