# xagent deployment bundle: developer and CI entry points.
#
#   make demo       one systemd container with the whole stack, on a fresh Debian 12
#   make test       lint + app tests + every Molecule scenario + bench smoke
#   make bench      the benchmarks (bundle vs naive design), ~20 min: docs/benchmarks.md
#   make dev        the app on this machine in its production layers (xagent-dev)
#
# Tooling lives in ./.venv (requirements-dev.txt); the targets use it directly,
# no activation needed. System packages and dockerd: `make host` (root).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

ROOT    := $(abspath .)
VENV    := $(ROOT)/.venv
BIN     := $(VENV)/bin
PYTHON  ?= python3
# Molecule shells out to ansible-config/ansible-playbook: put the venv first.
export PATH := $(BIN):$(PATH)
export VIRTUAL_ENV := $(VENV)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

SUITES        := bookworm trixie
IMAGE_BUILD   := $(ROOT)/molecule/image/build.sh
# Scenario = directory under molecule/ with a molecule.yml (shared/ and image/ have none).
# smoke (the harness self-test) is left out: every other scenario exercises the
# same harness; run it alone with `make test-molecule SCENARIOS=smoke`.
SCENARIOS     ?= $(filter-out smoke,$(sort $(notdir $(patsubst %/molecule.yml,%,$(wildcard molecule/*/molecule.yml)))))

DEMO_NAME     := xagent-demo
DEMO_IMAGE    := xagent-testhost:bookworm
DEMO_URL      := http://127.0.0.1:28000/docs
# Same flags as the Molecule platform in .config/molecule/config.yml.
DOCKER_SYSTEMD_FLAGS := --network host --cgroupns host --cap-add SYS_ADMIN --cap-add SYS_PTRACE \
	-v /sys/fs/cgroup:/sys/fs/cgroup:ro --tmpfs /run --tmpfs /run/lock \
	--stop-signal SIGRTMIN+3

VENV_STAMP    := $(VENV)/.xagent-venv-stamp

.PHONY: help host venv images vm-image lint test-app test-tools test-molecule test demo demo-down clean-images \
	bench bench-smoke dev

help:
	@echo "make host          install docker.io, debootstrap, qemu, redis, postgresql; start dockerd and"
	@echo "                   the app tests' PostgreSQL and Redis on loopback (root; make test needs it)"
	@echo "make venv          create .venv from requirements-dev.txt (+ app[dev])"
	@echo "make images        build the bookworm and trixie test-host images (cached by input hash)"
	@echo "make vm-image      build the test VM's disk image and kernel (cached by input hash)"
	@echo "make lint          yamllint, role docs, ansible-lint (production), shellcheck, ruff, mypy"
	@echo "make test-app      the app's pytest suite (real PostgreSQL/Redis from make host)"
	@echo "make test-tools    the bundle's own tools (.ci/tests; the wheelhouse tests use PyPI)"
	@echo "make test-molecule every Molecule scenario: $(SCENARIOS)"
	@echo "make test          lint + test-app + test-tools + test-molecule + bench-smoke"
	@echo "make bench         benchmarks, bundle vs naive design (~20 min): docs/benchmarks.md"
	@echo "make bench-smoke   one short repetition of every benchmark (harness check, no report)"
	@echo "make dev          run the app locally: one-time work once, then web (reload),"
	@echo "                   scheduler and receivers as processes (settings: XAGENT_*, DEV_ARGS)"
	@echo "make demo          systemd container '$(DEMO_NAME)' running the stack, $(DEMO_URL)"
	@echo "make demo-down     remove the demo container"

# ---- machine and tooling ----------------------------------------------------------

# Provisioning (root) happens here and in .ci/run only; `make test` expects it done.
host:
	@bash .ci/host-setup
	@bash app/tests/services.sh

$(VENV_STAMP): requirements-dev.txt app/pyproject.toml app/requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	@# The app's lock file pins the runtime deps the hosts get: test against the same.
	$(BIN)/python -m pip install -q -e 'app[dev]' -c app/requirements.lock
	@touch $@

venv: $(VENV_STAMP)

# The test VM's disk image, kernel and initramfs (molecule/image/build-vm.sh; ~2 min).
VM_SUITE ?= bookworm
vm-image:
	@molecule/image/build-vm.sh $(VM_SUITE) >/dev/null

# Both suites in parallel (debootstrap is mostly download and dpkg; ~2 min each).
images:
	@pids=(); for s in $(SUITES); do $(IMAGE_BUILD) $$s & pids+=($$!); done; \
	rc=0; for p in "$${pids[@]}"; do wait $$p || rc=1; done; exit $$rc

# ---- local development --------------------------------------------------------------
# Settings from the environment as on a server (XAGENT_DATABASE_URL, XAGENT_REDIS_URL,
# XAGENT_ROOT_PASSWORD, ...); `bash app/tests/services.sh` (root) gives a local
# PostgreSQL and Redis. Ctrl-C stops everything. Options: DEV_ARGS="--receivers 1".
DEV_ARGS ?=
dev: venv
	$(BIN)/xagent-dev $(DEV_ARGS)

# ---- lint -------------------------------------------------------------------------
# Python outside app/ (test helpers, the release role's wheelhouse.py) follows
# ruff.toml; app/ its own pyproject.
TOOLS_PY := roles/release/files .ci/tests

lint: venv
	@failed=(); run() { echo "+ $$*"; "$$@" || failed+=("$$*"); }; \
	run $(BIN)/yamllint .; \
	run $(BIN)/python .ci/check_role_docs.py; \
	run $(BIN)/ansible-lint; \
	run shellcheck -S warning $$(git ls-files '*.sh' .ci/run .ci/host-setup); \
	run $(BIN)/ruff check app molecule bench .ci playbooks $(TOOLS_PY); \
	run $(BIN)/ruff format --check app molecule bench .ci playbooks $(TOOLS_PY); \
	run bash -c "cd app && exec $(BIN)/mypy"; \
	run $(BIN)/mypy --strict --cache-dir .mypy_cache $(TOOLS_PY); \
	if [ $${#failed[@]} -gt 0 ]; then printf 'lint FAILED: %s\n' "$${failed[@]}"; exit 1; fi; \
	echo "lint: all passed"

# ---- tests ------------------------------------------------------------------------

test-app: venv
	cd app && $(BIN)/pytest

test-tools: venv
	$(BIN)/pytest -p no:cacheprovider .ci/tests

# Container scenarios need the test-host images, the vm scenario its disk image.
MOLECULE_IMAGES := $(if $(filter-out vm,$(SCENARIOS)),images) $(if $(filter vm,$(SCENARIOS)),vm-image)
test-molecule: venv $(MOLECULE_IMAGES)
	@failed=(); \
	for s in $(SCENARIOS); do \
		echo "=== molecule test -s $$s"; start=$$SECONDS; \
		if molecule test -s $$s; then echo "=== $$s: OK in $$((SECONDS - start)) s"; \
		else echo "=== $$s: FAILED after $$((SECONDS - start)) s"; failed+=($$s); fi; \
	done; \
	if [ $${#failed[@]} -gt 0 ]; then echo "failed scenarios: $${failed[*]}"; exit 1; fi; \
	echo "all scenarios passed: $(SCENARIOS)"

# Everything runs even when one part fails, so one CI run reports everything.
# With XAGENT_TEST_VM=1 the VM scenario (the longest: software emulation) starts
# first and runs beside everything else. From the start, beside lint: the test-host
# images (debootstrap: downloads and dpkg) and the app and tool tests. Once the images
# exist, three streams of scenarios side by side, balanced by their last CI times
# (a scenario keeps about one core busy only while Ansible works; most of its time it
# waits on hosts): `default` then `debian13`; `cluster`; the other scenarios then the
# bench smoke. The app tests overlap only the first deploys of the scenarios, before
# any load probe runs. Every scenario has its own ports (docs/contract.md); the
# probes' 15 s request timeout is far above what sharing the CPU adds, so a
# failed request is still a bug.
MAIN_SCENARIOS := $(filter default,$(SCENARIOS)) $(filter debian13,$(SCENARIOS))
CLUSTER_SCENARIOS := $(filter cluster,$(SCENARIOS))
# The vm scenario (software emulation) keeps both cores busy: beside the load probes of
# the container scenarios it starved their web into 15 s timeouts. Until it is fast
# enough to run apart, make test runs it only with XAGENT_TEST_VM=1.
VM_SCENARIOS := $(if $(filter 1,$(XAGENT_TEST_VM)),$(filter vm,$(SCENARIOS)))
# The faults scenario (a fault at each lifecycle step, each healed: 14 min alone) would take
# CI past its budget: make test runs it, in the side stream, only with XAGENT_TEST_FAULTS=1.
OPT_IN_SCENARIOS := vm $(if $(filter 1,$(XAGENT_TEST_FAULTS)),,faults)
SIDE_SCENARIOS := $(filter-out $(MAIN_SCENARIOS) $(CLUSTER_SCENARIOS) $(OPT_IN_SCENARIOS),$(SCENARIOS))
test: venv
	@failed=(); logs=$(ROOT)/.test-logs; rm -rf "$$logs"; mkdir -p "$$logs"; t0=$$SECONDS; \
	part() { local name=$$1 start=$$SECONDS rc; shift; "$$@" 2>&1 | tee "$$logs/$$name.log"; rc=$${PIPESTATUS[0]}; \
	  echo "$$name: $$((SECONDS - start)) s" >>"$$logs/times"; return "$$rc"; }; \
	( $(MAKE) --no-print-directory images 2>&1 | tee "$$logs/images.log" | sed -u 's/^/[images] /'; exit "$${PIPESTATUS[0]}" ) & images=$$!; \
	( rc=0; for t in test-app test-tools; do \
	    part $$t $(MAKE) --no-print-directory $$t 2>&1 | sed -u "s/^/[$$t] /" || rc=1; done; exit $$rc ) & unit=$$!; \
	vm=; if [ -n "$(VM_SCENARIOS)" ]; then \
	( $(MAKE) --no-print-directory test-molecule SCENARIOS="$(VM_SCENARIOS)" 2>&1 \
	      | tee "$$logs/molecule-vm.log" | sed -u 's/^/[vm] /'; exit "$${PIPESTATUS[0]}" ) & vm=$$!; fi; \
	part lint $(MAKE) --no-print-directory lint || failed+=(lint); \
	wait $$images || failed+=(images); \
	( rc=0; \
	  if ! $(MAKE) --no-print-directory test-molecule SCENARIOS="$(SIDE_SCENARIOS)" 2>&1 \
	      | tee "$$logs/molecule-side.log" | sed -u 's/^/[side] /'; then rc=1; fi; \
	  start=$$SECONDS; \
	  if ! BENCH_CPU_SHARES=1024 $(MAKE) --no-print-directory bench-smoke 2>&1 \
	      | tee "$$logs/bench-smoke.log" | sed -u 's/^/[bench-smoke] /'; then rc=$$((rc + 2)); fi; \
	  echo "bench-smoke: $$((SECONDS - start)) s" >>"$$logs/times"; \
	  exit $$rc ) & side=$$!; \
	( $(MAKE) --no-print-directory test-molecule SCENARIOS="$(CLUSTER_SCENARIOS)" 2>&1 \
	      | tee "$$logs/molecule-cluster.log" | sed -u 's/^/[cluster] /'; exit "$${PIPESTATUS[0]}" ) & cluster=$$!; \
	part molecule-main $(MAKE) --no-print-directory test-molecule SCENARIOS="$(MAIN_SCENARIOS)" || failed+=(test-molecule-main); \
	wait $$unit || failed+=(test-app-or-tools); \
	wait $$cluster || failed+=(test-molecule-cluster); \
	if [ -n "$$vm" ]; then wait $$vm || failed+=(test-molecule-vm); fi; \
	rc=0; wait $$side || rc=$$?; \
	if (( rc & 1 )); then failed+=(test-molecule); fi; if (( rc & 2 )); then failed+=(bench-smoke); fi; \
	echo "--- time of each part (make test: $$((SECONDS - t0)) s)"; cat "$$logs/times"; \
	grep -h -E '^=== \S+: (OK in|FAILED after)' "$$logs"/molecule-*.log || true; \
	if [ $${#failed[@]} -gt 0 ]; then \
		$(BIN)/python .ci/digest.py "$$logs"/*.log; echo "make test FAILED: $${failed[*]} (logs: .test-logs/)"; exit 1; fi; \
	echo "make test: all passed"

# ---- benchmarks ---------------------------------------------------------------------
# One systemd container (xagent-bench, ports 30000-30002/30379/30432/30099/30022), removed at
# the end. bench-smoke runs everything once, briefly, and fails when the harness breaks;
# it never judges the numbers (no timed assertions).

BENCH_STAMP := $(VENV)/.xagent-bench-stamp
$(BENCH_STAMP): bench/requirements.txt $(VENV_STAMP)
	$(BIN)/python -m pip install -q -r bench/requirements.txt
	@touch $@

bench: venv images $(BENCH_STAMP)
	$(BIN)/python bench/run.py

bench-smoke: venv images $(BENCH_STAMP)
	$(BIN)/python bench/run.py --smoke

# ---- demo -------------------------------------------------------------------------

demo: host venv
	@$(IMAGE_BUILD) bookworm
	@state=$$(docker inspect -f '{{.State.Running}}' $(DEMO_NAME) 2>/dev/null || echo missing); \
	case $$state in \
		true) echo "demo: container $(DEMO_NAME) already running"; \
		   [ "$$(docker inspect -f '{{.Image}}' $(DEMO_NAME))" = "$$(docker image inspect -f '{{.Id}}' $(DEMO_IMAGE))" ] || \
		   echo "demo: WARNING $(DEMO_NAME) runs an older $(DEMO_IMAGE); 'make demo-down demo' recreates it";; \
		false) echo "demo: starting existing container $(DEMO_NAME)"; docker start $(DEMO_NAME) >/dev/null;; \
		*) echo "demo: creating container $(DEMO_NAME)"; \
		   docker run -d --name $(DEMO_NAME) --hostname $(DEMO_NAME) $(DOCKER_SYSTEMD_FLAGS) \
			$(DEMO_IMAGE) /lib/systemd/systemd >/dev/null;; \
	esac
	@for i in $$(seq 60); do \
		state=$$(timeout 120 docker exec $(DEMO_NAME) systemctl is-system-running --wait 2>/dev/null || true); \
		case $$state in running|degraded) break;; esac; sleep 1; \
	done; \
	echo "demo: systemd in $(DEMO_NAME) is $$state"; \
	case $$state in running|degraded) ;; *) exit 1;; esac
	ansible-playbook -i inventory/local playbooks/site.yml
	@echo
	@echo "xagent demo is up: $(DEMO_URL)"
	@docker exec $(DEMO_NAME) systemctl list-units --no-pager 'xagent*'
	@echo
	@echo "shell inside the host:  docker exec -it $(DEMO_NAME) bash"
	@echo "logs:                   docker exec $(DEMO_NAME) journalctl -u 'xagent*' -f"
	@echo "remove:                 make demo-down"

demo-down:
	@if docker inspect $(DEMO_NAME) >/dev/null 2>&1; then \
		docker rm -f $(DEMO_NAME) >/dev/null && echo "demo: removed $(DEMO_NAME)"; \
	else echo "demo: no container $(DEMO_NAME)"; fi

clean-images:
	-docker image ls --format '{{.Repository}}:{{.Tag}}' 'xagent-testhost' | xargs -r docker image rm
	rm -rf molecule/.image-cache
