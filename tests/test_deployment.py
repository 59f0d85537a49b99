"""prefect.yaml: the deployments it declares, and the Kubernetes job template of the GPU-cluster deployment,
rendered by prefect-kubernetes itself (no cluster exists here). tests/test_stack.py deploys the process-pool
deployment on a real `prefect server` and runs it with `prefect deployment run --watch`."""

from __future__ import annotations

import asyncio
import json
import uuid

import jsonschema
import pytest
import yaml

from evaclip.config import load_params, profile_path
from flows.pipeline import PipelineParameters, base_file, overrides_of

from .conftest import REPO


def resolve(parameters: PipelineParameters):
    """The params a deployment's run would write into the project (params.yaml, or its profile, + overrides)."""
    return load_params(base_file(parameters, REPO) or REPO / "params.yaml", overrides_of(parameters))

TEMPLATE = REPO / "deploy" / "kubernetes" / "base-job-template.json"


def _deployments() -> dict:
    return {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}


def test_prefect_yaml_declares_a_weekly_schedule_on_a_process_pool():
    deployment = _deployments()["weekly-retraining"]
    assert deployment["entrypoint"] == "flows/pipeline.py:pipeline"
    assert deployment["schedules"][0]["cron"] == "0 3 * * 1"
    assert deployment["work_pool"]["name"] == "evaclip"


def test_every_deployment_has_parameters_the_flow_accepts():
    for name, deployment in _deployments().items():
        parameters = PipelineParameters(**deployment["parameters"]["parameters"])
        params = resolve(parameters)  # the profile exists and every override is a known key
        assert params.train.devices >= 1, name


@pytest.fixture(scope="module")
def rendered_job():
    """The Kubernetes Job the worker would submit for the gpu-cluster deployment."""
    pytest.importorskip("prefect_kubernetes")
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

    template = json.loads(TEMPLATE.read_text())
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    # Our template keeps every variable and configuration field of prefect-kubernetes' own one.
    default = KubernetesWorker.get_default_base_job_template()
    assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"])
    assert set(default["job_configuration"]) <= set(template["job_configuration"])
    values = dict(_deployments()["gpu-cluster"]["work_pool"]["job_variables"], image="registry.example/evaclip:1")
    jsonschema.validate(values, template["variables"])
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="weekly-run"))  # what the worker does next
    return config.job_manifest


def test_the_gpu_cluster_job_requests_gpus_shared_memory_and_volumes(rendered_job):
    pod = rendered_job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/evaclip:1"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1  # evaluation; training is the TrainJob
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes[mounts["/app/outputs"]]["persistentVolumeClaim"]["claimName"] == "evaclip-outputs"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"].startswith("http://mlflow")
    # The TrainJob's pods run the flow pod's own image (`prefect deploy` fills both from $EVACLIP_IMAGE).
    assert env["EVACLIP_IMAGE"] == _deployments()["gpu-cluster"]["work_pool"]["job_variables"]["image"]
    assert volumes[mounts["/assets"]]["persistentVolumeClaim"]["claimName"] == "evaclip-assets"


def test_the_rendered_job_is_a_valid_kubernetes_job(rendered_job):
    """Kubernetes' own client models drop what they do not know: a misspelt field would not survive a round trip."""
    from kubernetes_asyncio.client import ApiClient

    class Response:
        data = json.dumps(rendered_job)

    async def round_trip():
        async with ApiClient() as api:
            return api.sanitize_for_serialization(api.deserialize(Response(), "V1Job"))

    expected = json.loads(json.dumps(rendered_job))
    for container in expected["spec"]["template"]["spec"]["containers"]:  # quantities come back as strings
        container["resources"] = {kind: {k: str(v) for k, v in amounts.items()}
                                  for kind, amounts in container["resources"].items()}
    assert asyncio.run(round_trip()) == expected


@pytest.fixture(scope="module")
def gpu_cluster_params():
    return resolve(PipelineParameters(**_deployments()["gpu-cluster"]["parameters"]["parameters"]))


def test_the_gpu_cluster_trains_eva02_clip_b16_as_one_trainjob(gpu_cluster_params):
    params = gpu_cluster_params
    assert params.train.launcher == "trainjob" and params.train.nodes == 8 and params.train.devices == 8
    assert params.train.precision == "bf16" and params.model.attention == "sdpa"  # the image has no flash-attn
    assert params.model.name == load_params(profile_path("eva02-clip-b16")).model.name
    # Everything the run reads is in a volume the deployment declares, or in object storage.
    mounted = ["/app/outputs", "/app/outputs/data", "/assets"]
    assert sorted(params.train.kubernetes.volumes) == mounted
    for path in (params.init.vision, params.init.text, *params.eval.sets):
        assert str(path).startswith("/assets/"), path
    assert all(entry.path.startswith("s3://") for entry in params.data.mix)
    assert params.train.checkpoint_uri.startswith("s3://")


def test_the_trainjob_manifest_is_valid_for_kubeflow_trainer(gpu_cluster_params, monkeypatch):
    """Kubeflow Trainer's own pydantic models: a misspelt field would not survive the round trip."""
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

    from evaclip.train.kubernetes import PARAMS_ENV, trainjob_manifest

    monkeypatch.setenv("EVACLIP_IMAGE", "registry.example/evaclip:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.evaclip.svc:9000")
    run_env = {"EVACLIP_MLFLOW_RUN_ID": "abc", "MLFLOW_TRACKING_URI": "http://mlflow.evaclip.svc:5000"}
    manifest = trainjob_manifest(gpu_cluster_params, "evaclip-eva02-1", run_env)
    assert TrainerV1alpha1TrainJob.from_dict(manifest).to_dict() == manifest

    trainer = manifest["spec"]["trainer"]
    assert manifest["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert trainer["numNodes"] == 8 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    env = {e["name"]: e for e in trainer["env"]}
    # The pods train with the submitted params, through torchrun's c10d rendezvous at node 0 (PET_* from the runtime).
    in_pod = load_params(_write(env[PARAMS_ENV]["value"]))
    assert in_pod.train.launcher == "torchrun" and in_pod.train.nodes == 8
    assert in_pod.model_dump(exclude={"train"}) == gpu_cluster_params.model_dump(exclude={"train"})
    assert env["EVACLIP_MLFLOW_RUN_ID"]["value"] == "abc"  # rank 0 logs into the submitter's run
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.evaclip.svc:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "evaclip-s3",
                                                                         "key": "AWS_SECRET_ACCESS_KEY"}
    assert "AWS_SECRET_ACCESS_KEY" not in {k for k, e in env.items() if "value" in e}  # never a literal secret
    (job,) = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = job["template"]["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"]: claims.get(m["name"]) for m in pod["containers"][0]["volumeMounts"]}
    assert mounts == {"/app/outputs": "evaclip-outputs", "/app/outputs/data": "evaclip-data",
                      "/assets": "evaclip-assets", "/dev/shm": None}
    assert pod["serviceAccountName"] == "evaclip"


def test_a_trainjob_needs_an_image(gpu_cluster_params, monkeypatch):
    from evaclip.errors import ConfigError
    from evaclip.train.kubernetes import trainjob_manifest

    monkeypatch.delenv("EVACLIP_IMAGE", raising=False)
    with pytest.raises(ConfigError, match="train.kubernetes.image"):
        trainjob_manifest(gpu_cluster_params, "x", {})


def _write(text: str):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "params.yaml"
    path.write_text(text)
    return path
