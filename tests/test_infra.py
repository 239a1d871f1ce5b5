"""infra/: the cluster launcher config against Ray's own schema, the KubeRay manifests against
the fields KubeRay requires, the MLflow server set-up; Ray versions equal pyproject's pin."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _pin(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"{package} is not pinned with == in pyproject.toml")


RAY = _pin("ray")
MLFLOW = _pin("mlflow")


def _load(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs[0] if len(docs) == 1 else docs


def test_pins_are_what_the_venv_runs():
    import mlflow
    import ray

    assert RAY == ray.__version__ == "2.60.0"
    assert MLFLOW == mlflow.__version__


# ----------------------------------------------------------------------------- cluster launcher


def test_launcher_config_validates_against_rays_cluster_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _load(INFRA / "aws" / "cluster.yaml")
    jsonschema.validate(config, schema)
    # The schema is strict: a misspelt key is an error, not ignored.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "max_worker": 4}, schema)
    # And what `ray up` checks beyond the schema, on the config with its defaults filled in.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_launcher_config_has_gpu_workers_on_the_pinned_ray_image():
    config = _load(INFRA / "aws" / "cluster.yaml")
    image = config["docker"]["image"]
    assert image == f"rayproject/ray:{RAY}-py311-gpu"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu, "no GPU worker node type"
    assert all(0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in gpu)
    assert config["provider"]["type"] == "aws"
    assert any("pip install" in c and "~/dpfah" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/dpfah"] == "."


# ----------------------------------------------------------------------------- KubeRay


def _check_container_image(container: dict) -> None:
    name, _, tag = container["image"].rpartition(":")
    assert name and tag.startswith(f"{RAY}-"), f"{container['image']}: tag must carry Ray {RAY}"


def _check_cluster_spec(spec: dict) -> None:
    """The fields KubeRay's ray.io/v1 RayCluster spec requires, and our conventions."""
    assert spec["rayVersion"] == RAY
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and all(c["name"] and c["image"] for c in head_containers)
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        pod = group["template"]["spec"]
        assert pod["containers"]
    gpu_groups = [g for g in groups if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    for group in gpu_groups:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            limits = c["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert c["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
            shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert shm, "/dev/shm is not mounted (DataLoader workers need more than the 64 MiB default)"
            assert volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
    for c in head_containers + [c for g in groups for c in g["template"]["spec"]["containers"]]:
        _check_container_image(c)
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("MLFLOW_TRACKING_URI", "").startswith("http"), c["name"]


def test_raycluster_manifest_has_what_kuberay_requires():
    doc = _load(INFRA / "kuberay" / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])


def test_rayjob_manifest_has_what_kuberay_requires():
    doc = _load(INFRA / "kuberay" / "rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert re.match(r"python -m pipeline\.\w+ ", spec["entrypoint"])
    assert "data.root=/mnt/shared" in spec["entrypoint"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec["rayClusterSpec"])


def test_shared_volume_claim_is_read_write_many():
    claim = _load(INFRA / "kuberay" / "shared-storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    for path in ("raycluster.yaml",):
        spec = _load(INFRA / "kuberay" / path)["spec"]
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
            assert claims == [claim["metadata"]["name"]]


def test_cluster_image_is_built_on_the_pinned_ray():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY)}-py311-gpu$", text, re.M)
    assert "pip install" in text and "DPFAH_GIT_COMMIT" in text
    # the image refuses to build without its compiled kernels (checked from site-packages)
    assert "DPFAH_REQUIRE_KERNELS=1 pip wheel" in text and "pip install --no-cache-dir /tmp/dist/dpfah_pipeline-*.whl" in text
    assert "python -I -c" in text and "k.status()" in text


# ----------------------------------------------------------------------------- MLflow server


def test_mlflow_server_uses_a_database_and_an_object_store():
    docs = {d["kind"]: d for d in _load(INFRA / "mlflow" / "kubernetes.yaml")}
    assert {"Deployment", "Service"} <= set(docs)
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[:2] == ["mlflow", "server"]
    assert any(a.startswith("--backend-store-uri=") for a in args)
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    assert "--serve-artifacts" in args
    assert container["image"].endswith(f":{MLFLOW}")
    # The URI the Ray pods use points at this Service.
    service = docs["Service"]
    port = service["spec"]["ports"][0]["port"]
    expected = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{port}"
    cluster = _load(INFRA / "kuberay" / "raycluster.yaml")["spec"]
    head_env = {e["name"]: e["value"] for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert head_env["MLFLOW_TRACKING_URI"] == expected
    allowed = next(a for a in args if a.startswith("--allowed-hosts="))
    assert f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:*" in allowed.split("=", 1)[1].split(",")

    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert re.search(rf"^FROM ghcr.io/mlflow/mlflow:v{re.escape(MLFLOW)}$", dockerfile, re.M)
    assert "psycopg2-binary==" in dockerfile and "boto3==" in dockerfile

    compose = _load(INFRA / "mlflow" / "docker-compose.yml")
    command = compose["services"]["mlflow"]["command"]
    assert any(c.startswith("--backend-store-uri=postgresql://") for c in command)
    assert any(c.startswith("--artifacts-destination=s3://") for c in command)
    assert "postgres" in compose["services"]


def test_readme_walks_through_a_gpu_cluster_run():
    text = (INFRA / "README.md").read_text()
    assert "## Run on a GPU cluster" in text
    for needle in ("ray up", "kubectl apply -f infra/kuberay", "ray job submit --working-dir .", "MLFLOW_TRACKING_URI", "data.root=/mnt/shared", "ray down"):
        assert needle in text, needle
