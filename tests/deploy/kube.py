"""deploy/k8s rendered into what `podman kube play` (Podman 4.3) runs: the one documented transform, applied to
the manifests themselves (never a hand-kept copy).

What Podman lacks, and what the transform does about it:
- The native sidecar (an init container with `restartPolicy: Always`): Podman runs init containers to completion
  first, so cachecade would block the pod forever. It becomes the pod's first ordinary container.
- Probes: Podman ignores `readinessProbe`, and turns `livenessProbe`/`startupProbe` into health checks it cannot
  schedule without systemd. They are removed from what Podman gets; `probes()` reads them from the manifests, and
  the tests poll exactly those paths and ports themselves.
- A Deployment's template becomes a Pod per replica the test starts, with its own name.
- Test wiring: images by their local names (the app's python:3.11-slim-bookworm stand-in is the Debian base image
  with Python, which the image build already has), the pod on the host's network so that pods share the test's
  Redis on 127.0.0.1 (each pod's sidecar then takes its own port, CACHECADE_PORT, and the app's base URL with it,
  and binds to 127.0.0.1 only;
  the container port the manifests name, which Podman refuses to map on the host's network, is dropped),
  the ConfigMap's Redis and upstream URLs pointed at the test's own, the Secret's placeholder replaced (and the
  Secret created with `podman secret create`, see render()), and the app's
  command replaced by the test's client script (mounted read-only from the host).
"""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, resource) for every resource the kustomization lists."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [(name, doc) for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]  # fmt: skip


def manifests() -> dict[str, dict[str, Any]]:
    """kind/name -> resource, for every resource the kustomization lists."""
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc for _, doc in documents()}


@dataclass(frozen=True)
class Probe:
    kind: str  # startupProbe, livenessProbe, readinessProbe
    path: str
    port: int  # the container port the probe names


def sidecar(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod_spec.get("initContainers", []) + pod_spec["containers"] if c["name"] == "cachecade")


def probes(container: dict[str, Any]) -> list[Probe]:
    """The HTTP probes of a container, with named ports resolved to numbers."""
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    out = []
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container.get(kind, {}).get("httpGet")
        if get:
            port = get["port"]
            out.append(Probe(kind, get["path"], ports[port] if isinstance(port, str) else int(port)))
    return out


@dataclass(frozen=True)
class Wiring:
    pod: str
    port: int  # the sidecar's port on the host's network
    image: str
    app_image: str
    redis_url: str
    upstream_url: str
    admin_token: str
    app_script: Path  # the client the app container runs instead of the manifest's loop (tests/deploy/pod_client.py)
    app_site: Path  # a folder with the official openai client, put on the app's PYTHONPATH
    questions: tuple[str, ...]


def render(wiring: Wiring) -> tuple[str, str]:
    """The YAML `podman kube play` gets for one pod of the app Deployment, with its ConfigMap; and the Secret's
    data as the JSON `podman secret create` takes for a secretKeyRef (Podman 4.3 reads a secret as a JSON map of
    base64 values; it stores a Secret document played from YAML as YAML, then fails to read it: "not valid JSON")."""
    docs = manifests()
    config = copy.deepcopy(docs["ConfigMap/cachecade-config"])
    config["metadata"]["name"] = f"{wiring.pod}-config"
    config["data"] |= {"CACHECADE_REDIS_URL": wiring.redis_url, "CACHECADE_UPSTREAM_BASE_URL": wiring.upstream_url,
                       "CACHECADE_PORT": str(wiring.port), "CACHECADE_HOST": "127.0.0.1"}  # fmt: skip
    secret = copy.deepcopy(docs["Secret/cachecade-admin"])
    secret["metadata"]["name"] = f"{wiring.pod}-admin"
    secret.pop("stringData", None)
    secret["data"] = {"CACHECADE_ADMIN_TOKEN": base64.b64encode(wiring.admin_token.encode()).decode()}
    template = copy.deepcopy(docs["Deployment/app"]["spec"]["template"])
    spec = template["spec"]
    cachecade = sidecar(spec)
    spec["initContainers"] = [c for c in spec.get("initContainers", []) if c is not cachecade]
    if not spec["initContainers"]:
        del spec["initContainers"]
    cachecade.pop("restartPolicy", None)
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        cachecade.pop(kind, None)
    cachecade["image"] = wiring.image
    cachecade["envFrom"] = [{"configMapRef": {"name": config["metadata"]["name"]}}]
    for env in cachecade.get("env", []):
        if "secretKeyRef" in env.get("valueFrom", {}):
            env["valueFrom"]["secretKeyRef"]["name"] = secret["metadata"]["name"]
    app = next(c for c in spec["containers"] if c["name"] == "app")
    app["image"] = wiring.app_image
    app["command"] = ["python3", f"/client/{wiring.app_script.name}", *wiring.questions]
    app["env"] = [e for e in app.get("env", []) if e["name"] != "OPENAI_BASE_URL"] + [
        {"name": "OPENAI_BASE_URL", "value": f"http://localhost:{wiring.port}/v1"},
        {"name": "CACHECADE_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret["metadata"]["name"],
                                                                       "key": "CACHECADE_ADMIN_TOKEN"}}},
        {"name": "PYTHONPATH", "value": "/site"},
    ]  # fmt: skip
    app["volumeMounts"] = [*app.get("volumeMounts", []), {"name": "client", "mountPath": "/client", "readOnly": True},
                           {"name": "site", "mountPath": "/site", "readOnly": True}]  # fmt: skip
    app.pop("resources", None)  # the stand-in client imports more than the manifest's 128 MiB loop
    spec["volumes"] = [*spec.get("volumes", []),
                       {"name": "client", "hostPath": {"path": str(wiring.app_script.parent), "type": "Directory"}},
                       {"name": "site", "hostPath": {"path": str(wiring.app_site), "type": "Directory"}}]  # fmt: skip
    cachecade.pop("ports", None)  # on the host's network Podman maps no ports; the sidecar takes CACHECADE_PORT
    spec["containers"] = [cachecade, *spec["containers"]]
    spec["hostNetwork"] = True
    spec["restartPolicy"] = "Never"
    metadata = {"name": wiring.pod, "labels": template["metadata"]["labels"]}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
    return yaml.safe_dump_all([config, pod], sort_keys=False), json.dumps(secret["data"])
