"""infra/: the cluster launcher config against Ray's own schema, every Kubernetes manifest against
the Kubernetes API schemas (strict, 1.30 to 1.37, from the kubernetes-validate package) and the
KubeRay resources against tests/data/kuberay-v1.schema.json, the MLflow server set-up; Ray
versions equal pyproject's pin. Then the facts that span files, which no schema sees: the trials
a search runs at once, the object store within /dev/shm, secrets kept out of every upload (with
Ray's own upload code), the compiled kernels a job imports from its uploaded sources, one MLflow
name, shared storage on the launcher's nodes, the image's layers. And who reaches what (issue 28):
the MLflow server behind its login in every deployment (serve.sh run for real, and the real server
where MLflow's auth extra is installed), secrets never in the repository, compose on 127.0.0.1, the
server's own bucket user, the NetworkPolicies, Ray's token and its dashboard kept inside. No
cluster, nothing downloaded."""

from __future__ import annotations

import json
import os
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
    gpu_groups = [
        g
        for g in groups
        if any(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in g["template"]["spec"]["containers"]
        )
    ]
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


# ----------------------------------------------------------------------------- MLflow server


def test_mlflow_server_uses_a_database_and_an_object_store():
    docs = {d["kind"]: d for d in _load(INFRA / "mlflow" / "kubernetes.yaml")}
    assert {"Deployment", "Service"} <= set(docs)
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert container["command"] == ["dpfah-mlflow-serve"]  # serve.sh: `mlflow server --app-name basic-auth`
    assert any(a.startswith("--backend-store-uri=") for a in args)
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    assert "--serve-artifacts" in args
    assert container["image"].endswith(f":{MLFLOW}")
    # The URI the Ray pods use points at this Service.
    service = docs["Service"]
    port = service["spec"]["ports"][0]["port"]
    expected = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{port}"
    cluster = _load(INFRA / "kuberay" / "raycluster.yaml")["spec"]
    head_env = {e["name"]: e.get("value") for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert head_env["MLFLOW_TRACKING_URI"] == expected
    allowed = next(a for a in args if a.startswith("--allowed-hosts="))
    assert f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:*" in allowed.split(
        "=", 1
    )[1].split(",")

    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert re.search(rf"^FROM ghcr.io/mlflow/mlflow:v{re.escape(MLFLOW)}$", dockerfile, re.M)
    assert "psycopg2-binary==" in dockerfile and "boto3==" in dockerfile

    compose = _load(INFRA / "mlflow" / "docker-compose.yml")
    command = compose["services"]["mlflow"]["command"]
    assert command[0] == "dpfah-mlflow-serve"
    assert any(c.startswith("--backend-store-uri=postgresql://") for c in command)
    assert any(c.startswith("--artifacts-destination=s3://") for c in command)
    assert "postgres" in compose["services"]


def test_readme_walks_through_a_gpu_cluster_run():
    text = (INFRA / "README.md").read_text()
    assert "## Run on a GPU cluster" in text
    for needle in (
        "ray up",
        "kubectl apply -f infra/kuberay",
        "ray job submit --working-dir .",
        "MLFLOW_TRACKING_URI",
        "data.root=/mnt/shared",
        "ray down",
    ):
        assert needle in text, needle


# ----------------------------------------------------------------------------- schemas

KUBERNETES_VERSIONS = [f"1.{minor}.0" for minor in range(30, 38)]
KUBERAY_SCHEMA = ROOT / "tests" / "data" / "kuberay-v1.schema.json"
K8S_MANIFESTS = [
    INFRA / "kuberay" / "shared-storage.yaml",
    INFRA / "kuberay" / "network-policy.yaml",
    INFRA / "mlflow" / "kubernetes.yaml",
]
KUBERAY_MANIFESTS = [INFRA / "kuberay" / "raycluster.yaml", INFRA / "kuberay" / "rayjob.yaml"]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay_validator(version: str):
    """A validator of ray.io/v1 resources whose pod templates, services, env entries and
    resource requirements are checked by Kubernetes ``version``'s strict schemas."""
    # a dev dependency (pyproject.toml): a missing one fails here rather than skipping the check
    import jsonschema
    import kubernetes_validate.utils as kv
    from referencing import Registry, Resource

    definitions = kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator(json.loads(KUBERAY_SCHEMA.read_text()), registry=registry)


@pytest.mark.parametrize("version", [KUBERNETES_VERSIONS[0], KUBERNETES_VERSIONS[-1]])
def test_every_manifest_validates_strictly(version):
    """Every Kubernetes object under infra/ against the API schemas of the oldest and newest
    Kubernetes checked (strict: an unknown field is an error); the KubeRay resources against
    the ray.io/v1 schema, their pod templates against the same Kubernetes version's."""
    import kubernetes_validate as kv

    for path in K8S_MANIFESTS:
        for doc in _docs(path):
            kv.validate(doc, version, strict=True)
    validator = _kuberay_validator(version)
    for path in KUBERAY_MANIFESTS:
        for doc in _docs(path):
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
            assert not errors, f"{path.name}: {errors}"


def test_manifests_validate_on_every_kubernetes_version_checked():
    import kubernetes_validate as kv

    for version in KUBERNETES_VERSIONS[1:-1]:
        for path in K8S_MANIFESTS:
            for doc in _docs(path):
                kv.validate(doc, version, strict=True)


def test_the_schemas_reject_what_the_api_server_would():
    """The validation is not vacuous: a misspelt field anywhere, a number where KubeRay takes a
    string, an unknown submission mode are errors."""
    import kubernetes_validate as kv

    validator = _kuberay_validator(KUBERNETES_VERSIONS[-1])
    job = _load(INFRA / "kuberay" / "rayjob.yaml")
    assert validator.is_valid(job)

    def broken(edit) -> dict:
        import copy

        doc = copy.deepcopy(job)
        edit(doc)
        return doc

    cluster = lambda d: d["spec"]["rayClusterSpec"]  # noqa: E731
    worker_container = lambda d: cluster(d)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]  # noqa: E731
    for edit in (
        lambda d: d["spec"].update(entrypointt="python"),  # RayJob spec
        lambda d: d["spec"].update(submissionMode="K8sJob"),
        lambda d: cluster(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),  # map of strings
        lambda d: cluster(d)["workerGroupSpecs"][0].update(maxReplica=4),
        lambda d: worker_container(d).update(volumeMount=[]),  # Kubernetes' Container
        lambda d: worker_container(d)["resources"].update(limit={}),
        lambda d: cluster(d)["authOptions"].update(mode="tokens"),  # KubeRay's enum
        lambda d: cluster(d)["authOptions"].update(secret="dpfah-ray-token"),
    ):
        assert not validator.is_valid(broken(edit))
    claim = _load(INFRA / "kuberay" / "shared-storage.yaml")
    with pytest.raises(kv.ValidationError):
        kv.validate(
            {**claim, "spec": {**claim["spec"], "accessMode": ["ReadWriteMany"]}}, KUBERNETES_VERSIONS[-1], strict=True
        )


# ----------------------------------------------------------------------------- cross-file facts


def _cluster_specs() -> dict[str, dict]:
    return {
        "raycluster.yaml": _load(INFRA / "kuberay" / "raycluster.yaml")["spec"],
        "rayjob.yaml": _load(INFRA / "kuberay" / "rayjob.yaml")["spec"]["rayClusterSpec"],
    }


def _gpus(group: dict) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in group["template"]["spec"]["containers"]
    )


def _tune_params(argv: list[str]):
    """What `python -m pipeline.tune <argv>` runs with (params.yaml, its --profile, its --set)."""
    from pipeline.config import load_params
    from pipeline.tune import build_parser

    args = build_parser().parse_args(argv)
    return load_params(ROOT / "params.yaml", args.overrides, profile=args.profile)


def _readme_tune_command() -> list[str]:
    """The search command of infra/README.md, its continuation lines joined and $SHARED expanded."""
    import shlex

    text = (INFRA / "README.md").read_text()
    shared = shlex.split(re.search(r'^SHARED="([^"]*)"$', text, re.M).group(1))
    command = re.search(r"^submit (python -m pipeline\.tune (?:.*\\\n)*.*)$", text, re.M).group(1).replace("\\\n", " ")
    words = shlex.split(command.replace("$SHARED", ""))
    return words[3:] + shared


def test_tune_runs_as_many_trials_at_once_as_the_worker_group_holds():
    """trials at once = the group's GPUs at its maximum size // workers per trial, > 1, and it is
    what the RayJob's entrypoint asks for; infra/README.md's command runs the same search."""
    import shlex
    from dataclasses import replace

    from pipeline.tune import max_concurrency

    job = _load(INFRA / "kuberay" / "rayjob.yaml")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipeline.tune"]
    params = _tune_params(argv[3:])
    t, c = params.train, params.tune
    assert t.use_gpu
    groups = [g for g in job["rayClusterSpec"]["workerGroupSpecs"] if _gpus(g)]
    group_gpus = sum(g["maxReplicas"] * _gpus(g) for g in groups)
    at_once = group_gpus // t.num_workers
    assert at_once > 1, f"{group_gpus} GPUs // {t.num_workers} workers per trial: one trial at a time"
    assert c.max_concurrent_trials == at_once, (
        f"entrypoint asks for {c.max_concurrent_trials} trials at once, the group holds {at_once}"
    )
    # what the stage itself computes: the explicit setting, and its default on the full group
    assert (
        max_concurrency(params)
        == at_once
        == max_concurrency(replace(params, tune=replace(c, max_concurrent_trials=None)), {"GPU": group_gpus})
    )
    assert len(c.space["eta"]) * len(c.space["zeta"]) * len(c.bits) >= at_once  # the grid fills the group
    for g in groups:  # a trial fits a pod, with one CPU per Train worker
        per_pod = _gpus(g) // t.num_workers
        assert per_pod >= 1 and _gpus(g) % t.num_workers == 0
        cpus = sum(int(ct["resources"]["limits"]["cpu"]) for ct in g["template"]["spec"]["containers"])
        assert cpus >= per_pod * t.num_workers

    readme = _tune_params(_readme_tune_command())
    assert readme.tune == c and readme.train == t and readme.data == params.data
    # the launcher's GPU workers hold the same number of trials
    config = _load(INFRA / "aws" / "cluster.yaml")
    instance_gpus = {"g5.12xlarge": 4}
    launcher_gpus = sum(
        nt["max_workers"] * instance_gpus[nt["node_config"]["InstanceType"]]
        for name, nt in config["available_node_types"].items()
        if name != config["head_node_type"]
    )
    assert launcher_gpus // t.num_workers == at_once


def _bytes(quantity: str | int) -> int:
    """A Kubernetes quantity (or Ray's byte count) in bytes."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(quantity))
    assert m, quantity
    scale = {
        None: 1,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
    }
    return int(m.group(1)) * scale[m.group(2)]


def test_object_store_fits_in_dev_shm_with_room_for_the_data_loaders():
    """Ray puts its object store in /dev/shm only when it fits (else on disk, in /tmp), and the
    DataLoader workers pass batches through the same /dev/shm: object-store-memory is set on
    every pod, /dev/shm holds it plus 1 GiB on the head and 2 GiB per GPU on GPU pods, and
    /dev/shm (memory-backed, counted against the pod's limit) takes at most half the pod's memory."""
    for name, spec in _cluster_specs().items():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            where = f"{name}: {group.get('groupName', 'head')}"
            store = group["rayStartParams"].get("object-store-memory")
            assert store is not None, (
                f"{where}: object-store-memory is not set (Ray's default is 30% of the pod's memory)"
            )
            pod = group["template"]["spec"]
            shm_volumes = {v["name"]: v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
            for container in pod["containers"]:
                mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
                shm = _bytes(shm_volumes[mount["name"]]["emptyDir"]["sizeLimit"])
                memory = _bytes(container["resources"]["limits"]["memory"])
                headroom = 2 * 2**30 * _gpus(group) if _gpus(group) else 2**30
                assert _bytes(store) + headroom <= shm, f"{where}: object store {store} + {headroom} > /dev/shm {shm}"
                assert shm <= memory // 2, f"{where}: /dev/shm {shm} is more than half the pod's memory {memory}"


def _ray_upload(root: Path, include_gitignore: bool = True) -> set[str]:
    """The files `ray job submit --working-dir <root>` uploads, by Ray's own traversal."""
    from ray._private.runtime_env.packaging import _dir_travel

    files: set[str] = set()
    _dir_travel(
        root,
        [],
        lambda p: files.add(p.relative_to(root).as_posix()) if p.is_file() else None,
        include_gitignore=include_gitignore,
    )
    return files


@pytest.fixture(scope="module")
def checkout_with_secrets(tmp_path_factory) -> Path:
    """A copy of the tracked files plus what a working checkout also holds: the MLflow server's
    passwords, the in-place compiled kernels, a virtualenv."""
    import shutil
    import subprocess

    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout ({e})")
    root = tmp_path_factory.mktemp("checkout")
    for rel in filter(None, listed.decode().split("\0")):
        if (ROOT / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, root / rel)
    (root / "infra" / "mlflow" / ".env").write_text("POSTGRES_PASSWORD=secret\n")
    (root / ".env.local").write_text("AWS_SECRET_ACCESS_KEY=secret\n")
    for module in ("_dpfah_hamming", "_dpfah_ranking"):
        (root / f"{module}.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").write_text("")
    return root


def test_secrets_stay_out_of_git_and_of_every_upload(checkout_with_secrets):
    import subprocess

    check = subprocess.run(["git", "check-ignore", "-q", "infra/mlflow/.env"], cwd=ROOT)
    assert check.returncode == 0, "infra/mlflow/.env is not git-ignored"
    secrets = {"infra/mlflow/.env", ".env.local"}
    # Ray's working_dir upload: with .gitignore, and without it (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1,
    # when only .rayignore protects them)
    for include_gitignore in (True, False):
        uploaded = _ray_upload(checkout_with_secrets, include_gitignore)
        assert not secrets & uploaded, f"include_gitignore={include_gitignore}: uploads {secrets & uploaded}"
        assert not [f for f in uploaded if f.endswith(".so") or f.startswith(".venv/")]
        assert {"dpfah/kernels.py", "pipeline/tune.py", "params.yaml", "profiles/paper.yaml"} <= uploaded
    # The launcher's file mounts rsync the checkout through both ignore files.
    config = _load(INFRA / "aws" / "cluster.yaml")
    assert config["file_mounts"]["~/dpfah"] == "."
    assert {".gitignore", ".rayignore"} <= set(config["rsync_filter"])
    # The image's build context is an allowlist that never reaches infra/ or a .env file.
    ignore = [
        line
        for line in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignore[0] == "*" and not [
        line for line in ignore if line.startswith("!") and ("infra" in line or ".env" in line)
    ]


def test_a_job_uploaded_by_ray_runs_the_compiled_kernels(checkout_with_secrets, tmp_path):
    """Ray's upload of the checkout (no .so files) unpacked as a job's working directory, first on
    sys.path: `python -m dpfah.kernels --require` there imports dpfah from the upload and the
    compiled kernels from the installed package. Without the installed package (-S: no
    site-packages) it finds no kernel and says so, with exit status 1."""
    import shutil
    import subprocess
    import sys

    from dpfah import kernels

    if "numpy" in kernels.status().values():
        if kernels.required():
            pytest.fail(f"{kernels.REQUIRE_ENV}=1 but the compiled kernels did not import: {kernels.status()}")
        pytest.skip("the compiled kernels are not built here")
    job = tmp_path / "working_dir"
    for rel in _ray_upload(checkout_with_secrets):
        (job / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(checkout_with_secrets / rel, job / rel)
    assert not list(job.rglob("*.so"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "dpfah.kernels", "--require"],
        cwd=job,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert Path(lines["dpfah"]).resolve() == (job / "dpfah" / "__init__.py").resolve()  # the upload's sources ran
    for part, module in kernels.MODULES.items():
        kernel, _, where = lines[part].partition(" ")
        assert kernel == kernels.status()[part] != "numpy"
        path = Path(re.fullmatch(rf"\({module}: (.+)\)", where).group(1)).resolve()
        assert path.suffix == ".so" and not path.is_relative_to(job.resolve())

    bare = subprocess.run(
        [sys.executable, "-S", "-m", "dpfah.kernels", "--require"],
        cwd=job,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bare.returncode == 1 and "no compiled kernel for hamming, ranking" in bare.stderr, bare.stdout + bare.stderr
    assert "hamming: numpy" in bare.stdout


def test_one_mlflow_name_throughout():
    """Every MLflow URL in the READMEs, the documentation and the manifests is the Service's
    cluster DNS name (a short `mlflow` does not resolve from the Ray pods' namespace), and
    every Ray pod and job uses it."""
    docs = {d["kind"]: d for d in _load(INFRA / "mlflow" / "kubernetes.yaml")}
    meta, port = docs["Service"]["metadata"], docs["Service"]["spec"]["ports"][0]["port"]
    expected = f"http://{meta['name']}.{meta['namespace']}.svc.cluster.local:{port}"
    files = [
        ROOT / "README.md",
        INFRA / "README.md",
        *sorted((ROOT / "docs").rglob("*.md")),
        *sorted(INFRA.rglob("*.yaml")),
        *sorted(INFRA.rglob("*.yml")),
    ]
    for path in files:
        for url in re.findall(r"https?://mlflow[\w.-]*(?::\d+)?", path.read_text()):
            assert url == expected, f"{path.relative_to(ROOT)}: {url} (expected {expected})"
    # the pages that tell a cluster user which URL to set
    assert expected in (ROOT / "docs" / "cluster.md").read_text() and expected in (INFRA / "README.md").read_text()
    for name, spec in _cluster_specs().items():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for c in group["template"]["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env["MLFLOW_TRACKING_URI"] == expected, f"{name}: {c['name']}"
    runtime_env = yaml.safe_load(_load(INFRA / "kuberay" / "rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == expected


def test_launcher_nodes_share_storage_and_run_a_current_ami():
    import ast
    import importlib.util
    import subprocess

    # Ray's built-in AMIs (read from its source: importing it needs boto3)
    source = Path(importlib.util.find_spec("ray.autoscaler._private.aws.config").origin).read_text()
    (node,) = [
        n
        for n in ast.parse(source).body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "DEFAULT_AMI"
    ]
    DEFAULT_AMI = ast.literal_eval(node.value)
    assert len(DEFAULT_AMI) > 10
    config = _load(INFRA / "aws" / "cluster.yaml")
    region = config["provider"]["region"]
    # every node mounts EFS at /mnt/shared, and the container sees it at the same path
    (mount,) = [c for c in config["initialization_commands"] if "mount" in c]
    assert "/mnt/shared" in mount and f"REGION={region};" in mount and ".efs.$REGION.amazonaws.com:/" in mount
    assert "mountpoint -q /mnt/shared ||" in mount and "|| exit 1" in mount
    assert "--volume=/mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    if "EFS_ID=fs-REPLACE-ME;" in mount:  # as shipped: `ray up` stops at once, saying what to set
        proc = subprocess.run(["bash", "-c", mount], capture_output=True, text=True, timeout=10)
        assert proc.returncode == 1 and "set EFS_ID" in proc.stderr, proc.stderr
    # what the jobs write goes to that volume
    readme = _tune_params(_readme_tune_command())
    assert readme.data.root.startswith("/mnt/shared/") and readme.train.storage_path.startswith("/mnt/shared/")
    # one pinned AMI family on every node type, not Ray's built-in default (Ubuntu 18.04)
    amis = {nt["node_config"].get("ImageId") for nt in config["available_node_types"].values()}
    (ami,) = amis
    assert ami and ami not in DEFAULT_AMI.values()
    assert re.fullmatch(
        r"ami-[0-9a-f]{8,17}|resolve:ssm:/aws/service/deeplearning/ami/x86_64/[\w.-]*ubuntu-24\.04/latest/ami-id", ami
    ), ami
    if ami.startswith("resolve:ssm:"):  # the head's autoscaler resolves it for the workers: checked at `ray up`
        (check,) = [c for c in config["head_setup_commands"] if "get_parameters" in c]
        assert f"name = '{ami.removeprefix('resolve:ssm:')}'" in check and f"region_name='{region}'" in check
        assert "|| { echo" in check and "exit 1; }" in check
    # the kernels are required on every node, and checked as a job imports them
    assert any(c.startswith("DPFAH_REQUIRE_KERNELS=1 pip install") and "~/dpfah" in c for c in config["setup_commands"])
    assert "cd ~/dpfah && python -m dpfah.kernels --require" in config["setup_commands"]


def test_cluster_image_installs_dependencies_before_the_code_and_requires_its_kernels():
    import subprocess
    import sys

    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert text.startswith("# syntax=docker/dockerfile:1\n")
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY)}-py311-gpu$", text, re.M)
    steps = re.findall(r"^(?:FROM|WORKDIR|COPY|RUN|ARG|ENV)\b(?:.*\\\n)*.*$", text, re.M)
    deps = next(i for i, s in enumerate(steps) if "pip install -r /tmp/requirements.txt" in s)
    code = next(i for i, s in enumerate(steps) if s.startswith("COPY") and "dpfah" in s)
    assert deps < code, "the dependencies are installed after the code is copied"
    assert [s for s in steps[:deps] if s.startswith("COPY")] == ["COPY --chown=ray:users pyproject.toml ./"]
    assert "--mount=type=cache,target=/home/ray/.cache/pip" in steps[deps] and "--no-cache-dir" not in text
    # the requirements step really lists pyproject's pins
    snippet = (
        re.search(r'python -c "(.*?)" *\\\n *> /tmp/requirements.txt', steps[deps], re.S).group(1).replace("\\n", "\\n")
    )
    out = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    # kernels: required at build, then imported both from site-packages and as a job in WORKDIR does
    install = next(i for i, s in enumerate(steps) if "DPFAH_REQUIRE_KERNELS=1 pip wheel" in s)
    check = next(i for i, s in enumerate(steps) if "python -I -m dpfah.kernels --require" in s)
    assert code < install < check and "&& python -m dpfah.kernels --require" in steps[check]
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M).group(1)
    assert f'"dpfah: {workdir}/dpfah/__init__.py"' in steps[check]
    runtime_env = yaml.safe_load(_load(INFRA / "kuberay" / "rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == workdir
    assert "DPFAH_GIT_COMMIT" in text


def test_compose_images_are_pinned():
    compose = _load(INFRA / "mlflow" / "docker-compose.yml")
    for name, service in compose["services"].items():
        if "image" in service:
            image, _, tag = service["image"].rpartition(":")
            assert image and tag and tag != "latest", f"{name}: {service['image']} is not pinned"
    assert re.fullmatch(
        r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", compose["services"]["minio"]["image"].split(":")[1]
    )


# ----------------------------------------------------------------------------- who reaches what (issue 28)

SERVE = INFRA / "mlflow" / "serve.sh"
AUTH_ENV = (
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "MLFLOW_AUTH_DATABASE_URI",
)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|ROOT_USER|ADMIN_USERNAME")


def _ray_pod_templates() -> dict[str, dict]:
    """Every pod template of the KubeRay manifests, by file and group."""
    return {
        f"{name}: {group.get('groupName', 'head')}": group["template"]
        for name, spec in _cluster_specs().items()
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    }


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) == {"matchLabels"}, selector  # the only form these manifests use
    return selector["matchLabels"].items() <= labels.items()


def test_every_mlflow_deployment_starts_the_server_behind_its_login():
    """The image runs serve.sh (`mlflow server --app-name basic-auth`) in every deployment, and its
    credentials come from a Secret (Kubernetes) or the environment (compose), never from the
    repository: compose's `${VAR:?message}` stops `docker compose up` when one is unset or empty."""
    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert "COPY --chmod=755 serve.sh /usr/local/bin/dpfah-mlflow-serve" in dockerfile
    assert re.search(r"\bFlask-WTF==[\d.]+", dockerfile)  # MLflow's auth extra: without it the app cannot start
    assert SERVE.read_text().rstrip().endswith('exec mlflow server --app-name basic-auth "$@"')

    docs = {d["kind"]: d for d in _load(INFRA / "mlflow" / "kubernetes.yaml")}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["dpfah-mlflow-serve"] and "--app-name" not in " ".join(container["args"])
    env = {e["name"]: e for e in container["env"]}
    for name in AUTH_ENV:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "mlflow-auth" and not ref.get("optional"), name
    for name, entry in env.items():
        if SECRET_NAME.search(name) or name.endswith("URI"):
            assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], f"{name} is not from a Secret"

    text = (INFRA / "mlflow" / "docker-compose.yml").read_text()
    service = _load(INFRA / "mlflow" / "docker-compose.yml")["services"]["mlflow"]
    assert service["command"][0] == "dpfah-mlflow-serve"
    for name in AUTH_ENV[:3]:
        assert re.fullmatch(rf"\$\{{{name}:\?set {name} in infra/mlflow/\.env\}}", service["environment"][name])
    assert service["environment"]["MLFLOW_AUTH_DATABASE_URI"] == "sqlite:////mlflow-auth/basic_auth.db"
    assert "mlflow-auth:/mlflow-auth" in service["volumes"]  # users and permissions outlive the container
    # every secret compose substitutes is required wherever it is used: no default, no silent empty
    used = re.findall(r"\$\{(\w+)([^}]*)\}", text)
    secrets = {name for name, _ in used if SECRET_NAME.search(name)}
    assert set(AUTH_ENV[:3]) | {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_S3_SECRET_KEY"} <= secrets
    for name, rest in used:
        if name in secrets:
            assert rest.startswith(":?"), f"${{{name}{rest}}}: compose would start without it"
    for svc in _load(INFRA / "mlflow" / "docker-compose.yml")["services"].values():
        for name, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(name):
                assert str(value).startswith("${"), f"{name} has a value in the repository"


def _fake_command(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/bin/sh\n" + script)
    (bin_dir / name).chmod(0o755)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_status(url: str, authorization: str | None = None) -> int:
    """The HTTP status of a GET (an error status too); OSError when nothing answers."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url)
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # 2 busy cores: slow
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_serve_script_refuses_to_start_without_its_login_and_writes_mlflows_auth_config(tmp_path, monkeypatch):
    """serve.sh names the first missing setting (exit 2, one line, mlflow never started); with all
    set it starts `mlflow server --app-name basic-auth` with an auth config that MLflow's own
    reader reads back: the database URI exactly (a URL-encoded password holds %, which
    configparser would take for interpolation), and no admin password in the file."""
    import importlib.util
    import subprocess

    import mlflow

    # MLflow's reader of that file, without the auth app around it (which needs Flask-WTF)
    spec = importlib.util.spec_from_file_location(
        "mlflow_auth_config", Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    )
    auth_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auth_config)
    bin_dir = tmp_path / "bin"
    # `mlflow` here records what it was started with: the real one is started in the next test
    _fake_command(bin_dir, "mlflow", f'echo "$@" > {tmp_path}/argv; cp "$MLFLOW_AUTH_CONFIG_PATH" {tmp_path}/ini\n')
    uri = "postgresql://mlflow:p%40ss%25word@db:5432/mlflow_auth"
    full = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "MLFLOW_AUTH_ADMIN_USERNAME": "team-admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-admin-password",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "0123456789abcdef",
        "MLFLOW_AUTH_DATABASE_URI": uri,
    }

    def serve(env):
        return subprocess.run(["sh", str(SERVE), "--port", "5999"], env=env, capture_output=True, text=True, timeout=30)

    for name in AUTH_ENV:
        for env in ({k: v for k, v in full.items() if k != name}, {**full, name: ""}):
            proc = serve(env)
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
            assert proc.stderr.startswith(f"dpfah-mlflow-serve: {name} is not set;"), proc.stderr
            assert not (tmp_path / "argv").exists()
    proc = serve({**full, "MLFLOW_AUTH_DEFAULT_PERMISSION": "ALL"})
    assert proc.returncode == 2 and "MLFLOW_AUTH_DEFAULT_PERMISSION=ALL is not one of" in proc.stderr

    proc = serve(full)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "argv").read_text().split() == ["server", "--app-name", "basic-auth", "--port", "5999"]
    ini = (tmp_path / "ini").read_text()
    assert "a-long-admin-password" not in ini and "0123456789abcdef" not in ini
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / "ini"))
    for name in AUTH_ENV[:2]:
        monkeypatch.setenv(name, full[name])
    config = auth_config.read_auth_config()
    assert config.database_uri == uri
    assert config.default_permission == "READ"
    assert (config.admin_username, config.admin_password) == ("team-admin", "a-long-admin-password")


@pytest.mark.slow
def test_the_team_server_refuses_requests_without_a_login(tmp_path):
    """The real server started by serve.sh (SQLite stores here): no login or a wrong one gets 401
    and creates nothing; the admin of MLFLOW_AUTH_ADMIN_* gets in, and so does the pipeline's
    MLflow client through MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    pytest.importorskip("flask_wtf", reason="MLflow's login needs its auth extra: pip install 'mlflow[auth]'")
    import signal
    import subprocess
    import sys
    import time
    from base64 import b64encode

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MLFLOW_AUTH_ADMIN_USERNAME": "team-admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-admin-password",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "0123456789abcdef",
        "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path}/auth.db",
    }
    args = [f"--backend-store-uri=sqlite:///{tmp_path}/mlflow.db", "--host=127.0.0.1", f"--port={port}", "--workers=1"]
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(["sh", str(SERVE), *args], env=env, stdout=log, stderr=log, start_new_session=True)
    try:

        def get(path: str, user: str | None = None, password: str = "") -> int:
            login = "Basic " + b64encode(f"{user}:{password}".encode()).decode() if user else None
            return _http_status(url + path, login)

        deadline = time.monotonic() + 120
        while True:
            try:
                if get("/health") == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(1)
        search = "/api/2.0/mlflow/experiments/search?max_results=10"
        assert get(search) == 401
        assert get(search, "team-admin", "wrong-password") == 401
        assert get(search, "nobody", "a-long-admin-password") == 401
        assert get(search, "team-admin", "a-long-admin-password") == 200

        def create_experiment(name: str, **login: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-c", f"import mlflow; print(mlflow.create_experiment({name!r}))"],
                env={**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", **login},
                capture_output=True,
                text=True,
                timeout=120,
            )

        admin = {"MLFLOW_TRACKING_USERNAME": "team-admin", "MLFLOW_TRACKING_PASSWORD": "a-long-admin-password"}
        client = create_experiment("dpfah-check", **admin)
        assert client.returncode == 0, client.stderr
        anonymous = create_experiment("anonymous")
        assert anonymous.returncode != 0 and "401" in anonymous.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_the_mlflow_server_reaches_its_bucket_as_its_own_user_not_the_root():
    """compose: MinIO's root credentials reach only MinIO and the setup job, which makes the
    server's own user with a policy for its bucket alone (list it; read, write, delete its
    objects); the server gets that user's keys."""
    compose = _load(INFRA / "mlflow" / "docker-compose.yml")
    services = compose["services"]
    for name, service in services.items():
        if name not in ("minio", "minio-setup"):
            assert "MINIO_ROOT" not in yaml.safe_dump(service), f"{name} sees MinIO's root credentials"
    server_env = services["mlflow"]["environment"]
    assert server_env["AWS_ACCESS_KEY_ID"].startswith("${MLFLOW_S3_ACCESS_KEY:?")
    assert server_env["AWS_SECRET_ACCESS_KEY"].startswith("${MLFLOW_S3_SECRET_KEY:?")
    assert services["mlflow"]["depends_on"]["minio-setup"] == {"condition": "service_completed_successfully"}
    setup = services["minio-setup"]
    assert setup["entrypoint"] == ["sh", "/setup/minio-setup.sh"]
    assert set(setup["volumes"]) == {
        "./minio-setup.sh:/setup/minio-setup.sh:ro",
        "./minio-policy.json:/setup/minio-policy.json:ro",
    }
    bucket = next(c for c in services["mlflow"]["command"] if c.startswith("--artifacts-destination=s3://"))
    bucket = bucket.removeprefix("--artifacts-destination=s3://").split("/")[0]
    policy = json.loads((INFRA / "mlflow" / "minio-policy.json").read_text())
    granted = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        for resource in statement["Resource"]:
            granted.setdefault(resource, set()).update(statement["Action"])
    assert granted == {
        f"arn:aws:s3:::{bucket}": {"s3:GetBucketLocation", "s3:ListBucket"},
        f"arn:aws:s3:::{bucket}/*": {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"},
    }
    script = (INFRA / "mlflow" / "minio-setup.sh").read_text()
    assert f"mc mb --ignore-existing local/{bucket}" in script


@pytest.mark.parametrize("run", ["first", "again", "attach fails"])
def test_minio_setup_makes_the_servers_user_and_runs_again(tmp_path, run):
    """minio-setup.sh against a stand-in `mc` (no MinIO here) that records its calls: the user is
    made and the bucket policy attached; on a second `docker compose up`, where `mc admin policy
    attach` refuses a policy already attached, it checks the attachment and succeeds; an attach
    that failed otherwise fails the job (and so the server does not start). It refuses to make
    the root user the server's."""
    import subprocess

    bin_dir = tmp_path / "bin"
    calls = tmp_path / "calls"
    attached = "mlflow-artifacts" if run == "again" else "readwrite"
    _fake_command(
        bin_dir,
        "mc",
        f'echo "$@" >> {calls}\n'
        'case "$1 $2 $3" in\n'
        f'  "admin policy attach") exit {0 if run == "first" else 1};;\n'
        f'  "--json admin user") echo "{{\\"accessKey\\":\\"$5\\",\\"policyName\\":\\"{attached}\\"}}";;\n'
        "esac\n",
    )
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "MINIO_ROOT_USER": "root-user",
        "MINIO_ROOT_PASSWORD": "root-password",
        "MLFLOW_S3_ACCESS_KEY": "mlflow-server",
        "MLFLOW_S3_SECRET_KEY": "server-secret",
    }
    script = str(INFRA / "mlflow" / "minio-setup.sh")
    proc = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=30)
    assert (proc.returncode == 0) == (run != "attach fails"), proc.stderr
    made = calls.read_text().splitlines()
    assert made[0] == "alias set local http://minio:9000 root-user root-password"
    assert "admin user add local mlflow-server server-secret" in made
    assert "admin policy create local mlflow-artifacts /setup/minio-policy.json" in made
    assert "admin policy attach local mlflow-artifacts --user mlflow-server" in made
    assert ("--json admin user info local mlflow-server" in made) == (run != "first")
    calls.unlink()
    proc = subprocess.run(
        ["sh", script], env={**env, "MLFLOW_S3_ACCESS_KEY": "root-user"}, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and "must not be MinIO's root user" in proc.stderr
    assert not any("user add" in line for line in calls.read_text().splitlines())


def test_compose_publishes_the_server_on_the_hosts_loopback_unless_told_otherwise():
    services = _load(INFRA / "mlflow" / "docker-compose.yml")["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert published == {"mlflow": ["${MLFLOW_BIND:-127.0.0.1}:5000:5000"]}
    assert not [name for name, s in services.items() if s.get("network_mode") == "host"]


def test_network_policies_admit_only_the_ray_pods_and_the_ingress_to_mlflow_and_nothing_outside_to_ray():
    docs = {d["kind"]: d for d in _load(INFRA / "mlflow" / "kubernetes.yaml")}
    pod = docs["Deployment"]["spec"]["template"]
    policy = docs["NetworkPolicy"]["spec"]
    assert docs["NetworkPolicy"]["metadata"]["namespace"] == docs["Deployment"]["metadata"]["namespace"]
    assert _selects(policy["podSelector"], pod["metadata"]["labels"]) and policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    port = pod["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port}]
    ray_peer, ingress_peer = rule["from"]
    assert not [p for p in rule["from"] if "ipBlock" in p]
    # the Ray pods, in whatever namespace they run
    assert ray_peer["namespaceSelector"] == {}
    for where, template in _ray_pod_templates().items():
        assert _selects(ray_peer["podSelector"], template["metadata"]["labels"]), f"{where} cannot reach MLflow"
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        for name, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-client", "key": key}, where
    # the ingress controller's namespace, and none of its other pods' namespaces
    assert set(ingress_peer) == {"namespaceSelector"}
    assert set(ingress_peer["namespaceSelector"]["matchLabels"]) == {"kubernetes.io/metadata.name"}
    assert docs["Service"]["spec"].get("type", "ClusterIP") == "ClusterIP"

    ray_policy = _load(INFRA / "kuberay" / "network-policy.yaml")
    spec = ray_policy["spec"]
    assert "namespace" not in ray_policy["metadata"]  # applied beside the Ray pods
    for where, template in _ray_pod_templates().items():
        assert _selects(spec["podSelector"], template["metadata"]["labels"]), f"{where} is not covered"
    assert spec["policyTypes"] == ["Ingress"]
    assert spec["ingress"] == [{"from": [{"namespaceSelector": {}}]}]  # in-cluster peers only, no ipBlock


def test_ray_requires_its_token_and_its_dashboard_stays_inside_the_cluster(tmp_path):
    """KubeRay: token authentication with a named Secret on both manifests, the head Service
    ClusterIP and no Ingress. Launcher: RAY_AUTH_MODE=token in every node's container, the token
    copied to every node (setup stops, saying what to run, without one), and the dashboard on the
    head's loopback, reached through `ray dashboard`'s SSH tunnel."""
    import subprocess

    for name, spec in _cluster_specs().items():
        assert spec["authOptions"] == {"mode": "token", "secretName": "dpfah-ray-token"}, name
        assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)  # KubeRay needs it for authOptions
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress"), name
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", name

    config = _load(INFRA / "aws" / "cluster.yaml")
    assert "--env=RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "0.0.0.0" not in command, command
    (check,) = [c for c in config["setup_commands"] if "auth_token" in c]
    assert config["setup_commands"].index(check) == 0
    proc = subprocess.run(["bash", "-c", check], env={"HOME": str(tmp_path)}, capture_output=True, text=True)
    assert proc.returncode == 1 and "ray get-auth-token --generate" in proc.stderr, proc.stderr
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0123456789abcdef")
    assert subprocess.run(["bash", "-c", check], env={"HOME": str(tmp_path)}).returncode == 0


def test_the_docs_say_how_to_submit_through_the_authenticated_dashboard():
    for path in (ROOT / "docs" / "cluster.md", INFRA / "README.md"):
        text = path.read_text()
        for needle in (
            "kubectl port-forward svc/dpfah-head-svc 8265:8265",
            "RAY_AUTH_MODE=token",
            "RAY_AUTH_TOKEN=$(kubectl get secret dpfah-ray-token",
            "ray get-auth-token --generate",
            "ray dashboard infra/aws/cluster.yaml",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
        ):
            assert needle in text, f"{path.relative_to(ROOT)}: {needle}"


@pytest.mark.slow
def test_a_ray_head_started_as_the_launcher_starts_it_runs_jobs_only_with_the_token(tmp_path):
    """`ray start --head` with the launcher's auth mode and dashboard host (read from
    infra/aws/cluster.yaml) and the token where its file_mounts put it: the Jobs API answers 401
    without the token and 403 with a wrong one, and `ray job submit` works the two ways the docs
    give (the token file of `ray get-auth-token --generate`; RAY_AUTH_TOKEN from a Secret); the
    dashboard is not reachable on another address of this machine. Private temp dir and ports:
    nothing of another Ray on this machine is touched."""
    import secrets
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    config = _load(INFRA / "aws" / "cluster.yaml")
    (auth_env,) = [o for o in config["docker"]["run_options"] if o.startswith("--env=RAY_AUTH_MODE=")]
    mode = auth_env.split("=", 2)[2]
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    host = re.search(r"--dashboard-host=(\S+)", head_start).group(1)
    assert (mode, host) == ("token", "127.0.0.1")

    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    home, no_token_home = tmp_path / "home", tmp_path / "elsewhere"
    (home / ".ray").mkdir(parents=True)
    no_token_home.mkdir()
    token = secrets.token_hex(32)
    (home / ".ray" / "auth_token").write_text(token + "\n")
    ray = str(Path(sys.executable).parent / "ray")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(RAY_TMPDIR=str(temp), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    dashboard = _free_port()
    log = open(tmp_path / "head.log", "w")  # closed in finally
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            f"--port={_free_port()}",
            f"--dashboard-host={host}",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
            "--num-cpus=1",
            "--disable-usage-stats",
        ],
        env={**base, "HOME": str(home), "RAY_AUTH_MODE": mode},
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:

        def status(address: str, token: str | None = None) -> int:
            return _http_status(f"http://{address}:{dashboard}/api/jobs/", f"Bearer {token}" if token else None)

        deadline = time.monotonic() + 180
        while True:
            try:
                status("127.0.0.1")
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()
                time.sleep(1)
        assert status("127.0.0.1") == 401
        assert status("127.0.0.1", "not-the-token") in (401, 403)
        assert status("127.0.0.1", token) == 200

        def submit(**env: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [ray, "job", "submit", "--address", url, "--", "python", "-c", "print('job ran', 6 * 7)"],
                env={**base, **env},
                capture_output=True,
                text=True,
                timeout=300,
            )

        for env in (
            {"HOME": str(home), "RAY_AUTH_MODE": "token"},  # the launcher's way: ~/.ray/auth_token
            {"HOME": str(no_token_home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},  # KubeRay's
        ):
            job = submit(**env)
            assert job.returncode == 0 and "job ran 42" in job.stdout, job.stdout + job.stderr
        for env in (
            {"HOME": str(no_token_home)},
            {"HOME": str(no_token_home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
        ):
            job = submit(**env)
            assert job.returncode != 0 and "AuthenticationError" in job.stderr, job.stdout + job.stderr
            assert "job ran" not in job.stdout
        # another address of this machine, if it has one: nothing listens there
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect(("192.0.2.1", 9))  # no packet is sent: only picks the outgoing interface
                address = s.getsockname()[0]
            except OSError:
                address = "127.0.0.1"
        if not address.startswith("127."):
            with pytest.raises(OSError):
                status(address)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(2)
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
