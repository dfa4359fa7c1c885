# Two commands do everything on a fresh machine: `make train` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
DEB_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev dataset-fashion-mnist iproute2 chromium chromium-driver tmux postgresql curl
# Expanded at each use: after `setup` installs uv with pip (--user: ~/.local/bin, often off PATH), the
# binary is found there; `python3 -m uv` is the last resort, and fails under `uv run` (as in `make test`'s
# tests), where python3 is the project's venv, which has no uv.
UV = $(shell command -v uv 2>/dev/null || { test -x "$$HOME/.local/bin/uv" && echo "$$HOME/.local/bin/uv"; } || echo python3 -m uv)
CONFIG ?= configs/fashion_lenet5.yaml
ARGS ?=

.PHONY: setup data train test test-fast bench bench-gpu gpu-check bench-pareto results bench-data bench-startup bench-table ui tracking-server head head-stop clean

## setup: Debian packages (FFCV's build needs, offline Fashion-MNIST), uv, then the locked venv.
setup:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "setup: installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "setup: missing Debian packages; run: sudo apt-get install -y $$missing" >&2; exit 1; \
	  fi; \
	fi
	@if ! $(UV) --version >/dev/null 2>&1; then \
	  echo "setup: installing uv"; python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv; \
	fi
	@$(UV) sync --locked --quiet

## data: Fashion-MNIST as .beton files for FFCV (the default loader); a no-op when up to date.
data: setup
	$(UV) run --locked distswitch data prepare fashion-mnist --out data/ffcv/fashion-mnist

## train: the main job on the embedded default (Fashion-MNIST, LeNet5, switcher); ARGS="train.epochs=2 ..."
train: data
	$(UV) run --locked distswitch train $(CONFIG) $(ARGS)

## test: the whole suite, slow (real training) tests included
test: setup
	$(UV) run --locked ruff check distswitch tests benchmarks
	$(UV) run --locked ruff format --check distswitch tests benchmarks
	$(UV) run --locked pytest -q $(ARGS)

## test-fast: skip the slow tests while developing
test-fast: setup
	$(UV) run --locked pytest -q -m "not slow" $(ARGS)

## bench: every CPU benchmark of docs/results.md, full size, into outputs/bench/ (about 30 min on 2 cores)
BENCH = $(UV) run --locked python benchmarks
bench: data bench-data
	$(BENCH)/switcher_overhead.py --rounds 3 --out outputs/bench/switcher_overhead.json
	$(BENCH)/step_breakdown.py --out outputs/bench/step_breakdown.json
	$(BENCH)/reference_mlp.py --out outputs/bench/reference_mlp.json
	$(BENCH)/time_to_accuracy.py --out outputs/bench/time_to_accuracy.json
	$(BENCH)/communication.py --out outputs/bench/communication.json

## bench-pareto: accuracy vs MACs, MLP and LeNet5, budgets 70/50/30/15%, 3 seeds, into outputs/pareto (hours on 2 cores; resumable)
bench-pareto: setup
	$(BENCH)/pareto.py --out outputs/pareto --figure docs/pareto.png

## results: issue 36's tables, from the committed run summaries in benchmarks/results/issue36 alone (runs nothing)
RECORDS := $(BENCH)/pareto.py --record benchmarks/results/issue36 --report-only --no-mcnemar
SELECTION := switch switch-hard switch-ties switch-extra switch-fair switch-fair-rank switch-fair-graph switch-fair-graph-rank magnitude-gradual magnitude-gradual-group
CONFIRMATION := switch-fair-rank magnitude-gradual magnitude-gradual-group torch-pruning
results: setup
	$(RECORDS) --out outputs/results/mlp-selection --models mlp --budgets 0.3 0.15 --metric val_acc --reference magnitude-gradual --methods $(SELECTION)
	$(RECORDS) --out outputs/results/lenet5-selection --models lenet5 --budgets 0.3 0.15 --metric val_acc --reference magnitude-gradual-group --methods $(SELECTION)
	$(RECORDS) --out outputs/results/confirmation --models mlp lenet5 --budgets 0.3 0.15 --seeds 10 11 12 13 14 15 16 17 --reference magnitude-gradual-group --methods $(CONFIRMATION)
	$(BENCH)/pareto.py --record benchmarks/results/shipped --report-only --no-mcnemar --out outputs/results/shipped --models lenet5 mlp --budgets 0.5 --seeds 20 21 22 23 --methods switch magnitude-gradual-group --reference magnitude-gradual-group
	$(RECORDS) --out outputs/results/resnet20 --models resnet20 --budgets 0.5 0.25 --seeds 10 11 12 --epochs 8 --finetune 2 --train-limit 20000 --reference magnitude-gradual --methods switch-fair-rank magnitude-gradual

## bench-gpu: on a GPU host, ResNet18 32x32 bf16 images/s and MFU, dense and switch, compiled
bench-gpu: data
	$(BENCH)/gpu_throughput.py --out outputs/bench/gpu_throughput.json
	$(BENCH)/switcher_overhead.py --rounds 3 --out outputs/bench/switcher_overhead_gpu.json model.name=resnet18 \
	  data.channels=3 data.image_size=32 train.precision=bf16

## gpu-check: on a GPU host, minutes: LeNet5 and ResNet18 trained, exported and resumed on CUDA (fp32, bf16, compiled);
## one table, non-zero exit on any failure. Needs no data. (The lent device machine: see benchmarks/gpu_check.py.)
gpu-check: setup
	$(BENCH)/gpu_check.py --out outputs/bench/gpu_check.json $(ARGS)

## bench-data: FFCV vs torch DataLoader images/s (32x32 RGB, batch 512), where to normalise, and the
## default job shortened through both loaders (same accuracy), into outputs/bench/
bench-data: setup
	$(BENCH)/data_loading.py --out outputs/bench/data_loading.json
	$(BENCH)/normalize_placement.py
	$(BENCH)/loader_band.py --out outputs/bench/loader_band.json

## bench-startup: Ray Train's own floor (a trivial 2-worker job; Ray's defaults, then the package's
## local-cluster settings) and `distswitch train`'s launch to first step, into outputs/bench/ (minutes)
bench-startup: data
	$(BENCH)/ray_floor.py --out outputs/bench/ray_floor_defaults.json
	$(BENCH)/ray_floor.py --package-env --init '{"include_dashboard": false, "_system_config": {"enable_worker_prestart": false}}' \
	  --out outputs/bench/ray_floor_package.json
	$(BENCH)/startup.py --out outputs/bench/startup

## bench-table: the Fashion-MNIST table at the kept fraction the switcher reaches (switch, magnitude,
## slimming; 3 seeds for the MLP), into outputs/table* (about 2 h on 2 cores)
bench-table: data
	OMP_NUM_THREADS=1 $(BENCH)/fashion_table.py --out outputs/table_mlp --models mlp
	OMP_NUM_THREADS=1 $(BENCH)/fashion_table.py --out outputs/table_lenet5 --models lenet5
	OMP_NUM_THREADS=1 $(BENCH)/fashion_table.py --out outputs/table_mlp_seed1 train.seed=1 --models mlp
	OMP_NUM_THREADS=1 $(BENCH)/fashion_table.py --out outputs/table_mlp_seed2 train.seed=2 --models mlp
	$(BENCH)/seed_summary.py outputs/table_mlp outputs/table_mlp_seed1 outputs/table_mlp_seed2

## ui: the MLflow UI on http://127.0.0.1:5000 of the store every run launched here logs to (./mlflow.db;
## STORE=DIR for another directory's); one server worker: MLflow's default 4 take a minute to start on 2 cores
STORE ?= .
PORT ?= 5000
ui: setup
	$(UV) run --locked mlflow ui --backend-store-uri sqlite:///$(abspath $(STORE))/mlflow.db --host 127.0.0.1 --port $(PORT) --workers 1

## tracking-server: the team's MLflow server on http://127.0.0.1:5001: PostgreSQL store (Debian's, started
## here), artifacts proxied by the server; TRACKING_DB/_HOST/_PORT/_ARTIFACTS: see cluster/tracking-server.sh
tracking-server: setup
	MLFLOW="$(UV) run --locked mlflow" cluster/tracking-server.sh

## head: a Ray head on 127.0.0.1 with token authentication, as cluster/README.md submits jobs to; then
## `export RAY_AUTH_MODE=token` and the README's `ray job submit` line run as written. `make head-stop` ends it.
HEAD_PORT ?= 6379
DASHBOARD_PORT ?= 8265
RAY = $(UV) run --locked ray
head: data
	RAY_AUTH_MODE=token $(RAY) get-auth-token --generate >/dev/null
	RAY_AUTH_MODE=token RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 $(RAY) start --head --node-ip-address=127.0.0.1 \
	  --port=$(HEAD_PORT) --dashboard-host=127.0.0.1 --dashboard-port=$(DASHBOARD_PORT) --disable-usage-stats
	@echo "head: up; now: export RAY_AUTH_MODE=token; ray job submit --address http://127.0.0.1:$(DASHBOARD_PORT) ... (cluster/README.md)"

head-stop:
	$(RAY) stop

clean:
	rm -rf outputs .pytest_cache
