"""`make stack` for real: PostgreSQL, S3 (rclone), the MLflow server behind basic-auth, the Prefect server behind
its auth string and a process worker on loopback, the docker-compose topology, started once for this module.

What an operator relies on: the doors are locked (no anonymous request gets in; the reader cannot move
`champion`); the pipeline runs end to end as a deployment with the pipeline's identity; failed runs and a moved
champion reach a webhook; two promoters racing on the server leave the better model champion; training goes on
while MLflow or PostgreSQL restart, and S3 restarting during `dvc push` or model logging is retried; a cancelled
flow run and a SIGTERM to the worker stop every training process after a checkpoint, and the next run resumes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import botocore.exceptions
import mlflow
import pandas as pd
import psutil
import pytest
import requests

from deploy.stack import PG_BIN, Stack, free_port
from evaclip import project as evaclip_project

from .conftest import REPO, git_commit, make_project
from .test_data import image_folder, red_blue_pairs

BIN = Path(sys.executable).parent
DEPLOYMENT = "evaclip-pipeline/weekly-retraining"


def _wait_for(condition, polls: int = 15000, every: float = 0.04):
    """Poll `condition` (a bound on polls, not a deadline the test measures); returns its first true value."""
    for _ in range(polls):
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition never held")


class Receiver(ThreadingHTTPServer):
    """A local webhook endpoint: every POSTed JSON body, in order."""

    def __init__(self):
        self.bodies: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                receiver.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def received(self, text: str) -> list[dict]:
        return [b for b in self.bodies if text in b.get("subject", "") + b.get("text", "")]


@pytest.fixture(scope="module")
def receiver():
    server = Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A checkout of its own (git + DVC), as a worker machine would hold, with a micro-model params.yaml."""
    tmp = tmp_path_factory.mktemp("stack-project")
    source = red_blue_pairs(tmp / "pairs", 64)
    evalset = image_folder(tmp / "evalset", per_class=2)
    root = make_project(tmp / "project", [
        "model.name=evaclip-micro", "data.source=pairs", f"data.path={source}", "data.samples_per_shard=16",
        "data.remote=stack", "data.workers=0", "train.steps=4", "train.warmup_steps=1", "train.batch_size=8",
        "train.devices=1", f"eval.sets=[{evalset}]", "eval.templates=simple",
    ], remote=tmp / "local-remote")
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    git_commit(root, "flows")
    return root


@pytest.fixture(scope="module")
def stack(project, receiver):
    assert (PG_BIN / "initdb").is_file(), "PostgreSQL 15 is missing: `make setup` installs it (as root)"
    state = Path(tempfile.mkdtemp(prefix="evaclip-stack-"))  # pytest's tmp folders are closed to `postgres`
    state.chmod(0o755)
    ports = {name: free_port() for name in ("postgres", "s3", "mlflow", "prefect")}
    os.environ["PREFECT_WORKER_QUERY_SECONDS"] = "2"  # the worker picks a run up sooner than its default 10 s
    try:
        with Stack(state, project, ports, env_file=state / ".env", notify_url=receiver.url) as running:
            yield running
    finally:
        os.environ.pop("PREFECT_WORKER_QUERY_SECONDS")
        shutil.rmtree(state, ignore_errors=True)


def _env(stack: Stack, **extra) -> dict[str, str]:
    return dict(os.environ, **stack.env, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
                PREFECT_HOME=str(stack.state / "prefect"), **extra)


def _prefect(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "prefect"), *args], cwd=stack.project, env=_env(stack), capture_output=True,
                            text=True, timeout=900)
    assert not check or result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _deploy_run(stack: Stack, parameters: dict, watch: bool = False) -> subprocess.CompletedProcess:
    return _prefect(stack, "deployment", "run", DEPLOYMENT, "--params", json.dumps({"parameters": parameters}),
                    *(["--watch"] if watch else []), check=False)


def _worker_logs(stack: Stack) -> str:
    return "".join(p.read_text(errors="replace")[-3000:] for p in (stack.state / "logs").glob("*worker*"))


def _client(stack: Stack, monkeypatch, who: str = "pipeline") -> mlflow.tracking.MlflowClient:
    user, password = stack.identity(who)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return mlflow.tracking.MlflowClient(stack.url("mlflow"), registry_uri=stack.url("mlflow"))


# --- doors -------------------------------------------------------------------------------------
def test_no_anonymous_request_gets_in_and_nothing_listens_beyond_loopback(stack):
    search = f"{stack.url('mlflow')}/api/2.0/mlflow/experiments/search"
    assert requests.get(search, params={"max_results": 1}, timeout=30).status_code == 401
    assert requests.get(search, params={"max_results": 1}, auth=(stack.identity("reader")[0], "wrong"),
                        timeout=30).status_code == 401
    assert requests.get(search, params={"max_results": 1}, auth=stack.identity("reader"), timeout=30).status_code == 200

    flows = f"{stack.url('prefect')}/flows/filter"
    assert requests.post(flows, json={}, timeout=30).status_code == 401
    token = base64.b64encode(stack.secrets["PREFECT_AUTH_STRING"].encode()).decode()
    assert requests.post(flows, json={}, headers={"Authorization": f"Basic {token}"}, timeout=30).status_code == 200

    unsigned = requests.get(f"{stack.url('s3')}/mlflow", timeout=30)
    assert unsigned.status_code in (400, 403) and "<Error>" in unsigned.text
    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1",
                      aws_access_key_id=stack.secrets["AWS_ACCESS_KEY_ID"], aws_secret_access_key="wrong")
    with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        s3.list_objects_v2(Bucket="mlflow")
    psql = [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(stack.ports["postgres"]), "-U",
            stack.secrets["POSTGRES_USER"], "-d", "mlflow", "-w", "-c", "SELECT 1"]
    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    refused = subprocess.run(psql, capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "password" in refused.stderr
    wrong = subprocess.run(psql, capture_output=True, text=True, env=dict(env, PGPASSWORD="wrong"))
    assert "password authentication failed" in wrong.stderr

    listening = [(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    for name, port in stack.ports.items():
        assert {ip for ip, p in listening if p == port} == {"127.0.0.1"}, (name, listening)
    # Credentials: files only their owner reads, and never on a command line (where `ps` shows them).
    for path in (stack.env_file, stack.state / "stack.env", stack.state / "mlflow" / "basic_auth.ini"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    secrets = [stack.secrets[k] for k in ("POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "MLFLOW_ADMIN_PASSWORD",
                                          "MLFLOW_PIPELINE_PASSWORD", "MLFLOW_READER_PASSWORD",
                                          "MLFLOW_FLASK_SERVER_SECRET_KEY", "PREFECT_AUTH_STRING")]
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        assert not any(secret in command for secret in secrets), command[:200]


# --- the pipeline end to end, through cancellation, preemption and restarts -----------------------------
def test_the_pipeline_runs_as_its_identity_through_cancellation_preemption_and_restarts(stack, project, receiver,
                                                                                       monkeypatch):
    steps = 200
    parameters = {"bootstrap": False, "overrides": [f"train.steps={steps}", "train.checkpoint_every=1000",
                                                    "train.log_every=1", "train.warmup_steps=2"]}
    # 1. Cancelled from the API (what the UI's Cancel does): Prefect sends SIGTERM to the flow run's process group.
    started = _deploy_run(stack, parameters)
    flow_run = next(w for w in started.stdout.split() if w.count("-") == 4)  # its UUID
    _wait_for(lambda: len(_logged_steps(project)) >= 3)
    _prefect(stack, "flow-run", "cancel", flow_run)
    _wait_for(lambda: not _training_processes(project) and _latest(project))
    first_stop = _logged_steps(project)[-1]
    assert _latest(project) == f"step_{first_stop:07d}" and first_stop < steps  # the step it reached, saved
    _wait_for(lambda: "CANCELLED" in _prefect(stack, "flow-run", "inspect", flow_run).stdout.upper(), polls=100)
    client = _client(stack, monkeypatch)
    run_id = _train_run(project)
    assert client.get_run(run_id).info.status == "KILLED"

    # 2. The next run resumes; then its node is preempted: every process on it gets SIGTERM, the worker and the
    # flow run it started alike. (SIGTERM to the worker alone stops it from taking runs but, by Prefect's design,
    # lets the running ones finish: utilities/processutils.setup_signal_handlers_worker.)
    _deploy_run(stack, parameters)
    _wait_for(lambda: len(_logged_steps(project)) >= first_stop + 3)
    worker = stack.processes.pop("prefect-worker")
    try:
        node = [worker.pid, *(p.pid for p in psutil.Process(worker.pid).children(recursive=True))]
        for pid in node:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            worker.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker did not exit within 120 s of SIGTERM:\n" + _worker_logs(stack))
        _wait_for(lambda: not _training_processes(project) and _latest(project) != f"step_{first_stop:07d}")
    finally:  # the later tests need a worker, whatever happened here
        if "prefect-worker" not in stack.processes:
            stack.start_service("prefect-worker")
    second_stop = _logged_steps(project)[-1]
    assert _latest(project) == f"step_{second_stop:07d}" and first_stop < second_stop < steps
    assert _logged_steps(project) == list(range(1, second_stop + 1))  # resumed at the checkpoint, each step once

    # 3. A new worker (started above); the next run resumes again, and PostgreSQL, then MLflow, stop and start
    # while it trains.
    watch = subprocess.Popen([str(BIN / "prefect"), "deployment", "run", DEPLOYMENT, "--params",
                              json.dumps({"parameters": parameters}), "--watch"], cwd=project, env=_env(stack),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: len(_logged_steps(project)) > second_stop)
    for service in ("postgres", "mlflow"):
        stack.stop_service(service)
        target = min(len(_logged_steps(project)) + 10, steps)
        _wait_for(lambda target=target: len(_logged_steps(project)) >= target)  # training goes on meanwhile
        stack.start_service(service)
    output = watch.communicate(timeout=1200)[0]
    assert watch.returncode == 0 and "COMPLETED" in output.upper(), output[-3000:] + _worker_logs(stack)
    assert _logged_steps(project) == list(range(1, steps + 1))
    assert _train_run(project) == run_id and client.get_run(run_id).info.status == "FINISHED"  # one MLflow run
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, steps + 1))  # none lost

    # End to end as the pipeline's identity: the data version and the model in S3, a champion that loads.
    champion = client.get_model_version_by_alias("evaclip-micro", "champion")
    assert str(champion.version) == "1"
    assert client.get_run(champion.run_id).data.tags["data_version"]  # the DVC version it trained on
    # MLflow's process-wide URIs (set by earlier tests' stores) win over the variable: set both, then
    # give them back, since this server is gone after the module.
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(stack.url("mlflow"))
    mlflow.set_registry_uri(stack.url("mlflow"))
    try:
        model = mlflow.pyfunc.load_model("models:/evaclip-micro@champion")
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    output = model.predict(pd.DataFrame({"image": [""], "text": ["a red square"]}))
    assert len(output.embedding[0]) == 32
    assert any(p.name == "MLmodel" for p in (stack.state / "s3" / "mlflow").rglob("*"))  # artifacts went to S3
    assert any(p.is_file() for p in (stack.state / "s3" / "dvc").rglob("*"))  # and the data version too

    # The reader reads everything and changes nothing.
    reader = _client(stack, monkeypatch, "reader")
    assert str(reader.get_model_version_by_alias("evaclip-micro", "champion").version) == "1"
    with pytest.raises(mlflow.exceptions.MlflowException, match="PERMISSION_DENIED|Permission denied"):
        reader.set_registered_model_alias("evaclip-micro", "champion", "1")
    with pytest.raises(mlflow.exceptions.MlflowException, match="PERMISSION_DENIED|Permission denied"):
        reader.delete_registered_model_alias("evaclip-micro", "champion")
    assert str(reader.get_model_version_by_alias("evaclip-micro", "champion").version) == "1"

    # Operators heard that the champion moved.
    moved = _wait_for(lambda: receiver.received("champion of evaclip-micro moved"))
    assert "now version 1 (was none): no champion yet" in moved[0]["text"]


def test_operators_hear_about_a_failed_run(stack, receiver):
    failed = _deploy_run(stack, {"overrides": ["train.stepz=1"], "bootstrap": False}, watch=True)
    assert failed.returncode != 0 and "FAILED" in failed.stdout.upper(), failed.stdout[-2000:]
    failure = _wait_for(lambda: receiver.received("Failed"))
    assert "evaclip-pipeline" in failure[0]["text"] and "train.stepz" in failure[0]["text"]


# --- promotion on the server --------------------------------------------------------------------
RACER = """
import json, sys, time
from pathlib import Path
import mlflow
from evaclip.config import load_params
from evaclip.tracking import TrackingRecord, register_and_promote
from evaclip.tracking.store import connect, experiment_id

class Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input

top1, go = float(sys.argv[1]), Path(sys.argv[2])
params = load_params("params.yaml", ["model.name=evaclip-micro", "tracking.registered_model=evaclip-race",
                                     "tracking.experiment=race"])
client = connect(params)
mlflow.set_experiment(experiment_id=experiment_id(client, params))
with mlflow.start_run() as run:
    mlflow.log_metric("zeroshot_top1", top1)
    info = mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=[])
record = TrackingRecord(mlflow.get_tracking_uri(), run.info.experiment_id, run.info.run_id, run.info.run_id,
                        info.model_uri, {"zeroshot_top1": top1}, "race-set", None)
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
print(json.dumps(register_and_promote(params, record).__dict__), flush=True)
"""


def test_two_pipelines_promoting_at_once_on_the_server_leave_the_better_champion(stack, tmp_path, monkeypatch):
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    client = _client(stack, monkeypatch)
    best = 0.0
    for round_, scores in enumerate([(0.40, 0.70), (0.90, 0.80), (0.85, 0.95)]):  # the later one wins or loses
        go = tmp_path / f"go-{round_}"
        racers = [subprocess.Popen([sys.executable, str(script), str(top1), str(go)], cwd=REPO, env=_env(stack),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for top1 in scores]
        for racer in racers:  # MLflow prints a link to each run it ends, before
            assert any(line.strip() == "ready" for line in iter(racer.stdout.readline, ""))
        go.touch()  # both decide at once
        outputs = [racer.communicate(timeout=300) for racer in racers]
        assert all(racer.returncode == 0 for racer in racers), [err[-3000:] for _, err in outputs]
        decisions = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
        best = max(best, *scores)
        champion = client.get_model_version_by_alias("evaclip-race", "champion")
        assert float(champion.tags["zeroshot_top1"]) == best, decisions
        assert {d["champion"] for d in decisions} <= {str(v.version) for v in
                                                     client.search_model_versions("name='evaclip-race'")}
    versions = client.search_model_versions("name='evaclip-race'")
    assert len(versions) == 6 and [m.name for m in client.search_registered_models("name LIKE 'evaclip-race%'")] == \
        ["evaclip-race"]  # every version kept, the promotion lock released


# --- failures: S3 during push and model logging -----------------------------------------------------
def test_s3_restarting_during_dvc_push_and_model_logging_is_retried(stack, project, tmp_path, monkeypatch):
    bucket = stack.state / "s3" / "dvc"
    pushed = sorted(p.relative_to(bucket) for p in bucket.rglob("*") if p.is_file())
    assert pushed, "the deployment run pushed its data version"
    shutil.rmtree(bucket)
    bucket.mkdir()
    for key, value in stack.env.items():  # the pipeline's identity and the S3 keys, as `source stack.env` gives
        monkeypatch.setenv(key, value)
    stack.stop_service("s3")
    retries = []

    def s3_back(attempt: int, error: str) -> None:  # the first attempt failed on a stopped S3: bring it back
        retries.append(error)
        stack.start_service("s3")

    evaclip_project.push(project, "stack", on_retry=s3_back)
    assert len(retries) == 1 and sorted(p.relative_to(bucket) for p in bucket.rglob("*") if p.is_file()) == pushed

    # Model logging goes through MLflow's artifact proxy: S3 stops, the server answers 500, the client retries.
    client = _client(stack, monkeypatch)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(stack.url("mlflow"))
    try:
        experiment = client.get_experiment_by_name("evaclip").experiment_id
        stack.stop_service("s3")
        proxy_log = stack.log_dir / "mlflow.log"
        failures_before = proxy_log.read_text(errors="replace").count("Traceback")
        logged: dict = {}

        def log_model() -> None:
            with mlflow.start_run(experiment_id=experiment) as run:
                logged["info"] = mlflow.pyfunc.log_model(name="model", python_model=_Identity(), pip_requirements=[])
                logged["run"] = run.info.run_id

        logger = threading.Thread(target=log_model)
        logger.start()
        _wait_for(lambda: proxy_log.read_text(errors="replace").count("Traceback") > failures_before)
        stack.start_service("s3")
        logger.join(600)
        assert "info" in logged, "model logging gave up"
        assert any(logged["info"].model_id in str(p) for p in (stack.state / "s3" / "mlflow").rglob("MLmodel"))
        assert mlflow.pyfunc.load_model(logged["info"].model_uri) is not None
    finally:
        mlflow.set_tracking_uri(before)


class _Identity(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


# --- cancellation and preemption with a real worker ---------------------------------------------------
def _training_processes(project: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if "evaclip.train.worker" in command and str(project) in command:
            found.append(process)
    return found


def _logged_steps(project: Path) -> list[int]:
    path = project / "outputs" / "train" / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def _latest(project: Path) -> str:
    path = project / "outputs" / "train" / "latest"
    return path.read_text().strip() if path.is_file() else ""


def _train_run(project: Path) -> str:
    """The MLflow run of the project's training (the checkpoint records it; mlflow_run.json once finished)."""
    from evaclip.train import checkpoints

    latest = checkpoints.latest_checkpoint(project / "outputs" / "train")
    return checkpoints.trainer_state(latest)["mlflow_run_id"]
