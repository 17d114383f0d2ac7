"""infra/ agrees with itself, with pyproject.toml and with what is installed: versions, images, entrypoints."""
from __future__ import annotations

import importlib
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
PINNED = ("torch", "torchvision", "ray", "prefect", "fastapi")


def pyproject_requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def dockerfile_pins() -> dict[str, str]:
    text = (INFRA / "Dockerfile").read_text()
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_\-]+)(?:\[[^\]]*\])?==([^"*]+)"', text)}


def image_of_dockerfile() -> str:
    m = re.search(r"^FROM\s+(\S+)", (INFRA / "Dockerfile").read_text(), re.M)
    assert m, "Dockerfile has no FROM line"
    return m.group(1)


def load(name: str):
    return yaml.safe_load((INFRA / name).read_text())


def test_dockerfile_pins_match_pyproject_and_the_tested_stack():
    pins, reqs = dockerfile_pins(), pyproject_requirements()
    assert set(PINNED) <= set(pins), f"Dockerfile must pin {PINNED}; pins {pins}"
    for name in PINNED:
        version = Version(pins[name])
        assert reqs[name].specifier.contains(version), f"{name}=={version} outside pyproject's {reqs[name]}"
        assert pins[name] == importlib.metadata.version(name), f"{name}: image pins {pins[name]}, tests ran " \
                                                              f"{importlib.metadata.version(name)}"


def test_dockerfile_base_image_and_dataclasses_fix():
    base = image_of_dockerfile()
    ray_version = importlib.metadata.version("ray")
    assert base.startswith(f"rayproject/ray:{ray_version}-"), base
    assert "py311" in base  # the Python the project is tested on
    text = (INFRA / "Dockerfile").read_text()
    install, uninstall = text.index("pip install --no-cache-dir ."), text.index("pip uninstall -y dataclasses")
    assert install < uninstall, "the dataclasses backport must be removed after the package is installed"
    for folder in ("model", "pipeline", "flows", "recipes"):
        assert f"COPY {folder} ./{folder}" in text


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kuberay_cluster_uses_the_tested_ray_and_one_image():
    rc = load("kuberay-raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    assert rc["spec"]["rayVersion"] == importlib.metadata.version("ray")
    head = _containers(rc["spec"]["headGroupSpec"]["template"])
    workers = [c for g in rc["spec"]["workerGroupSpecs"] for c in _containers(g["template"])]
    images = {c["image"] for c in head + workers}
    assert len(images) == 1, f"head, worker and Prefect sidecar must share one image, got {images}"
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for c in workers]
    assert gpus and all(g == 8 for g in gpus)
    for c in head + workers:
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in env, c["name"]
    sidecar = next(c for c in head if c["name"] == "prefect-worker")
    assert sidecar["command"][:3] == ["prefect", "worker", "start"]
    assert _pool(sidecar["command"]) == prefect_pools()


def test_ray_up_config_runs_the_image_and_the_prefect_worker():
    cfg = load("ray-cluster.aws.yaml")
    kube_image = {c["image"] for c in _containers(load("kuberay-raycluster.yaml")["spec"]["headGroupSpec"]["template"])}
    assert {cfg["docker"]["image"]} == kube_image
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert any(t["node_config"]["InstanceType"] == "p5.48xlarge" for t in types.values())
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "prefect worker start" in head and _pool(head.split()) == prefect_pools()


def _pool(args: list[str]) -> set[str]:
    return {args[i + 1] for i, a in enumerate(args[:-1]) if a == "--pool"}


def prefect_pools() -> set[str]:
    return {d["work_pool"]["name"] for d in load("prefect.yaml")["deployments"]}


@pytest.mark.parametrize("deployment", load("prefect.yaml")["deployments"], ids=lambda d: d["name"])
def test_prefect_deployments_name_existing_flows(deployment):
    from flows.serve import deployments

    served = {d.name: d for d in deployments()}
    assert deployment["name"] in served, f"{deployment['name']} is not served locally ({sorted(served)})"
    path, func = deployment["entrypoint"].split(":")
    assert (REPO / path).is_file()
    flow = getattr(importlib.import_module(path[:-3].replace("/", ".")), func)
    assert flow.name == "microdit"
    assert served[deployment["name"]].entrypoint.endswith(deployment["entrypoint"])
    # Parameters given in the deployment are parameters of the flow; the recipe file exists.
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)
    assert (REPO / deployment["parameters"]["recipe"]).is_file()
    if "stage" in deployment["parameters"]:  # the default stage is a stage of the default recipe
        from pipeline.checks import load_run

        load_run(REPO / deployment["parameters"]["recipe"]).stage(deployment["parameters"]["stage"])


def test_prefect_yaml_version_is_the_tested_one():
    cfg = load("prefect.yaml")
    assert cfg["prefect-version"] == importlib.metadata.version("prefect")
    assert pyproject_requirements()["prefect"].specifier.contains(Version(cfg["prefect-version"]))


def _ray_schema() -> dict:
    import json

    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_ray_up_config_validates_against_rays_own_schema():
    jsonschema = pytest.importorskip("jsonschema")
    cfg = load("ray-cluster.aws.yaml")
    jsonschema.validate(cfg, _ray_schema())  # the schema `ray up` checks with, shipped in the ray wheel
    broken = {**cfg, "available_node_types": {**cfg["available_node_types"], "head": {"resources": {"head": "1"}}}}
    with pytest.raises(jsonschema.ValidationError):  # the check has teeth: a string count, no node_config
        jsonschema.validate(broken, _ray_schema())


def _kuberay_resources(start_params: dict) -> dict:
    """KubeRay's `rayStartParams.resources`: a JSON object written as a quoted JSON string."""
    import json

    raw = start_params.get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def test_cluster_configs_declare_the_node_resources_the_multinode_test_uses():
    """Without a KubeRay CRD schema offline, the manifest is checked structurally: head and worker groups declare
    the same custom resources as the ray-up config and the test cluster (tests/multinode.py)."""
    from multinode import NODE_RESOURCES

    types = load("ray-cluster.aws.yaml")["available_node_types"]
    head_type = load("ray-cluster.aws.yaml")["head_node_type"]
    custom = lambda res: {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory")}
    assert custom(types[head_type]["resources"]) == NODE_RESOURCES["head"]
    workers = [t for name, t in types.items() if name != head_type]
    assert workers and all(custom(t["resources"]) == NODE_RESOURCES["worker"] for t in workers)

    spec = load("kuberay-raycluster.yaml")["spec"]
    assert _kuberay_resources(spec["headGroupSpec"]["rayStartParams"]) == NODE_RESOURCES["head"]
    groups = spec["workerGroupSpecs"]
    assert groups and all(_kuberay_resources(g["rayStartParams"]) == NODE_RESOURCES["worker"] for g in groups)
    for g in groups:  # the structure KubeRay's CRD requires of a worker group
        assert {"groupName", "rayStartParams", "template"} <= set(g) and g["minReplicas"] <= g["replicas"] \
            <= g["maxReplicas"]
        assert all({"name", "image"} <= set(c) for c in g["template"]["spec"]["containers"])
    assert {"rayStartParams", "template"} <= set(spec["headGroupSpec"])


def test_plan_placement_settings_take_custom_resources_only():
    """`precompute.resources` and `stages.*.batch.resources` (what the cluster configs above label) are typed."""
    from pipeline.core.plan import PlanError, PrecomputeConfig, StageBatch, validate

    assert PrecomputeConfig().resources == {} and StageBatch().resources == {}
    assert validate(StageBatch, {"resources": {"worker_node": 1}}, "t").resources == {"worker_node": 1.0}
    with pytest.raises(PlanError, match="CPU"):
        validate(StageBatch, {"resources": {"CPU": 1}}, "stage 'x' batch")
    with pytest.raises(PlanError, match="worker_node"):
        validate(PrecomputeConfig, {"resources": {"worker_node": 0}}, "precompute")
