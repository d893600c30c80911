"""A bad configuration is one line naming the file, the field and the fix, exit 2, before anything
starts (never retried); with --log-format json every line a daemon writes is a JSON object.

The table of bad configurations runs through the `tensorwire` command in this process; one of
them, and a whole job logged as JSON, run the installed command as operators do.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fl.config import ClientConfig, ConfigFileError, ServerConfig, load_config
from fl.exit_codes import EXIT_FAILURE, EXIT_USAGE

ROOT = Path(__file__).parents[2]
CLI = str(Path(sys.executable).with_name("tensorwire"))
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("TENSORWIRE_")},
    "PYTHONPATH": str(ROOT),
}
ECHO_SITE = ROOT / "tests" / "ops" / "scripts" / "echo_site.py"


@dataclass
class Case:
    """A configuration file (TOML text) and what the fatal line must name."""

    role: str
    text: str
    field: str
    words: tuple[str, ...] = ()  # also in the line (the problem, the fix)
    env: dict[str, str] = field(default_factory=dict)
    source: str | None = None  # where the value came from; default: the file


def cases(tmp: Path) -> dict[str, Case]:
    (tmp / "empty-pki").mkdir()
    (tmp / "a-file").write_text("")
    site = f'script = "{ECHO_SITE}"\nsite = "site-1"\n'
    return {
        "url-without-colon": Case("server", 'listen = ["tcp//x"]\n', "listen.0", ("not a URL",)),
        "url-without-port": Case("server", 'listen = ["grpc://host"]\n', "listen.0", ("port",)),
        "size-not-a-size": Case(
            "server", '[fedavg]\nmodel_size = "lots"\n', "fedavg.model_size", ("GiB",)
        ),
        "min-above-num": Case(
            "server",
            "[fedavg]\nmin_clients = 3\nnum_clients = 2\n",
            "fedavg.min_clients",
            ("num_clients",),
        ),
        "pki-missing": Case(
            "server",
            f'pki_dir = "{tmp / "nowhere"}"\n',
            "pki_dir",
            ("not a folder", "certs init"),
        ),
        "pki-without-cert": Case(
            "server",
            f'pki_dir = "{tmp / "empty-pki"}"\n',
            "pki_dir",
            ("server.pem", "certs init"),
        ),
        "accumulator-not-creatable": Case(
            "server",
            f'[fedavg]\naccumulator_dir = "{tmp / "a-file" / "sums"}"\n',
            "fedavg.accumulator_dir",
            ("cannot be created",),
        ),
        "initial-model-missing": Case(
            "server",
            '[fedavg]\ninitial_model = "gone.safetensors"\n',
            "fedavg.initial_model",
            ("not a file",),
        ),
        "unknown-field": Case("server", "[fedavg]\nroundz = 2\n", "fedavg.roundz", ("spelling",)),
        "env-override": Case(
            "server",
            "",
            "fedavg.rounds",
            ("greater than or equal to 1",),
            env={"TENSORWIRE_FEDAVG__ROUNDS": "0"},
            source="TENSORWIRE_FEDAVG__ROUNDS",
        ),
        "client-url": Case(
            "client", f'server = "tcp//server:8765"\n{site}', "server", ("not a URL",)
        ),
        "token-in-clear": Case(
            "client",
            f'server = "tcp://127.0.0.1:9"\ntoken = "s3cret"\n{site}',
            "token",
            ("clear text", "tcps://127.0.0.1:9"),
        ),
        "client-pki-without-site": Case(
            "client",
            f'server = "tcps://127.0.0.1:9"\npki_dir = "{tmp / "empty-pki"}"\n{site}',
            "pki_dir",
            ("site-1.pem",),
        ),
        "script-missing": Case(
            "client",
            'server = "tcp://127.0.0.1:9"\nsite = "s"\nscript = "absent.py"\n',
            "script",
            ("not a file",),
        ),
    }


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str
    seconds: float


def run_daemon(args: list[str], cwd: Path, timeout: float = 120) -> Outcome:
    """The installed command, as a process."""
    started = time.monotonic()
    done = subprocess.run(
        [CLI, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    return Outcome(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


@pytest.fixture
def cli() -> Iterator[Callable[[list[str], dict[str, str]], Outcome]]:
    """The same command in this process (a process per case would import torch each time): the
    command sets up logging for itself, so the logging set-up is put back afterwards."""
    from fl.cli import app
    from fl.cli_ops import DAEMON_LOG

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, DAEMON_LOG.handlers[:], DAEMON_LOG.propagate)

    def run(args: list[str], env: dict[str, str]) -> Outcome:
        started = time.monotonic()
        done = CliRunner().invoke(app, args, env=env)
        return Outcome(done.exit_code, done.stdout, done.stderr, time.monotonic() - started)

    try:
        yield run
    finally:
        root.handlers[:], root.level, DAEMON_LOG.handlers[:], DAEMON_LOG.propagate = saved


def run_cases(
    tmp: Path, log_format: str, run: Callable[[list[str], dict[str, str]], Outcome]
) -> Iterator[tuple[str, Case, Outcome]]:
    for name, case in cases(tmp).items():
        (tmp / f"{name}.toml").write_text(case.text)
        args = [case.role, "--config", f"{name}.toml", "--log-format", log_format, "--quiet"]
        yield name, case, run(args, case.env)


def check_json_fatal(name: str, case: Case, outcome: Outcome) -> None:
    assert outcome.status == EXIT_USAGE, (name, outcome.stderr)
    assert outcome.stdout == "", (name, outcome.stdout)
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, (name, outcome.stderr)
    record = json.loads(lines[0])
    assert record["event"] == "fatal", name
    assert record["exit_code"] == EXIT_USAGE, name
    assert record["field"] == case.field, (name, record)
    assert record["file"] == (case.source or f"{name}.toml"), (name, record)
    assert record["fix"], (name, record)
    for word in case.words:
        assert word in record["msg"], (name, word, record["msg"])
    assert "Traceback" not in outcome.stderr, name


def test_each_bad_config_is_one_json_line_naming_file_field_and_fix(
    tmp_path: Path, cli: Callable[[list[str], dict[str, str]], Outcome]
) -> None:
    for name, case, outcome in run_cases(tmp_path, "json", cli):
        check_json_fatal(name, case, outcome)


def test_the_kv_form_is_one_plain_line_on_stderr(
    tmp_path: Path, cli: Callable[[list[str], dict[str, str]], Outcome]
) -> None:
    for name, case, outcome in run_cases(tmp_path, "kv", cli):
        assert outcome.status == EXIT_USAGE, (name, outcome.stderr)
        (line,) = outcome.stderr.splitlines()
        assert line.startswith(f"tensorwire {case.role}: error: "), line
        assert f": {case.field}: " in line, line
        assert "fix: " in line, line


def test_the_installed_client_refuses_a_bad_url_at_once(tmp_path: Path) -> None:
    """Before, `tcp//server` was "server not reachable yet", retried for connect_timeout."""
    case = cases(tmp_path)["client-url"]
    (tmp_path / "client-url.toml").write_text(case.text)
    outcome = run_daemon(
        ["client", "--config", "client-url.toml", "--log-format", "json"], tmp_path
    )
    check_json_fatal("client-url", case, outcome)
    assert outcome.seconds < 60  # the default connect_timeout is 300 s


def test_debug_adds_the_traceback(
    tmp_path: Path, cli: Callable[[list[str], dict[str, str]], Outcome]
) -> None:
    (tmp_path / "bad.toml").write_text('listen = ["tcp//x"]\n')
    args = ["server", "--config", "bad.toml", "--log-format", "json", "--debug"]
    outcome = cli(args, {})
    assert outcome.status == EXIT_USAGE
    (line,) = outcome.stderr.splitlines()  # the traceback inside the one JSON line
    assert "Traceback" in json.loads(line)["error"]


def test_the_config_flag_and_metrics_port_come_from_the_environment(
    tmp_path: Path, cli: Callable[[list[str], dict[str, str]], Outcome]
) -> None:
    """The systemd client template sets both per instance (/etc/tensorwire/<site>.env)."""
    (tmp_path / "site-2.yaml").write_text("server: tcp//x\nsite: site-2\nscript: s.py\n")
    env = {"TENSORWIRE_CONFIG": "site-2.yaml", "TENSORWIRE_LOG_FORMAT": "json"}
    outcome = cli(["client"], env)
    assert outcome.status == EXIT_USAGE
    assert json.loads(outcome.stderr)["file"] == "site-2.yaml"


def test_a_taken_metrics_port_is_one_line_and_exit_1(
    tmp_path: Path, cli: Callable[[list[str], dict[str, str]], Outcome]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        outcome = cli(["server", "--metrics-port", port, "--log-format", "json"], {})
    assert outcome.status == EXIT_FAILURE, outcome.stderr
    (line,) = outcome.stderr.splitlines()
    record = json.loads(line)
    assert record["event"] == "fatal"
    assert "Address already in use" in record["msg"]
    assert record["fix"]


# --- what the file says, in-process --------------------------------------------------------------


def test_environment_variables_override_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "server.toml"
    path.write_text('job = "from-file"\n[fedavg]\nrounds = 3\nnum_clients = 4\n')
    monkeypatch.setenv("TENSORWIRE_JOB", "from-env")
    monkeypatch.setenv("TENSORWIRE_FEDAVG__ROUNDS", "7")
    monkeypatch.setenv("TENSORWIRE_LISTEN", '["tcp://127.0.0.1:1", "grpc://127.0.0.1:2"]')
    config = load_config(ServerConfig, path, {"fedavg.rounds": 9})
    assert config.job == "from-env"
    assert config.fedavg.rounds == 9  # a flag wins over the environment
    assert config.fedavg.num_clients == 4  # untouched fields keep the file's value
    assert config.listen == ["tcp://127.0.0.1:1", "grpc://127.0.0.1:2"]


def test_a_client_token_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORWIRE_TOKEN", "s3cret")
    base = {"server": "tcps://fl.example.org:8765", "site": "a", "script": "x.py"}
    assert load_config(ClientConfig, None, base).token == "s3cret"
    with pytest.raises(ConfigFileError) as caught:
        load_config(ClientConfig, None, {**base, "server": "tcp://fl.example.org:8765"})
    (problem,) = caught.value.problems
    assert (problem.source, problem.field) == ("TENSORWIRE_TOKEN", "token")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('listen = ["tcp//a", "tcp://127.0.0.1:1"]\n[fedavg]\nrounds = 0\n')
    with pytest.raises(ConfigFileError) as caught:
        load_config(ServerConfig, path)
    fields = [problem.field for problem in caught.value.problems]
    assert fields == ["listen.0", "fedavg.rounds"]
    assert len(caught.value.one_line().splitlines()) == 1


def test_certs_init_on_an_existing_folder_names_the_flag(tmp_path: Path) -> None:
    from fl.cli import app

    runner = CliRunner()
    first = runner.invoke(app, ["certs", "init", "--out", str(tmp_path / "pki")])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["certs", "init", "--out", str(tmp_path / "pki")])
    assert again.exit_code != 0
    assert "--overwrite" in again.output
    assert "overwrite=True" not in again.output


# --- a whole job under --log-format json ---------------------------------------------------------


class Daemon:
    """A daemon whose stderr (the JSON log) is read line by line as it comes."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.popen = subprocess.Popen(
            [CLI, *args, "--log-format", "json", "--quiet"],
            cwd=cwd,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []

    def wait_for(self, event: str) -> dict[str, object]:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.lines.append(line)
            record = json.loads(line)
            if record.get("event") == event:
                return dict(record)
        raise AssertionError(f"no {event} before exit {self.popen.wait()}: {self.lines}")

    def finish(self) -> list[str]:
        """Every line it wrote, stdout and stderr, once it exited."""
        stdout, stderr = self.popen.communicate(timeout=120)
        self.lines += stderr.splitlines(keepends=True)
        return [line for line in (*self.lines, *stdout.splitlines()) if line.strip()]

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.mark.parametrize("mode", ["in-process", "subprocess"])
def test_a_job_logged_as_json_parses_line_by_line(tmp_path: Path, mode: str) -> None:
    (tmp_path / "server.toml").write_text(
        'listen = ["tcp://127.0.0.1:0"]\njob = "json"\n[fedavg]\nrounds = 1\nmin_clients = 1\n'
        'num_clients = 1\nsave_path = "final.safetensors"\n'
    )
    server = Daemon(["server", "--config", "server.toml"], tmp_path)
    client: Daemon | None = None
    try:
        (url,) = server.wait_for("listening")["urls"]  # type: ignore[misc]
        # The script's own prints, on stdout and stderr, become log records too.
        (tmp_path / "site.py").write_text(
            "import runpy, sys\nprint('hello from the script')\n"
            "print('a warning of the script', file=sys.stderr)\n"
            f"runpy.run_path({str(ECHO_SITE)!r}, run_name='__main__')\n"
        )
        (tmp_path / "site.toml").write_text(
            f'server = "{url}"\nsite = "site-1"\nmode = "{mode}"\nscript = "site.py"\n'
        )
        client = Daemon(["client", "--config", "site.toml"], tmp_path)
        # SIGHUP is logged and ignored: the job goes on.
        server.popen.send_signal(signal.SIGHUP)
        server.wait_for("sighup_ignored")
        lines = {"client": client.finish(), "server": server.finish()}
    finally:
        for daemon in (server, client):
            if daemon is not None:
                daemon.kill()
    assert (server.popen.returncode, client.popen.returncode) == (0, 0), lines
    records = {name: [json.loads(line) for line in found] for name, found in lines.items()}
    events = {name: {record.get("event") for record in found} for name, found in records.items()}
    assert {"listening", "round_end", "final_model_saved", "sighup_ignored"} <= events["server"]
    if mode == "in-process":  # a subprocess script logs nothing of its own
        assert {"transfer_start", "transfer_end"} <= events["client"]
    said = {r["msg"] for r in records["client"] if r.get("event") == "script_output"}
    assert said == {"hello from the script", "a warning of the script"}
    everything = "".join(line for found in lines.values() for line in found)
    assert "PeerInfo(" not in everything  # names in join events, not reprs
    assert "Task was destroyed" not in everything
