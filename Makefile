# evaclip: `make demo` runs the pipeline on the embedded default, `make test` runs the tests.
# Both set everything up first (a .venv with the exact versions of constraints.txt).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# No analytics from any part of the stack; no model hub at run time.
export DO_NOT_TRACK = true
export MLFLOW_DISABLE_TELEMETRY = true
export DVC_NO_ANALYTICS = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS = 90
export HF_HUB_OFFLINE = 1

.PHONY: setup stores demo test lint bench lock clean serve stack ablation

setup: $(STAMP) stores

$(STAMP): pyproject.toml constraints.txt
	@# Debian packages: Fashion-MNIST (the demo's data) and PostgreSQL 15 (`make stack` and its tests), without
	@# the default cluster a PostgreSQL package would create and start (the stack runs its own).
	@missing=$$(for p in dataset-fashion-mnist postgresql-15; do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    mkdir -p /etc/postgresql-common && echo "create_main_cluster = false" >> /etc/postgresql-common/createcluster.conf; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: run 'sudo apt-get install $$missing' (demo data, make stack)"; fi; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# torch first, pinned: anything that pulls an unpinned torch would fetch another CUDA stack.
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# The demo's local stores, created and migrated here once rather than in the first `make demo` (Prefect's
# migrations and MLflow's, ~9 s of 2 cores): Prefect's database (PREFECT_HOME=outputs/prefect, as `make demo`
# and `make serve` use it) and MLflow's SQLite store (tracking.default_store). `make clean` removes them.
stores: outputs/prefect/prefect.db outputs/mlflow/mlflow.db

outputs/prefect/prefect.db: | $(STAMP)
	@mkdir -p $(@D)
	PREFECT_HOME=$(CURDIR)/$(@D) $(BIN)/prefect server database upgrade -y >/dev/null

outputs/mlflow/mlflow.db: | $(STAMP)
	@mkdir -p $(@D)
	$(BIN)/python -c 'import mlflow; mlflow.MlflowClient("sqlite:///$(CURDIR)/$@").search_experiments()'

# The Prefect flow on a local (ephemeral) Prefect API whose history stays in outputs/prefect.
# The first run starts from random initialization; once the registry has a champion, a run pre-trains
# a fresh EVA from it (EVA-02's bootstrap) and starts from that. Unchanged stages are skipped.
demo: setup
	@mkdir -p outputs/prefect
	PREFECT_HOME=$(CURDIR)/outputs/prefect $(BIN)/evaclip pipeline --bootstrap

# The paper's claims (flows/ablation.py): about 3 hours of a 2-core CPU at the default scale. Resumable: cells
# finished in MLflow are not run again. In parts: make ablation ABLATION_ARGS="--max-new-cells 10"
ABLATION_ARGS ?=
ablation: setup
	@mkdir -p outputs/prefect
	PREFECT_HOME=$(CURDIR)/outputs/prefect $(BIN)/evaclip ablation --results benchmarks/results/ablation.json $(ABLATION_ARGS)

test: setup
	$(BIN)/pytest -q --durations=15 -n auto --maxprocesses 4 --dist loadfile

lint: setup
	$(BIN)/ruff check evaclip flows deploy tests benchmarks

# Every benchmark (ratios measured side by side; ~1 h on 2 CPU cores, half of it bench_demo.py), then the summary.
# On a GPU machine: benchmarks/gpu_check.sh.
bench: setup
	@mkdir -p benchmarks/results
	test -f outputs/data/train/manifest.json || $(BIN)/dvc repro prepare
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_model.py --model EVA02-B-16 --batch 4 --reps 5
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_train.py --model EVA02-B-16 --batch 2 --reps 3
	$(BIN)/python benchmarks/bench_loader.py
	$(BIN)/python benchmarks/bench_streaming.py
	$(BIN)/python benchmarks/bench_peer.py --reps 3
	test -f outputs/train/model.safetensors || $(MAKE) demo
	$(BIN)/pip install -q --no-deps clip-benchmark==1.6.2
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_demo.py
	$(BIN)/python benchmarks/summary.py

# A local Prefect server and process worker on 127.0.0.1, with the deployments of prefect.yaml.
serve: setup
	@mkdir -p outputs/prefect
	PREFECT_HOME=$(CURDIR)/outputs/prefect $(BIN)/prefect server start --host 127.0.0.1 --port 4200 \
	  > outputs/prefect/server.log 2>&1 & \
	export PREFECT_API_URL=http://127.0.0.1:4200/api EVACLIP_HOME=$(CURDIR); \
	until curl -fs $$PREFECT_API_URL/health >/dev/null; do sleep 1; done; \
	$(BIN)/prefect work-pool create evaclip --type process --overwrite >/dev/null; \
	$(BIN)/prefect --no-prompt deploy --name weekly-retraining; \
	echo "Prefect UI: http://127.0.0.1:4200   run: prefect deployment run 'evaclip-pipeline/weekly-retraining' --watch"; \
	$(BIN)/prefect worker start --pool evaclip

# docker-compose's topology natively on 127.0.0.1 (PostgreSQL, S3 via rclone, MLflow, Prefect server + worker).
stack: setup
	$(BIN)/python deploy/stack.py --state outputs/stack

lock: setup
	{ head -2 constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^evaclip'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf outputs .pytest_cache
