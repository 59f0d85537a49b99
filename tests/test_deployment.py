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
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 8
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert volumes[mounts["/app/outputs"]]["persistentVolumeClaim"]["claimName"] == "evaclip-outputs"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"].startswith("http://mlflow")


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


def test_the_gpu_cluster_training_fits_one_pod():
    parameters = PipelineParameters(**_deployments()["gpu-cluster"]["parameters"]["parameters"])
    params = resolve(parameters)
    gpus = _deployments()["gpu-cluster"]["work_pool"]["job_variables"]["gpus"]
    assert params.train.devices == gpus and params.train.nodes == 1 and params.train.precision == "bf16"
    assert params.model.name == load_params(profile_path("eva02-clip-b16")).model.name
