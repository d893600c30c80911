"""deploy/ cannot rot: every file parses, and every `tensorwire` command and flag it uses exists
in the CLI (checked against `tensorwire <command> --help`, run in-process on the same typer app
as the installed command: a process per command would import torch each time)."""

from __future__ import annotations

import configparser
import functools
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from typer.testing import CliRunner

from fl.cli import app
from fl.config import ClientConfig, RelayConfig, ServerConfig, load_config

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
HELP_ENV = {"COLUMNS": "200", "NO_COLOR": "1"}  # wide help: no flag is cut short
# The ops server's paths (transport/metrics.py) that probes may name.
HEALTH_PATHS = {"/healthz", "/readyz", "/metrics"}
# The kinds that run the daemons' pods (deploy/k8s runs them as Jobs: a finished daemon exits 0).
WORKLOADS = ("Deployment", "Job")


def config_kind(name: str) -> type[ServerConfig | RelayConfig | ClientConfig]:
    """What a configuration file (or ConfigMap entry) configures, by its name."""
    stem = Path(name).stem
    if stem == "server":
        return ServerConfig
    return RelayConfig if stem.startswith("relay") else ClientConfig


def files(pattern: str) -> list[Path]:
    found = sorted(DEPLOY.glob(pattern))
    assert found, f"no deploy/{pattern}"
    return found


def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", files("**/*.y*ml"), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    assert yaml_documents(path)


@pytest.mark.parametrize("path", files("config/*"), ids=lambda p: p.name)
def test_example_configs_are_valid_daemon_configs(path: Path) -> None:
    if path.suffix == ".toml":
        assert tomllib.loads(path.read_text())
    load_config(config_kind(path.name), path)  # ConfigFileError names the field otherwise


def test_k8s_configmap_holds_valid_configs(tmp_path: Path) -> None:
    (configmap,) = yaml_documents(DEPLOY / "k8s" / "config.yaml")
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text)
        load_config(config_kind(name), tmp_path / name)


def test_k8s_objects_are_well_formed() -> None:
    for path in files("k8s/*.yaml"):
        for doc in yaml_documents(path):
            assert {"apiVersion", "kind"} <= set(doc), path
            if doc["kind"] in WORKLOADS:
                check_workload(doc)


def check_workload(doc: dict[str, Any]) -> None:
    name = doc["metadata"]["name"]
    spec = doc["spec"]
    if "selector" in spec:  # a Job's is generated
        labels = spec["template"]["metadata"]["labels"].items()
        assert spec["selector"]["matchLabels"].items() <= labels
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True, name
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert any("secret" in volume for volume in volumes.values()), f"{name}: certificates"
    for container in pod["containers"]:
        for mount in container["volumeMounts"]:
            assert mount["name"] in volumes, f"{name}: mount of an undeclared volume"
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            check_probe(container[probe], ports, f"{name}.{probe}")


def check_probe(probe: dict[str, Any], ports: dict[str, int], where: str) -> None:
    if "httpGet" in probe:
        assert probe["httpGet"]["path"] in HEALTH_PATHS, where
        port = probe["httpGet"]["port"]
        assert port in ports or port in ports.values(), f"{where}: port {port}"
    else:
        assert probe["exec"]["command"][:2] == ["tensorwire", "health"], where


def test_k8s_services_select_a_workload() -> None:
    docs = [doc for path in files("k8s/*.yaml") for doc in yaml_documents(path)]
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] in WORKLOADS]
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= labels.items() for labels in pods), service["metadata"]["name"]


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in files("k8s/*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def test_dockerfile_structure() -> None:
    instructions = dockerfile_instructions(DEPLOY / "docker" / "Dockerfile")
    known = {"FROM", "RUN", "COPY", "ENV", "WORKDIR", "USER", "EXPOSE", "HEALTHCHECK"}
    known |= {"ENTRYPOINT", "CMD", "ARG", "LABEL"}
    assert {name for name, _ in instructions} <= known
    assert instructions[0][0] == "FROM", "FROM must come first"
    for name, args in instructions:
        if name == "FROM":
            image = args.split()[0]
            assert ":" in image, f"pin {image}"
            assert not image.endswith(":latest"), f"pin {image}"
    users = [args for name, args in instructions if name == "USER"]
    assert users, "the image must set USER"
    assert users[-1].split(":")[0] not in ("root", "0"), "the image must run non-root"
    final_stage = instructions[max(i for i, (n, _) in enumerate(instructions) if n == "FROM") :]
    assert any(name == "USER" for name, _ in final_stage), "USER in the final stage"
    for name, args in instructions:
        if name in ("ENTRYPOINT", "CMD"):
            json.loads(args)  # exec form: signals reach tensorwire, not a shell


def test_example_configs_show_a_relay_and_a_site_behind_it() -> None:
    """relay.toml dials the server; a site dials the relay and falls back to the server."""
    config = DEPLOY / "config"
    server = load_config(ServerConfig, config / "server.toml")
    relay = load_config(RelayConfig, config / "relay.toml")
    server_ports = {urlsplit(url).port for url in server.listen}
    relay_ports = {urlsplit(url).port for url in relay.listen}
    assert urlsplit(relay.upstream).port in server_ports
    sites = [load_config(ClientConfig, p) for p in files("config/site-*")]
    behind = [site for site in sites if urlsplit(site.server).port in relay_ports]
    assert behind, "no example site dials the relay"
    for site in behind:
        assert site.fallbacks, f"{site.site}: nowhere to turn when the relay dies"
        assert {urlsplit(url).port for url in site.fallbacks} <= server_ports, site.site
        assert relay.allowed_clients is None or site.site in relay.allowed_clients


def test_compose_puts_the_relay_between_the_server_and_a_site() -> None:
    """The relay's upstream is the server service; a site dials the relay's service and falls
    back to the server's; the relay's certificate names the host its site dials."""
    (compose,) = yaml_documents(DEPLOY / "docker" / "compose.yaml")
    services = compose["services"]
    by_command = {name: service["command"] for name, service in services.items()}
    (server,) = [name for name, argv in by_command.items() if argv[0] == "server"]
    (relay,) = [name for name, argv in by_command.items() if argv[0] == "relay"]
    upstream = urlsplit(_flag(by_command[relay], "--upstream"))
    assert upstream.hostname == server
    behind = [
        name
        for name, argv in by_command.items()
        if argv[0] == "client" and urlsplit(_flag(argv, "--server")).hostname == relay
    ]
    assert behind, "no compose site dials the relay"
    for name in behind:
        fallbacks = json.loads(services[name]["environment"]["TENSORWIRE_FALLBACKS"])
        assert [urlsplit(url).hostname for url in fallbacks] == [server], name
        assert relay in services[name]["depends_on"], name
    issued = [argv for argv in by_command.values() if argv[:2] == ["certs", "issue"]]
    relay_name = load_config(RelayConfig, DEPLOY / "config" / "relay.toml").name
    (issue,) = [argv for argv in issued if argv[2] == relay_name]
    assert _flag(issue, "--host") == relay, "the relay's certificate must name its service"


def _flag(argv: list[str], flag: str) -> str:
    assert flag in argv, f"no {flag} in {argv}"
    return argv[argv.index(flag) + 1]


def test_compose_images_are_pinned() -> None:
    (compose,) = yaml_documents(DEPLOY / "docker" / "compose.yaml")
    for name, service in compose["services"].items():
        assert ":" in service["image"], name
        assert not service["image"].endswith(":latest"), name


def systemd_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


@pytest.mark.parametrize("path", files("systemd/*.service"), ids=lambda p: p.name)
def test_systemd_units_parse(path: Path) -> None:
    unit = systemd_unit(path)
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    assert unit["Service"]["User"] not in ("root", "0")
    assert shlex.split(unit["Service"]["ExecStart"])[0].endswith("/tensorwire")


# --- commands and flags ----------------------------------------------------------------------


def invocations() -> Iterator[tuple[str, list[str]]]:
    """Every `tensorwire ...` argument list in deploy/, with where it was found."""
    for path in files("systemd/*.service"):
        argv = shlex.split(systemd_unit(path)["Service"]["ExecStart"])
        yield path.name, argv[1:]
    instructions = dockerfile_instructions(DEPLOY / "docker" / "Dockerfile")
    for name, args in instructions:
        if name == "CMD":
            yield f"Dockerfile {name}", json.loads(args)
        if name == "HEALTHCHECK":
            yield "Dockerfile HEALTHCHECK", json.loads(args.split("CMD", 1)[1])[1:]
    (compose,) = yaml_documents(DEPLOY / "docker" / "compose.yaml")
    for name, service in compose["services"].items():
        yield f"compose {name}", service["command"]
        if "healthcheck" in service:
            yield f"compose {name} healthcheck", service["healthcheck"]["test"][2:]
    for path in files("k8s/*.yaml"):
        for doc in yaml_documents(path):
            for container in _containers(doc):
                yield f"{path.name} {container['name']}", container["args"]
                for probe in ("livenessProbe", "readinessProbe"):
                    if "exec" in container.get(probe, {}):
                        yield f"{path.name} {probe}", container[probe]["exec"]["command"][1:]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] not in WORKLOADS:
        return []
    return list(doc["spec"]["template"]["spec"]["containers"])


@functools.cache
def help_text(command: tuple[str, ...]) -> str:
    done = CliRunner().invoke(app, [*command, "--help"], env=HELP_ENV)
    assert done.exit_code == 0, f"`tensorwire {' '.join(command)}` does not exist:\n{done.output}"
    return done.stdout


def command_and_flags(argv: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """("certs", "init") and ["--out", ...] from the argument list (commands come first)."""
    words = []
    for word in argv:
        if word.startswith("-"):
            break
        words.append(word)
    return tuple(words), [word.split("=")[0] for word in argv if word.startswith("--")]


CASES = list(invocations())


@pytest.mark.parametrize(("where", "argv"), CASES, ids=[f"{w}" for w, _ in CASES])
def test_commands_and_flags_exist_in_the_cli(where: str, argv: list[str]) -> None:
    command, flags = command_and_flags(argv)
    assert command, f"{where}: no command in {argv}"
    text = help_text(command)
    for flag in flags:
        assert re.search(rf"{re.escape(flag)}(?![\w-])", text), (
            f"{where}: `tensorwire {' '.join(command)}` has no {flag}"
        )


def test_every_file_in_deploy_is_checked() -> None:
    checked = {"README.md", "Dockerfile", "kustomization.yaml"}
    # grafana/*.json: tests/ops/test_alert_rules.py checks every query of the dashboard.
    patterns = ("**/*.y*ml", "config/*", "systemd/*.service", "grafana/*.json")
    checked |= {p.name for pattern in patterns for p in DEPLOY.glob(pattern)}
    on_disk = {p.name for p in DEPLOY.rglob("*") if p.is_file()}
    assert on_disk <= checked, f"add a check for {sorted(on_disk - checked)}"
