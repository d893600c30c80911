"""The shipped deployment runs real jobs: every file in deploy/config/ and every daemon
configuration in the Kubernetes ConfigMap (deploy/k8s/config.yaml) runs a FedAvg job end to end
here, as real processes on this machine, and the server saves the final model.

Only what one machine forces is rewritten: listen addresses (127.0.0.1, a free port), the
clients' server URL (to match), pki_dir (a PKI made here by `tensorwire certs init`), the paths
under /var/lib/tensorwire and /opt/tensorwire (to this checkout and tmp_path), and the job's
length (2 rounds, a join_timeout of at most a minute). TLS, accumulator_dir, save_path, the
clients' in-process mode and script arguments, and the command lines the Kubernetes Jobs run
stay as shipped. Started again with the same configuration, the server finds its job finished
in state_dir, says so and exits 0.

The manifests are also checked for what the job's life needs: the server and the clients are
Jobs (a Deployment restarts a daemon that finished), the server's state is on a
PersistentVolumeClaim, and the Service selects the server's pod.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from fl.cli_certs import certs_app
from fl.task import MLP

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
CLI = [str(Path(sys.executable).with_name("tensorwire"))]  # the installed command
# Where the image keeps the examples (Dockerfile: COPY examples /opt/tensorwire/examples).
IMAGE_EXAMPLES = PurePosixPath("/opt/tensorwire/examples")
ROUNDS = 2
JOIN_TIMEOUT = 60.0
JOB_TIMEOUT = 180.0  # the whole job: three processes that each import torch, on two cores
RESTART_TIMEOUT = 60.0
FEDAVG_PATHS = ("accumulator_dir", "save_path", "initial_model")


# --- the shipped configuration sets ----------------------------------------------------------


@dataclass(frozen=True)
class Daemon:
    """One daemon as deployed: its configuration file and the `tensorwire` command line that
    runs it (`--config` names the file)."""

    role: str  # "server" or "client"
    name: str  # the configuration file's name: its suffix says TOML or YAML
    text: str
    argv: tuple[str, ...]

    @property
    def settings(self) -> dict[str, Any]:
        return parse_config(self.name, self.text)


def parse_config(name: str, text: str) -> dict[str, Any]:
    data = tomllib.loads(text) if name.endswith(".toml") else yaml.safe_load(text)
    assert isinstance(data, dict), name
    return data


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> list[dict[str, Any]]:
    listed = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"]
    return [doc for name in listed for doc in yaml_documents(DEPLOY / "k8s" / name)]


def configmap() -> dict[str, Any]:
    (found,) = [doc for doc in k8s_objects() if doc["kind"] == "ConfigMap"]
    return found


def jobs() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in k8s_objects() if doc["kind"] == "Job"}


def container(job: dict[str, Any]) -> dict[str, Any]:
    (only,) = job["spec"]["template"]["spec"]["containers"]
    return only


def option(argv: list[str] | tuple[str, ...], flag: str) -> str:
    assert flag in argv, f"no {flag} in {argv}"
    return argv[list(argv).index(flag) + 1]


def configmap_key(job: dict[str, Any]) -> str:
    """The ConfigMap entry the Job's daemon reads: its --config path is a subPath mount of it."""
    pod = job["spec"]["template"]["spec"]
    path = option(container(job)["args"], "--config")
    (mount,) = [m for m in container(job)["volumeMounts"] if m["mountPath"] == path]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == configmap()["metadata"]["name"], job["metadata"]["name"]
    return str(mount["subPath"])


def deploy_config_set() -> list[Daemon]:
    """deploy/config/: the server and one client per site, run as docs/operations.md says."""
    daemons = []
    for path in sorted((DEPLOY / "config").iterdir()):
        role = "server" if path.stem == "server" else "client"
        daemons.append(Daemon(role, path.name, path.read_text(), (role, "--config", "CONFIG")))
    return daemons


def configmap_set() -> list[Daemon]:
    """The ConfigMap's entries, each with the command line of the Job that mounts it."""
    data = configmap()["data"]
    daemons = []
    for job in jobs().values():
        argv = container(job)["args"]
        key = configmap_key(job)
        daemons.append(Daemon(argv[0], key, data[key], tuple(argv)))
    assert {d.name for d in daemons} == set(data), "a ConfigMap entry no Job reads"
    return daemons


CONFIG_SETS = {"deploy-config": deploy_config_set, "k8s-configmap": configmap_set}


# --- rewriting for one machine ---------------------------------------------------------------


def dump_toml(data: Mapping[str, Any]) -> str:
    """TOML for the configurations' shapes: scalars and lists of them, then (nested) tables."""
    lines: list[str] = []

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, str):
            return json.dumps(item)  # JSON's escapes are TOML's basic-string escapes
        if isinstance(item, int | float) and math.isfinite(item):
            return repr(item)
        if isinstance(item, list):
            return "[" + ", ".join(value(element) for element in item) + "]"
        raise TypeError(f"no TOML for {item!r}")

    def table(path: list[str], mapping: Mapping[str, Any]) -> None:
        if path:
            lines.append(f"\n[{'.'.join(path)}]")
        tables = {key: item for key, item in mapping.items() if isinstance(item, dict)}
        lines.extend(f"{k} = {value(v)}" for k, v in mapping.items() if k not in tables)
        for key, item in tables.items():
            table([*path, key], item)

    table([], data)
    return "\n".join(lines) + "\n"


def dump_config(name: str, data: Mapping[str, Any]) -> str:
    return dump_toml(data) if name.endswith(".toml") else yaml.safe_dump(dict(data))


@dataclass
class Machine:
    """This machine's stand-ins for the deployment's: a PKI, a root for absolute paths, a
    working directory, and where the daemons' configurations and output go."""

    tmp: Path

    @property
    def pki(self) -> Path:
        return self.tmp / "pki"

    @property
    def root(self) -> Path:
        return self.tmp / "root"

    @property
    def work(self) -> Path:
        return self.tmp / "work"

    def local_path(self, shipped: str) -> str:
        path = PurePosixPath(shipped)
        if path.is_relative_to(IMAGE_EXAMPLES):
            return str(ROOT / "examples" / path.relative_to(IMAGE_EXAMPLES))
        if path.is_absolute():
            return str(self.root / path.relative_to("/"))
        return str(self.work / path)  # the daemons run in `work`

    def server_config(self, shipped: dict[str, Any]) -> dict[str, Any]:
        config = json.loads(json.dumps(shipped))  # a deep copy
        config["listen"] = [_with_address(url, "127.0.0.1", 0) for url in config["listen"]]
        if config.get("pki_dir"):
            config["pki_dir"] = str(self.pki)
        if "state_dir" in config:
            config["state_dir"] = self.local_path(config["state_dir"])
        fedavg = config.setdefault("fedavg", {})
        for key in FEDAVG_PATHS:
            if fedavg.get(key):
                fedavg[key] = self.local_path(fedavg[key])
        fedavg["rounds"] = ROUNDS
        fedavg["join_timeout"] = min(fedavg.get("join_timeout", JOIN_TIMEOUT), JOIN_TIMEOUT)
        return config

    def client_config(self, shipped: dict[str, Any], server_urls: list[str]) -> dict[str, Any]:
        config = json.loads(json.dumps(shipped))
        scheme = urlsplit(config["server"]).scheme
        matching = [url for url in server_urls if urlsplit(url).scheme == scheme]
        assert matching, (
            f"site {config['site']} dials {scheme}://, the server listens on {server_urls}"
        )
        config["server"] = matching[0]
        if config.get("pki_dir"):
            config["pki_dir"] = str(self.pki)
        config["script"] = self.local_path(config["script"])
        return config

    def command(self, daemon: Daemon, config: Path) -> list[str]:
        """The daemon's command line with this machine's --config; an ops server, if the
        deployment has one, on a free loopback port."""
        argv = list(daemon.argv)
        argv[argv.index("--config") + 1] = str(config)
        for flag, local in (("--metrics-port", "0"), ("--metrics-host", "127.0.0.1")):
            if flag in argv:
                argv[argv.index(flag) + 1] = local
        return [*CLI, *argv]


def _with_address(url: str, host: str, port: int) -> str:
    return urlunsplit(urlsplit(url)._replace(netloc=f"{host}:{port}"))


# --- processes -------------------------------------------------------------------------------


class Process:
    """A daemon with its stdout and stderr in files (nothing blocks on a full pipe)."""

    def __init__(self, label: str, command: list[str], logs: Path, cwd: Path) -> None:
        self.label = label
        self.stdout_path = logs / f"{label}.out"
        self.stderr_path = logs / f"{label}.err"
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.popen = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=out, stderr=err)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def output(self) -> str:
        """stdout then stderr: under --log-format json every sentence is a record on stderr."""
        return self.stdout + self.stderr_path.read_text(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        out = self.stdout[-chars:]
        err = self.stderr_path.read_text(errors="replace")[-chars:]
        return (
            f"--- {self.label} (exit {self.popen.poll()}) stdout tail:\n{out}\n"
            f"--- {self.label} stderr tail:\n{err}"
        )

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def tails(processes: list[Process]) -> str:
    return "\n".join(process.tail() for process in processes)


def wait_for_urls(server: Process, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.output.splitlines():
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line still being written
                if record.get("event") == "listening":
                    return [str(url) for url in record["urls"]]
            elif "listening on " in line:
                return line.split("listening on ", 1)[1].split()
        if server.popen.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"the server printed no URL\n{server.tail()}")


def wait_all(processes: list[Process], timeout: float) -> None:
    """Until every process exited; as soon as one fails, stop the others (a failed daemon
    would leave the rest waiting for their timeouts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [process.popen.poll() for process in processes]
        if all(code is not None for code in codes) or any(code for code in codes):
            break
        time.sleep(0.2)
    else:
        for process in processes:
            process.stop()
        raise AssertionError(f"the job did not end within {timeout:.0f} s\n{tails(processes)}")
    for process in processes:
        process.stop()


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    here = Machine(tmp_path)
    here.work.mkdir()
    (tmp_path / "logs").mkdir()
    return here


def make_pki(machine: Machine, sites: list[str]) -> None:
    """`tensorwire certs init` (in-process: a process of its own would import torch): the
    server's certificate names localhost, 127.0.0.1 and ::1, each site's its site name."""
    arguments = ["init", "--out", str(machine.pki)]
    for site in sites:
        arguments += ["--client", site]
    made = CliRunner().invoke(certs_app, arguments)
    assert made.exit_code == 0, made.output


# --- the jobs --------------------------------------------------------------------------------


@pytest.mark.timeout(JOB_TIMEOUT + RESTART_TIMEOUT + 60)
@pytest.mark.parametrize("config_set", sorted(CONFIG_SETS))
def test_shipped_configs_run_a_job_to_the_end(machine: Machine, config_set: str) -> None:
    daemons = CONFIG_SETS[config_set]()
    (server_daemon,) = [d for d in daemons if d.role == "server"]
    client_daemons = [d for d in daemons if d.role == "client"]
    assert len(client_daemons) == server_daemon.settings["fedavg"]["min_clients"]
    make_pki(machine, [d.settings["site"] for d in client_daemons])
    configs = machine.tmp / "configs"
    configs.mkdir()
    logs = machine.tmp / "logs"

    server_settings = machine.server_config(server_daemon.settings)
    server_file = configs / server_daemon.name
    server_file.write_text(dump_config(server_daemon.name, server_settings))
    server_command = machine.command(server_daemon, server_file)
    processes = [Process("server", server_command, logs, machine.work)]
    try:
        urls = wait_for_urls(processes[0], timeout=60)
        for daemon in client_daemons:
            settings = machine.client_config(daemon.settings, urls)
            path = configs / daemon.name
            path.write_text(dump_config(daemon.name, settings))
            label = settings["site"]
            processes.append(Process(label, machine.command(daemon, path), logs, machine.work))
        wait_all(processes, JOB_TIMEOUT)
    finally:
        for process in processes:
            process.stop()
    codes = {process.label: process.popen.returncode for process in processes}
    assert set(codes.values()) == {0}, f"exit statuses {codes}\n{tails(processes)}"

    fedavg = server_settings["fedavg"]
    save_path = Path(fedavg["save_path"])
    assert save_path.is_file(), f"no final model at {save_path}\n{tails(processes)}"
    check_final_model(save_path, fedavg)
    state_dir = Path(server_settings.get("state_dir", machine.work / "state"))
    assert state_dir.is_dir(), f"no job state in {state_dir}"
    assert any(state_dir.iterdir()), f"the job state {state_dir} is empty"
    saved = save_path.read_bytes()

    # The same server again: its state says the job is done; it neither listens nor runs it.
    again = Process("server-again", server_command, logs, machine.work)
    try:
        again.popen.wait(timeout=RESTART_TIMEOUT)
    except subprocess.TimeoutExpired:
        again.stop()
        raise AssertionError(
            f"the finished job's server did not exit within {RESTART_TIMEOUT:.0f} s\n{again.tail()}"
        ) from None
    assert again.popen.returncode == 0, again.tail()
    assert "already finished" in again.output, again.tail()
    assert "listening on" not in again.output, again.tail()
    assert save_path.read_bytes() == saved, "the final model changed on a restart"


def check_final_model(path: Path, fedavg: Mapping[str, Any]) -> None:
    """The built-in task's MLP, trained: the same tensors as the initial model, changed."""
    final = load_file(path)
    assert "initial_model" not in fedavg, "compare with the configured initial model"
    initial = MLP(padding_bytes=int(str(fedavg.get("model_size", 0)))).state_dict()
    assert set(final) == set(initial), f"{path}: {sorted(final)} != {sorted(initial)}"
    for name, tensor in final.items():
        assert tensor.shape == initial[name].shape, name
        assert torch.isfinite(tensor.float()).all(), name
    assert any(not torch.equal(final[n].float(), initial[n].float()) for n in initial), (
        "the final model is the initial one: no round changed it"
    )


# --- the two sets agree, and the manifests fit a job's life -----------------------------------


def test_configmap_holds_the_deploy_config_files() -> None:
    """The same settings, but the address the clients dial: the server's Service in cluster."""
    shipped = {d.name: d.settings for d in deploy_config_set()}
    in_cluster = {d.name: d.settings for d in configmap_set()}
    assert in_cluster["server.toml"] == shipped["server.toml"]
    (service,) = [d for d in k8s_objects() if d["kind"] == "Service"]
    service_ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    (listen,) = shipped["server.toml"]["listen"]
    by_site = {settings["site"]: settings for settings in shipped.values() if "site" in settings}
    clients = [s for name, s in in_cluster.items() if name != "server.toml"]
    assert sorted(c["site"] for c in clients) == sorted(by_site)
    for client in clients:
        file = by_site[client["site"]]
        assert {**client, "server": None} == {**file, "server": None}, client["site"]
        url = urlsplit(client["server"])
        assert url.hostname == service["metadata"]["name"], client["server"]
        assert url.scheme == urlsplit(listen).scheme == urlsplit(file["server"]).scheme
        assert url.port == urlsplit(listen).port == service_ports["transport"]


def test_shipped_server_config_keeps_its_state_on_disk() -> None:
    for daemon in (*deploy_config_set(), *configmap_set()):
        if daemon.role == "server":
            settings = daemon.settings
            assert settings["state_dir"].startswith("/var/lib/tensorwire/"), daemon.name
            assert settings["fedavg"]["accumulator_dir"], daemon.name
            assert settings["fedavg"]["save_path"], daemon.name


def test_k8s_daemons_are_jobs_and_the_server_state_is_on_a_claim() -> None:
    objects = k8s_objects()
    kinds = {doc["kind"] for doc in objects}
    # A Deployment restarts a daemon that exited 0 (a finished job) forever.
    assert "Deployment" not in kinds
    assert "StatefulSet" not in kinds
    found = jobs()
    for name, job in found.items():
        assert job["apiVersion"] == "batch/v1", name
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] in ("OnFailure", "Never"), name
        if "podFailurePolicy" in job["spec"]:
            assert pod["restartPolicy"] == "Never", f"{name}: podFailurePolicy needs Never"
            assert job["spec"].get("podReplacementPolicy", "Failed") == "Failed", name
        assert isinstance(job["spec"]["backoffLimit"], int), name
        assert job["spec"]["backoffLimit"] > 0, name
        check_pod(name, pod)
    servers = [j for j in found.values() if container(j)["args"][0] == "server"]
    (server,) = servers
    pod = server["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"  # a crash restarts it; exit 0 completes the Job
    assert server["spec"].get("parallelism", 1) == 1
    assert server["spec"].get("completions", 1) == 1

    settings = parse_config("server.toml", configmap()["data"][configmap_key(server)])
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    claims = {d["metadata"]["name"] for d in objects if d["kind"] == "PersistentVolumeClaim"}
    fedavg = settings["fedavg"]
    for key, path in (
        ("state_dir", settings["state_dir"]),
        ("save_path", fedavg["save_path"]),
        ("accumulator_dir", fedavg["accumulator_dir"]),
    ):
        mount = mount_holding(container(server), path)
        assert mount is not None, f"{key} {path} is on the read-only root file system"
        assert not mount.get("readOnly"), f"{key} {path} is on a read-only mount"
        if key != "accumulator_dir":  # the sums may go, the state and the result may not
            volume = volumes[mount["name"]]
            assert "persistentVolumeClaim" in volume, f"{key} {path}: not on a claim: {volume}"
            assert volume["persistentVolumeClaim"]["claimName"] in claims, volume

    (service,) = [d for d in objects if d["kind"] == "Service"]
    selector = service["spec"]["selector"].items()
    labels = {name: j["spec"]["template"]["metadata"]["labels"] for name, j in found.items()}
    assert selector <= labels[server["metadata"]["name"]].items()
    others = [name for name in labels if name != server["metadata"]["name"]]
    assert not [name for name in others if selector <= labels[name].items()], "selects clients"
    port_names = {port["name"] for port in container(server)["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names


def mount_holding(spec: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The deepest volume mount `path` is under."""
    under = [
        mount
        for mount in spec["volumeMounts"]
        if PurePosixPath(path).is_relative_to(PurePosixPath(mount["mountPath"]))
    ]
    return max(under, key=lambda m: len(m["mountPath"]), default=None)


def check_pod(name: str, pod: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True, name
    volumes = {volume["name"] for volume in pod["volumes"]}
    for spec in pod["containers"]:
        assert {mount["name"] for mount in spec["volumeMounts"]} <= volumes, name
        ports = {port["name"] for port in spec["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            if "httpGet" in spec[probe]:
                assert spec[probe]["httpGet"]["port"] in ports, f"{name} {probe}"
            else:
                assert spec[probe]["exec"]["command"][:2] == ["tensorwire", "health"], name


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_every_object() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert rendered.returncode == 0, rendered.stderr
    names = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(rendered.stdout) if d}
    assert names == {(d["kind"], d["metadata"]["name"]) for d in k8s_objects()}
