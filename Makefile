# thaw: two commands on a fresh machine.
#   make demo   installs what is missing, builds, publishes templates/python, invokes it
#   make test   installs what is missing, runs every test (make test-python: the Python client's)
SHELL := /bin/bash
.DEFAULT_GOAL := build

CARGO        ?= cargo
TARGET_TRIPLE := x86_64-unknown-linux-gnu
STATIC_DIR   := target/static
GUEST_INIT_STATIC := $(STATIC_DIR)/$(TARGET_TRIPLE)/release/guest-init
THAW         := target/release/thaw
TEST_THREADS ?= 2

.PHONY: deps build build-debug guest-init demo test test-python test-microvm bench-microvm unit e2e lint bench doctor clean \
	check-api-deps test-openapi

deps:
	@bash scripts/install-deps.sh

# guest-init is PID 1 in every sandbox, whatever its rootfs: it must be static. The explicit
# --target keeps RUSTFLAGS away from build scripts and proc-macros, which must stay dynamic.
guest-init:
	RUSTFLAGS="-C target-feature=+crt-static -C strip=debuginfo" $(CARGO) build --release --locked -p thaw-guest-init \
		--target $(TARGET_TRIPLE) --target-dir $(STATIC_DIR)
	@ldd $(GUEST_INIT_STATIC) 2>&1 | grep -qE "not a dynamic executable|statically linked" || \
		{ echo "guest-init is not static"; exit 1; }

build: deps guest-init
	$(CARGO) build --release --locked -p thaw-cli
	install -m 0755 $(GUEST_INIT_STATIC) target/release/thaw-guest-init

build-debug: deps guest-init
	$(CARGO) build --locked -p thaw-cli
	install -m 0755 $(GUEST_INIT_STATIC) target/debug/thaw-guest-init

doctor: build
	$(THAW) doctor

demo: build
	@echo "== thaw doctor"; $(THAW) doctor || true
	@echo "== deploy templates/shell"; $(THAW) deploy templates/shell
	@echo "== invoke shell"; $(THAW) invoke shell --payload '{"task": "say hi"}'
	@echo "== deploy templates/python (first time: debootstrap, 2-3 minutes, then cached)"; $(THAW) deploy templates/python
	@echo "== invoke python"; $(THAW) invoke python --payload '{"op": "fit", "x": [0, 1, 2, 3], "y": [1, 3, 5, 7]}'
	@echo "== exec in python"; $(THAW) exec python -- python3 -c 'import sys; print("python", sys.version.split()[0], "in a sandbox")'

# Every test: unit tests of every crate, then the end-to-end tests that drive the real thaw
# binary against runc and CRIU (sandboxes are real, so e2e tests run two at a time), then the
# real Cloud Hypervisor tests on real KVM (test-microvm).
test: build-debug
	export THAW_GUEST_INIT=$(abspath $(GUEST_INIT_STATIC)); \
	$(CARGO) test --locked --workspace --exclude thaw-e2e
	$(MAKE) --no-print-directory check-api-deps test-openapi
	$(CARGO) test --locked -p thaw-e2e -- --test-threads $(TEST_THREADS)
	$(MAKE) --no-print-directory test-python
	$(MAKE) --no-print-directory test-microvm

# The Python client (clients/python) against a real `thaw serve` of target/debug/thaw: a
# virtualenv in target/py-client, the client installed from its directory with pytest.
PY_VENV := target/py-client
test-python: build-debug
	test -x $(PY_VENV)/bin/python || python3 -m venv $(PY_VENV)
	$(PY_VENV)/bin/python -m pip install --quiet --disable-pip-version-check ./clients/python "pytest>=7" "pytest-asyncio>=0.23"
	THAW_BIN=$(abspath target/debug/thaw) $(PY_VENV)/bin/python -m pytest -q -rs clients/python/tests

# A client of the HTTP API must not compile the engine: no engine crate in thaw-api's tree
# (its data types come from thaw-types).
check-api-deps:
	@if $(CARGO) tree --locked -p thaw-api --all-features -e normal,build --prefix none \
		| grep -E '^thaw-(platform|microvm|snapshotter|server) '; then \
		echo "check-api-deps: thaw-api depends on the engine crates above; a client must not compile the engine"; \
		exit 1; \
	fi
	@echo "check-api-deps: thaw-api does not depend on the engine"

# The OpenAPI document (`thaw openapi`, what `thaw serve` answers at /openapi.json) is valid
# OpenAPI (openapi-spec-validator) and generates a Python client (openapi-python-client) with
# every operation, binary bodies as files and a model per stream event
# (scripts/check-openapi-client.py). The tools come from PyPI into a venv under target/.
OPENAPI_VENV := target/py-openapi
OPENAPI_OUT  := target/openapi
OPENAPI_PY_PACKAGES := openapi-spec-validator==0.9.0 openapi-python-client==0.29.1
$(OPENAPI_VENV)/installed: Makefile
	python3 -m venv $(OPENAPI_VENV)
	$(OPENAPI_VENV)/bin/pip install --quiet --disable-pip-version-check $(OPENAPI_PY_PACKAGES)
	touch $@

test-openapi: $(OPENAPI_VENV)/installed
	$(CARGO) build --locked -p thaw-cli
	rm -rf $(OPENAPI_OUT) && mkdir -p $(OPENAPI_OUT)
	target/debug/thaw openapi > $(OPENAPI_OUT)/openapi.json
	$(OPENAPI_VENV)/bin/openapi-spec-validator $(OPENAPI_OUT)/openapi.json
	set -o pipefail; $(OPENAPI_VENV)/bin/openapi-python-client generate --path $(OPENAPI_OUT)/openapi.json \
		--meta none --output-path $(OPENAPI_OUT)/thaw_client --config scripts/openapi-python-client.yaml \
		2>&1 | tee $(OPENAPI_OUT)/generate.log
	$(OPENAPI_VENV)/bin/python scripts/check-openapi-client.py $(OPENAPI_OUT)/openapi.json \
		$(OPENAPI_OUT)/thaw_client $(OPENAPI_OUT)/generate.log

# The tests that need Cloud Hypervisor on hardware KVM (#[ignore]d in a plain cargo test):
# natively where this host runs VMs, else inside a QEMU TCG guest with nested SVM, where real
# Cloud Hypervisor runs on a real (emulated) KVM. Cloud Hypervisor is built from
# CLOUD_HYPERVISOR_VENDOR's source where no binary is installed. See nested/src/main.rs.
CLOUD_HYPERVISOR_VENDOR ?= $(abspath ../shared/vendor)
test-microvm: build-debug
	CLOUD_HYPERVISOR_VENDOR=$(CLOUD_HYPERVISOR_VENDOR) THAW_GUEST_INIT=$(abspath $(GUEST_INIT_STATIC)) \
		bash scripts/test-microvm.sh

lint: check-api-deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

bench: build
	$(THAW) bench

# thaw bench of templates/shell on the microvm tier, inside the same nested guest as
# test-microvm where this host has no hardware virtualization (its figures are an emulator's).
bench-microvm: build-debug
	CLOUD_HYPERVISOR_VENDOR=$(CLOUD_HYPERVISOR_VENDOR) THAW_GUEST_INIT=$(abspath $(GUEST_INIT_STATIC)) \
		bash scripts/test-microvm.sh --bench

clean:
	$(CARGO) clean
