"""`train.launcher: trainjob`: the run as one Kubeflow Trainer TrainJob of `train.nodes` pods.

The TrainJob uses the operator's `torch-distributed` runtime, which gives each pod its node rank and node 0's
address (PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT); every pod runs `evaclip train` with the same
resolved params and `launcher: torchrun`, so the pods meet in torchrun's c10d rendezvous exactly as several
machines do (see `launch.py`). The process that submits it (the pipeline's pod, or `evaclip train` on a
workstation with kubectl access) owns the MLflow run, streams the pods' logs, waits for the job, and then
finds the trained model where the pods wrote it: a volume both mount (`train.kubernetes.volumes`) or
`train.checkpoint_uri`. Stopping it (Ctrl-C, SIGTERM) deletes the TrainJob; a failed one is kept for its logs.

kubernetes_asyncio is the client (prefect-kubernetes already depends on it): `pip install -e .[kubernetes]`.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from ..config import Params
from ..errors import ConfigError, EvaclipError

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
CONTAINER = "node"  # the torch-distributed runtime's trainer: replicated job and container
PARAMS_ENV = "EVACLIP_PARAMS_YAML"
PARAMS_IN_POD = "/tmp/evaclip-params.yaml"
# Settings of the submitting environment that the pods need too (never credentials: those come from Secrets).
PASSED_ON = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "DO_NOT_TRACK",
             "MLFLOW_DISABLE_TELEMETRY", "DVC_NO_ANALYTICS", "EVACLIP_PARENT_RUN_ID")


def job_name(params: Params) -> str:
    """A DNS-1035 name, unique per submission."""
    base = re.sub(r"[^a-z0-9-]", "-", f"evaclip-{params.model.name}".lower()).strip("-")[:40]
    return f"{base}-{int(time.time()):x}"


def trainjob_manifest(params: Params, name: str, run_env: dict[str, str]) -> dict:
    """The TrainJob of `params` (its pods run `evaclip train` with launcher torchrun)."""
    cfg, k8s = params.train, params.train.kubernetes
    image = k8s.image or os.environ.get("EVACLIP_IMAGE")
    if not image:
        raise ConfigError("train.kubernetes.image: the evaclip image to run (or set EVACLIP_IMAGE)")
    in_pod = params.model_copy(update={"train": cfg.model_copy(update={"launcher": "torchrun", "rdzv_endpoint": None})})
    env = {PARAMS_ENV: yaml.safe_dump(in_pod.model_dump(mode="json"), sort_keys=False), **run_env,
           **{key: os.environ[key] for key in PASSED_ON if os.environ.get(key)}}
    resources = {"limits": {"nvidia.com/gpu": str(cfg.devices)}}
    requests = {key: value for key, value in (("cpu", k8s.cpu), ("memory", k8s.memory)) if value}
    if requests:
        resources["requests"] = requests
    mounts = [{"name": f"volume-{i}", "mountPath": path} for i, path in enumerate(k8s.volumes)]
    volumes = [{"name": f"volume-{i}", "persistentVolumeClaim": {"claimName": claim}}
               for i, claim in enumerate(k8s.volumes.values())]
    mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shm_size}})
    pod_spec = {"volumes": volumes, "containers": [{"name": CONTAINER, "volumeMounts": mounts}]}
    if k8s.service_account:
        pod_spec["serviceAccountName"] = k8s.service_account
    trainer = {
        "image": image,
        "command": ["sh", "-c", f'printf "%s" "${PARAMS_ENV}" > {PARAMS_IN_POD} && exec evaclip train -p {PARAMS_IN_POD}'],
        "numNodes": cfg.nodes,
        "numProcPerNode": cfg.devices,
        "resourcesPerNode": resources,
        "env": [{"name": key, "value": value} for key, value in env.items()],
    }
    trainer["env"] += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                       for secret, key in _secret_keys(k8s.env_from_secrets)]  # a TrainJob has no envFrom
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": k8s.namespace,
                     "labels": {"app.kubernetes.io/name": "evaclip", "app.kubernetes.io/component": "train"}},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": k8s.runtime},
            "trainer": trainer,
            "runtimePatches": [{"manager": "evaclip", "trainingRuntimeSpec": {"template": {"spec": {
                "replicatedJobs": [{"name": CONTAINER, "template": {"spec": {"template": {"spec": pod_spec}}}}],
            }}}}],
        },
    }


def _secret_keys(entries: list[str]) -> list[tuple[str, str]]:
    """`SECRET:KEY` entries: the pods get the Secret's KEY as the variable KEY."""
    pairs = []
    for entry in entries:
        secret, _, key = entry.partition(":")
        if not secret or not key:
            raise ConfigError(f"train.kubernetes.env_from_secrets: {entry!r} is not SECRET:KEY")
        pairs.append((secret, key))
    return pairs


def run_trainjob(params: Params, run_env: dict[str, str], on_output: Callable[[str], None]) -> None:
    """Submit the TrainJob, stream its pods' logs, wait for it; raise naming the failure. Deletes it if stopped."""
    try:
        import kubernetes_asyncio  # noqa: F401
    except ImportError as err:
        raise ConfigError("train.launcher: trainjob needs the Kubernetes client: pip install -e '.[kubernetes]'") from err
    _clear_outputs(params)  # the model this run hands over must be this run's
    name = job_name(params)
    manifest = trainjob_manifest(params, name, run_env)
    # A stopped submitter (Ctrl-C, SIGTERM from a cancelled flow run or a drained node) deletes its TrainJob.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        asyncio.run(_run(manifest, params.train.kubernetes.poll_seconds, on_output))
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _clear_outputs(params: Params) -> None:
    from ..data.storage import filesystem
    from . import checkpoints

    out = Path(params.train.output_dir)
    for name in checkpoints.RUN_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    if params.train.checkpoint_uri:
        fs, base = filesystem(params.train.checkpoint_uri)
        if fs.exists(f"{base}/outputs"):
            fs.rm(f"{base}/outputs", recursive=True)


async def _run(manifest: dict, poll_seconds: float, on_output: Callable[[str], None]) -> None:
    from kubernetes_asyncio import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        await config.load_kube_config()
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    async with client.ApiClient() as api:
        jobs = client.CustomObjectsApi(api)
        await jobs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
        on_output(f"TrainJob {namespace}/{name} submitted: {manifest['spec']['trainer']['numNodes']} nodes")
        streams: dict[str, asyncio.Task] = {}
        try:
            while True:
                job = await jobs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
                await _follow_new_pods(client.CoreV1Api(api), namespace, name, streams, on_output)
                conditions = {c["type"]: c for c in job.get("status", {}).get("conditions", [])
                              if c.get("status") == "True"}
                if "Complete" in conditions:
                    break
                if "Failed" in conditions:  # kept, with its pods' logs, for whoever looks into it
                    raise EvaclipError(f"TrainJob {namespace}/{name} failed: {conditions['Failed'].get('message', '')}"
                                       f" (kubectl describe trainjob -n {namespace} {name})")
                await asyncio.sleep(poll_seconds)
            if streams:
                await asyncio.wait(streams.values(), timeout=30)  # the last lines
        except (KeyboardInterrupt, asyncio.CancelledError):
            on_output(f"stopped: deleting TrainJob {namespace}/{name}")
            await jobs.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                       propagation_policy="Foreground")
            raise
        finally:
            for stream in streams.values():
                stream.cancel()


async def _follow_new_pods(core, namespace: str, job: str, streams: dict, on_output) -> None:
    pods = await core.list_namespaced_pod(namespace, label_selector=f"jobset.sigs.k8s.io/jobset-name={job}")
    for pod in pods.items:
        if pod.metadata.name not in streams and pod.status.phase in ("Running", "Succeeded", "Failed"):
            index = pod.metadata.labels.get("batch.kubernetes.io/job-completion-index", "?")
            streams[pod.metadata.name] = asyncio.create_task(
                _stream(core, namespace, pod.metadata.name, f"[node {index}] ", on_output))


async def _stream(core, namespace: str, pod: str, prefix: str, on_output) -> None:
    response = await core.read_namespaced_pod_log(pod, namespace, container=CONTAINER, follow=True,
                                                  _preload_content=False)
    async for line in response.content:
        on_output(prefix + line.decode(errors="replace").rstrip())


def model_from_pods(params: Params) -> Path:
    """Where the pods' training left its outputs for this process: the shared volume, else checkpoint_uri."""
    from . import checkpoints

    out = Path(params.train.output_dir)
    if not (out / "model.safetensors").is_file() and params.train.checkpoint_uri:
        checkpoints.fetch_outputs(params.train.checkpoint_uri, out)
    if not (out / "model.safetensors").is_file():
        raise EvaclipError(f"the TrainJob finished but {out / 'model.safetensors'} is not here: mount train.output_dir "
                           "from a volume the pods share (train.kubernetes.volumes), or set train.checkpoint_uri")
    return out / "model.safetensors"
