# repagent / rephub: the two commands a newcomer runs are `make demo` and `make test`.
# Both install what they need on a fresh Debian machine (run as root).

PYTHON ?= python3
APT_PACKAGES = qemu-system-common qemu-utils libnbd-bin

.PHONY: test demo deps qemu e2fsprogs guest bench help

help:
	@echo "make demo   replicate a small VM disk end to end and prove it identical"
	@echo "make test   run the whole test-suite under coverage"
	@echo "make bench  run the benchmarks in bench/ and write docs/BENCHMARKS.md"

# pytest and coverage for the tests; nothing from pip is needed at run time.
# On Debian's own python3 (no pip, or pip refusing an externally managed
# environment) they come from apt-get instead.
deps:
	@$(PYTHON) -c "import pytest, coverage" 2>/dev/null || \
		$(PYTHON) -m pip install --quiet pytest coverage 2>/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		  apt-get install -y -q python3-pytest python3-coverage; }

# The real QEMU tools: qemu-storage-daemon is in qemu-system-common,
# qemu-img/qemu-io/qemu-nbd in qemu-utils, nbdinfo in libnbd-bin.
qemu:
	@if ! command -v qemu-storage-daemon >/dev/null || ! command -v qemu-io >/dev/null \
	    || ! command -v qemu-img >/dev/null || ! command -v nbdinfo >/dev/null; then \
		echo "installing $(APT_PACKAGES) with apt-get"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES); \
	fi

# The demo (and its test) also need mkfs.ext4, debugfs and e2fsck.
e2fsprogs:
	@command -v debugfs >/dev/null || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q e2fsprogs; }

test: deps qemu e2fsprogs
	@rm -f .coverage .coverage.*
	$(PYTHON) -m coverage run -m pytest -q -rs -p no:cacheprovider tests; rc=$$?; \
		$(PYTHON) -m coverage report; exit $$rc

demo: qemu e2fsprogs
	$(PYTHON) demo/demo.py

# bench_guest boots a Linux guest: qemu-system-x86_64 (qemu-system-x86), a kernel
# in /boot (linux-image-amd64) and busybox for its initramfs (busybox-static).
GUEST_PACKAGES = qemu-system-x86 linux-image-amd64 busybox-static
guest:
	@if ! command -v qemu-system-x86_64 >/dev/null || ! ls /boot/vmlinuz-* >/dev/null 2>&1 \
	    || ! command -v busybox >/dev/null; then \
		echo "installing $(GUEST_PACKAGES) with apt-get"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(GUEST_PACKAGES); \
	fi

# Runs every bench/bench_*.py (each against a baseline measured in the same run)
# and writes docs/BENCHMARKS.md; bench_sync also needs nbdcopy (libnbd-bin).
bench: deps qemu guest
	$(PYTHON) bench/report.py

# The long fault run and the long fuzz run (docs/RELIABILITY.md); CI runs
# bounded versions of both inside `make test` (tests/faults/).
ROUNDS ?= 100
N ?= 100000
.PHONY: soak soak-disk-full fuzz
soak: qemu
	$(PYTHON) tests/faults/soak.py --rounds $(ROUNDS)

# The same rounds with the hub's data on a 384 MiB tmpfs and the disk-full fault.
soak-disk-full: qemu
	$(PYTHON) tests/faults/soak.py --rounds $(ROUNDS) --disk-full-mib 384

fuzz: qemu
	$(PYTHON) tests/faults/fuzz.py --frames $(N)
