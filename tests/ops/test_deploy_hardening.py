"""deploy/ is hardened, checked with the real tools where they are installed: systemd's own
exposure score, `kubectl kustomize`, the Kubernetes schema (kubernetes-validate), Pod Security
"restricted" field by field, a NetworkPolicy per role, and the image's build context."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ops.test_deploy import DEPLOY, ROOT, dockerfile_instructions, systemd_unit

K8S = DEPLOY / "k8s"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
MAX_EXPOSURE = 2.0
# Volume kinds Pod Security "restricted" admits.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def _tool(name: str, package: str) -> str:
    """The tool's path; installed with apt-get when missing and we are root (a fresh container),
    else the test is skipped saying what to install."""
    found = shutil.which(name)
    if found is None and shutil.which("apt-get") and _is_root():
        install = ["apt-get", "install", "-y", "--no-install-recommends", package]
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        if subprocess.run(install, capture_output=True, env=env, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, check=False)
            subprocess.run(install, capture_output=True, env=env, check=False)
        found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (apt-get install {package}, as root)")
    return found


def _is_root() -> bool:
    return os.geteuid() == 0


# --- systemd -------------------------------------------------------------------------------------


def exposure(unit: Path, tmp_path: Path) -> float:
    """`systemd-analyze security --offline=true`'s overall exposure of `unit` (a template is
    scored as an instance of it)."""
    analyze = _tool("systemd-analyze", "systemd")
    target = unit
    if unit.name.endswith("@.service"):
        target = tmp_path / unit.name.replace("@.service", "@site-1.service")
        shutil.copy(unit, target)
    done = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, f"no score from systemd-analyze:\n{done.stdout}\n{done.stderr}"
    return float(found.group(1))


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_units_score_low_exposure(unit: Path, tmp_path: Path) -> None:
    assert exposure(unit, tmp_path) <= MAX_EXPOSURE


def test_client_units_differ_per_instance() -> None:
    """Two sites on one host: each instance its own metrics port and config file (TOML or
    YAML), from /etc/tensorwire/<site>.env; nothing hard-coded."""
    service = systemd_unit(DEPLOY / "systemd" / "tensorwire-client@.service")["Service"]
    assert "%i" in service["EnvironmentFile"]
    assert not service["EnvironmentFile"].startswith("-"), "a missing file must stop the start"
    exec_start = service["ExecStart"]
    assert "--metrics-port ${TENSORWIRE_METRICS_PORT}" in exec_start
    assert "--config ${TENSORWIRE_CONFIG}" in exec_start
    assert not re.search(r"--metrics-port \d", exec_start)


def test_units_that_may_share_a_host_have_their_own_metrics_ports() -> None:
    """A relay may run beside a server or beside sites (a site's gateway machine): the server's
    and the relay's fixed metrics ports differ from each other and from the client instances'
    example ports (the client unit's comments: /etc/tensorwire/<site>.env)."""
    fixed = {}
    for name in ("tensorwire-server.service", "tensorwire-relay.service"):
        exec_start = systemd_unit(DEPLOY / "systemd" / name)["Service"]["ExecStart"]
        found = re.search(r"--metrics-port (\d+)", exec_start)
        assert found, f"{name}: no fixed --metrics-port"
        fixed[name] = int(found.group(1))
    client_unit = (DEPLOY / "systemd" / "tensorwire-client@.service").read_text()
    examples = {int(port) for port in re.findall(r"TENSORWIRE_METRICS_PORT=(\d+)", client_unit)}
    assert examples, "the client unit shows no example ports"
    assert len(set(fixed.values())) == len(fixed), fixed
    assert not set(fixed.values()) & examples, (fixed, examples)


# --- Kubernetes ----------------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


def pods() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in manifests():
        if doc["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
            yield doc["metadata"]["name"], doc["spec"]["template"]


def test_pods_meet_pod_security_restricted() -> None:
    checked = 0
    for name, template in pods():
        pod = template["spec"]
        assert pod.get("automountServiceAccountToken") is False, name
        for shared in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(shared), (name, shared)
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert context.get("runAsUser", 1) != 0, name
        assert context["seccompProfile"]["type"] == "RuntimeDefault", name
        for volume in pod.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUMES, (name, volume)
        for container in pod["containers"] + pod.get("initContainers", []):
            check_container(f"{name}/{container['name']}", container)
            checked += 1
    assert checked >= 4  # the server, a relay and two sites


def check_container(where: str, container: dict[str, Any]) -> None:
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False, where
    assert context["capabilities"]["drop"] == ["ALL"], where
    assert not context["capabilities"].get("add"), where
    assert not context.get("privileged"), where
    assert context.get("runAsUser", 1) != 0, where
    assert context.get("readOnlyRootFilesystem") is True, where
    for port in container.get("ports", []):
        assert "hostPort" not in port, where


def test_a_network_policy_covers_every_pod() -> None:
    policies = [doc for doc in manifests() if doc["kind"] == "NetworkPolicy"]
    assert policies, "no NetworkPolicy in deploy/k8s"
    for name, template in pods():
        labels = template["metadata"]["labels"].items()
        covering = [
            policy
            for policy in policies
            if policy["spec"]["podSelector"]["matchLabels"].items() <= labels
        ]
        assert covering, f"{name}: no NetworkPolicy selects it"
        for policy in covering:
            assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}, name


def test_kustomize_builds_and_every_object_is_valid(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (https://kubernetes.io/docs/tasks/tools/)")
    built = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, built.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(built.stdout) if doc}
    assert {"Job", "Service", "ConfigMap", "NetworkPolicy"} <= kinds
    pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (the schema check)"
    )
    (tmp_path / "all.yaml").write_text(built.stdout)
    validate = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    checked = subprocess.run(
        [*validate, str(tmp_path / "all.yaml")], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- the image's build context -------------------------------------------------------------------


def dockerignore() -> list[str]:
    path = ROOT / ".dockerignore"
    assert path.is_file(), "no .dockerignore at the repository root"
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for these patterns: a pattern matches the path or a folder above
    it, `**/` any depth, and the last matching pattern wins (`!` re-includes)."""
    verdict = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: end + 1]) for end in range(len(parts))]
    for pattern in patterns:
        glob = pattern.lstrip("!").rstrip("/")
        if glob.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(part, glob[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatchcase(prefix, glob) for prefix in prefixes)
        if hit:
            verdict = not pattern.startswith("!")
    return verdict


def test_dockerignore_keeps_the_context_small_and_the_image_whole() -> None:
    patterns = dockerignore()
    for heavy in (".git/HEAD", ".venv/bin/python", ".mypy_cache/x", "benchmarks/results/a.json"):
        assert ignored(heavy, patterns), f"{heavy} would be sent to the docker daemon"
    assert ignored("fl/__pycache__/cli.cpython-311.pyc", patterns)
    instructions = dockerfile_instructions(DEPLOY / "docker" / "Dockerfile")
    copies = [args.split() for name, args in instructions if name == "COPY"]
    sources = [word for words in copies if not words[0].startswith("--") for word in words[:-1]]
    assert sources, "no COPY from the build context in the Dockerfile"
    for source in sources:
        assert not ignored(source, patterns), f"the Dockerfile copies {source}, ignored"
