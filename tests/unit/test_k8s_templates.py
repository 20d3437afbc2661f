"""infra/k8s: the GPU work pool's base job template renders, through Prefect's own templating, into a Job
whose pod asks for the GPUs given; the KubeRay cluster gives each GPU worker what it tells Ray it has."""

from __future__ import annotations

import json

import yaml
from prefect.utilities.templating import apply_values, find_placeholders

from tests.conftest import ROOT

K8S = ROOT / "infra" / "k8s"


def render(**values) -> dict:
    t = json.loads((K8S / "gpu-job-template.json").read_text())
    props = t["variables"]["properties"]
    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    used = {p.name for p in find_placeholders(t["job_configuration"])}
    assert used <= set(props), f"placeholders without a variable: {used - set(props)}"
    return apply_values(t["job_configuration"], {**defaults, "name": "run", "command": "x", **values})


def test_gpu_job_template_asks_for_the_gpus_given():
    for gpus in (1, 4):
        job = render(gpus=gpus)["job_manifest"]
        pod = job["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "prefect-job" and pod["restartPolicy"] == "Never"  # what Prefect's worker requires
        assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus == c["resources"]["requests"]["nvidia.com/gpu"]
        assert c["resources"]["limits"]["memory"] == "64Gi"
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/cache", "/dev/shm"}
        assert c["envFrom"] == [{"secretRef": {"name": "rlme-storage", "optional": True}}]  # credentials: a Secret
    assert render(node_selector={"nvidia.com/gpu.product": "H200"})["job_manifest"]["spec"]["template"]["spec"][
        "nodeSelector"
    ] == {"nvidia.com/gpu.product": "H200"}


def test_raycluster_gpu_workers_match_their_ray_resources():
    rc = yaml.safe_load((K8S / "raycluster.yaml").read_text())
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # shards never land on the head
    images = {head["template"]["spec"]["containers"][0]["image"]}
    for group in rc["spec"]["workerGroupSpecs"]:
        (c,) = group["template"]["spec"]["containers"]
        images.add(c["image"])
        gpus = c["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus >= 1 and str(gpus) == group["rayStartParams"]["num-gpus"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert len(images) == 1  # driver code runs on every node: one rlme, one Ray
