"""Daemon configuration: a TOML or YAML file, validated by pydantic, overridden by `TENSORWIRE_*`
environment variables and then by flags.

A bad file is refused with one line per problem naming where the value came from, the field and
the fix, e.g.
`server.toml: fedavg.rounds: Input should be greater than or equal to 1 (got 0); fix: ...`.

    TENSORWIRE_FEDAVG__ROUNDS=5     fedavg.rounds (nested fields: `__`)
    TENSORWIRE_TOKEN=...            a client's token, kept out of the file

`load_config` checks what the file says (types, URL syntax, `min_clients <= num_clients`, a token
only over TLS); `load_daemon_config` also checks what it names on this machine (pki_dir with the
site's certificate, the script, the initial model, directories that must be creatable), which a
daemon does before it starts anything: a configuration error is never retried.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

_Config = TypeVar("_Config", bound=BaseModel)


class ConfigProblem(NamedTuple):
    """One thing wrong with a configuration: where the value came from (the file, an environment
    variable, "flags"), the field (dotted), what is wrong and how to fix it."""

    source: str
    field: str
    problem: str
    fix: str

    def line(self) -> str:
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"{self.source}: {self.field or '(top)'}: {self.problem}{fix}"


class ConfigFileError(ValueError):
    """The configuration file (or a flag) is missing, unreadable or invalid."""

    def __init__(self, message: str, problems: list[ConfigProblem] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []

    @classmethod
    def of(cls, problems: list[ConfigProblem]) -> ConfigFileError:
        return cls("\n".join(problem.line() for problem in problems), problems)

    def one_line(self) -> str:
        """Every problem on one line (a fatal error is one log line)."""
        return " | ".join(str(self).splitlines())


TLS_SCHEMES = ("tcps", "grpcs", "https")
PLAIN_SCHEMES = ("tcp", "grpc", "http")
# The schemes the transport has drivers for (transport.drivers.known_schemes(), which this module
# does not import: it loads in `tensorwire health` too, which must not import torch).
SCHEMES = (*TLS_SCHEMES, *PLAIN_SCHEMES, "memory")


URL_FIX = "write scheme://host:port, e.g. tcps://fl.example.org:8765"


def url_problem(url: str) -> str | None:
    """What is wrong with a transport URL (`tcp//host:1`, no port, an unknown scheme), or None."""
    if "://" not in url:
        return f"{url!r} is not a URL"
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        return f"unknown scheme {parts.scheme!r} in {url!r} (known: {', '.join(SCHEMES)})"
    if parts.scheme == "memory":
        return None if parts.netloc else f"{url!r} names no endpoint (memory://NAME)"
    try:
        port = parts.port
    except ValueError:
        return f"bad port in {url!r}"
    if not parts.hostname or port is None:
        return f"{url!r} needs a host and a port"
    return None


def _valid_url(url: str) -> str:
    problem = url_problem(url)
    if problem is not None:
        # A custom error carries the fix to _problem (a plain ValueError could not).
        raise PydanticCustomError(
            "url", problem.replace("{", "{{").replace("}", "}}"), {"fix": URL_FIX}
        )
    return url


# A transport URL, checked when the file is read (not when the first connection fails).
Url = Annotated[str, AfterValidator(_valid_url)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FedAvgSettings(_Strict):
    """The job the server runs (FedAvg)."""

    rounds: int = Field(3, ge=1)
    num_clients: int | None = Field(None, ge=1)
    min_clients: int = Field(1, ge=1)
    wait_after_min: float | None = Field(None, ge=0)
    # The round's deadline in seconds (None: progress-aware waiting, no deadline): sites without a
    # result by then fail the round; min_clients decides whether it counts.
    round_timeout: float | None = Field(None, gt=0)
    # A float result in another float dtype (fp16 for fp32) is cast; false: refused.
    cast_dtypes: bool = True
    # Results claiming more samples than this are refused (a site cannot outweigh the others
    # by claiming 1e30 samples).
    max_sample_count: int = Field(10**12, ge=1)
    join_timeout: float = Field(300.0, gt=0)
    initial_model: str | None = None  # a safetensors file; None: the built-in task's MLP
    # Padding for the built-in task's MLP, e.g. "1GiB", "256MiB" or a number of bytes; a
    # ByteSize, so a bad spelling is refused with the config's other errors, before any work.
    model_size: ByteSize = ByteSize(0)
    # Built-in task only: the dtype the model is sent in (model_size counts bytes of this dtype).
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    accumulator_dir: str | None = None  # keep the sums in files here instead of RAM
    save_path: str | None = None  # write the final model here (safetensors)
    algorithm: Literal["fedavg", "fedadam"] = "fedavg"
    fedadam: FedAdamSettings = Field(default_factory=lambda: FedAdamSettings())
    robust: RobustSettings = Field(default_factory=lambda: RobustSettings())

    @model_validator(mode="after")
    def _trimming_trims(self) -> FedAvgSettings:
        # A trimmed mean that can drop nothing would be a plain unweighted mean: refused up
        # front (the same rule as fl.robust.RobustOptions.check_min_clients, without torch).
        trim = self.robust.trim_fraction
        if trim > 0 and int(trim * self.min_clients) < 1:
            raise ValueError(
                f"robust.trim_fraction {trim} trims nothing from min_clients = "
                f"{self.min_clients} clients (floor({trim} * {self.min_clients}) = 0): raise "
                f"min_clients to at least {math.ceil(1 / trim - 1e-9)} or trim_fraction"
            )
        return self


class FedAdamSettings(_Strict):
    """Server-side Adam on the averaged update (Reddi et al. 2021); the paper's defaults."""

    eta: float = Field(1e-2, gt=0)  # server learning rate
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)  # adaptivity: keeps the step finite where v is ~0


class RobustSettings(_Strict):
    """Robust aggregation (fl/robust.py); off by default. Every client's update is kept until
    the round ends: a model's size per client, on disk when accumulator_dir is set."""

    # Scale each client's update (its change from the global model) to at most this L2 norm.
    clip_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # Coordinate-wise trimmed mean: drop floor(trim_fraction * n) largest and smallest values per
    # coordinate and average the rest, unweighted; needs floor(trim_fraction * min_clients) >= 1.
    trim_fraction: float = Field(default=0.0, ge=0, lt=0.5)
    median: bool = False  # coordinate-wise median instead (unweighted); not with trim_fraction

    @model_validator(mode="after")
    def _one_rule(self) -> RobustSettings:
        if self.median and self.trim_fraction > 0:
            raise ValueError("choose median or trim_fraction, not both")
        return self


class ServerConfig(_Strict):
    """`tensorwire server`."""

    listen: list[Url] = Field(default_factory=lambda: ["tcp://127.0.0.1:8765"], min_length=1)
    job: str = Field("job", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    # The job's state (round, global model, optimizer state, history): a restarted server
    # continues from it. Relative paths are from the working directory.
    state_dir: str = "state"
    pki_dir: str | None = None  # serve mutual TLS with the PKI `tensorwire certs` made
    auth_tokens: list[str] | None = None
    allowed_clients: list[str] | None = None  # certificate names (CN) admitted; None: any
    # Who may run `tensorwire status|clients|abort` (fl/admin.py): certificate names (CN),
    # admitted beside allowed_clients and never taken for a site, and/or tokens (accepted
    # over TLS or loopback only).
    admins: list[str] = Field(default_factory=list)
    admin_tokens: list[str] | None = None
    # Plain connections are only for loopback: a daemon listening on the network requires
    # pki_dir (mutual TLS) unless this is set on purpose.
    insecure: bool = False
    idle_timeout: float = Field(120.0, gt=0)
    heartbeat_timeout: float = Field(60.0, gt=0)
    reconnect_grace: float = Field(10.0, gt=0)
    fedavg: FedAvgSettings = Field(default_factory=FedAvgSettings)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _mutual_tls_off_loopback(self) -> ServerConfig:
        _require_tls_off_loopback(self.listen, self.pki_dir, self.insecure)
        return self


class ClientConfig(_Strict):
    """`tensorwire client`."""

    server: Url
    # Where else to turn when `server` is gone for good (a relay that died: its server, or
    # another relay), tried in order after it (fl/relay.py).
    fallbacks: list[Url] = Field(default_factory=list)
    site: str = Field(min_length=1, max_length=128)
    script: str
    args: list[str] = Field(default_factory=list)
    mode: Literal["subprocess", "in-process"] = "subprocess"
    token: str | None = None
    pki_dir: str | None = None
    heartbeat_interval: float = Field(5.0, gt=0)
    connect_timeout: float = Field(300.0, gt=0)
    idle_timeout: float = Field(120.0, gt=0)
    max_restarts: int = Field(5, ge=0)
    restart_backoff: float = Field(1.0, ge=0)


class RelayConfig(_Strict):
    """`tensorwire relay` (fl/relay.py): a site to its upstream, a server to its sites."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    # The server, or a parent relay (a tree), then where to turn when it is gone for good.
    upstream: Url
    fallbacks: list[Url] = Field(default_factory=list)
    listen: list[Url] = Field(default_factory=lambda: ["tcp://127.0.0.1:8770"], min_length=1)
    # The task models being forwarded and the partial sums being sent up: up to two models'
    # size on disk (one in float32), none in RAM.
    state_dir: str = "relay-state"
    # One certificate (<name>.pem) for both hops: served to the sites, shown to the upstream.
    pki_dir: str | None = None
    token: str | None = None  # this relay's token, for an upstream that asks for one
    auth_tokens: list[str] | None = None  # tokens its sites must show
    allowed_clients: list[str] | None = None  # site certificate names (CN); None: any
    insecure: bool = False
    # A task waits until this many sites are connected (at most site_wait seconds), then goes
    # to every site connected by then.
    min_sites: int = Field(1, ge=1)
    site_wait: float = Field(60.0, ge=0)
    # Chunk compression on both hops: "auto" compresses when the measured link is slower than
    # the codec (transport's EndpointConfig.compression); "off" on links faster than the CPU.
    compression: Literal["auto", "on", "off"] = "auto"
    idle_timeout: float = Field(120.0, gt=0)
    heartbeat_interval: float = Field(5.0, gt=0)
    heartbeat_timeout: float = Field(60.0, gt=0)
    reconnect_grace: float = Field(10.0, gt=0)
    connect_timeout: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _mutual_tls_off_loopback(self) -> RelayConfig:
        _require_tls_off_loopback(self.listen, self.pki_dir, self.insecure)
        return self


def _require_tls_off_loopback(listen: list[str], pki_dir: str | None, insecure: bool) -> None:
    """A daemon listening on the network serves mutual TLS, unless told otherwise on purpose."""
    exposed = [url for url in listen if not _is_loopback(url)]
    if exposed and pki_dir is None and not insecure:
        raise ValueError(
            f"listening on {', '.join(exposed)} needs mutual TLS: set pki_dir (make one with "
            "`tensorwire certs init`) or insecure = true"
        )


def _is_loopback(url: str) -> bool:
    """memory:// and addresses on this machine only (127.0.0.0/8, ::1, localhost)."""
    if url.startswith("memory:"):
        return True
    return is_loopback_host(urlsplit(url).hostname or "")


def is_loopback_host(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (brackets allowed)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(
    kind: type[_Config], path: str | Path | None, overrides: Mapping[str, Any] | None = None
) -> _Config:
    """Read `path` (TOML or YAML; None: defaults only), apply `TENSORWIRE_*` environment
    variables, then non-None `overrides` (dotted keys for nested fields, e.g. "fedavg.rounds"),
    validate."""
    data = _read(Path(path)) if path is not None else {}
    sources = _Sources(str(path) if path is not None else "flags")
    for dotted, value in environment_overrides(kind).items():
        _set_dotted(data, dotted, value)
        sources.set(dotted, env_name(dotted))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
            sources.set(dotted, "flags")
    try:
        config = kind.model_validate(data)
    except ValidationError as error:
        raise ConfigFileError.of([_problem(item, sources) for item in error.errors()]) from None
    problems = [p._replace(source=sources.of(p.field)) for p in consistency_problems(config)]
    if problems:
        raise ConfigFileError.of(problems)
    return config


def load_daemon_config(
    kind: type[_Config], path: str | Path | None, overrides: Mapping[str, Any] | None = None
) -> _Config:
    """`load_config`, then what the configuration names on this machine (`path_problems`):
    what a daemon checks before it starts anything."""
    config = load_config(kind, path, overrides)
    problems = path_problems(config)
    if problems:
        where = str(path) if path is not None else "flags"
        raise ConfigFileError.of([p._replace(source=where) for p in problems])
    return config


# --- where a value came from ---------------------------------------------------------------------

ENV_PREFIX = "TENSORWIRE_"


def env_name(dotted: str) -> str:
    """The environment variable that overrides a (dotted) field: fedavg.rounds ->
    TENSORWIRE_FEDAVG__ROUNDS."""
    return ENV_PREFIX + dotted.upper().replace(".", "__")


def environment_overrides(kind: type[BaseModel]) -> dict[str, Any]:
    """The fields `TENSORWIRE_*` variables set, as dotted keys (pydantic-settings reads them:
    nested fields with `__`, lists and tables as JSON)."""
    if not any(name.startswith(ENV_PREFIX) for name in os.environ):
        return {}  # the common case: no import of pydantic-settings at all
    from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

    config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__")
    settings = type(f"{kind.__name__}Environment", (BaseSettings, kind), {"model_config": config})
    return dict(_flatten(EnvSettingsSource(settings)()))


def _flatten(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            pairs += _flatten(value, f"{prefix}{key}.")
        else:
            pairs.append((f"{prefix}{key}", value))
    return pairs


class _Sources:
    """Which dotted fields an environment variable or a flag set; the rest come from `default`."""

    def __init__(self, default: str) -> None:
        self.default = default
        self._by_field: dict[str, str] = {}

    def set(self, dotted: str, source: str) -> None:
        self._by_field[dotted] = source

    def of(self, dotted: str) -> str:
        # "listen.0" was set by the flag that set "listen".
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            source = self._by_field.get(".".join(parts[:end]))
            if source is not None:
                return source
        return self.default


# Fixes for pydantic's error types; any other error says what the value must be already.
_FIXES = {
    "missing": "add it",
    "extra_forbidden": "remove it or correct its spelling (fields: fl/config.py, docs/fl.md)",
    "byte_size": 'write a size such as "1GiB", "256MiB", "1.5GB" or a number of bytes',
    "byte_size_unit": 'use a unit such as B, KB, MB, GB, KiB, MiB or GiB (e.g. "1GiB")',
    "literal_error": "use one of the values named",
}
# Values never repeated in an error line: it goes to logs.
_SECRETS = ("token", "auth_tokens")


def _problem(item: Any, sources: _Sources) -> ConfigProblem:
    field = ".".join(str(part) for part in item["loc"])
    message = str(item["msg"]).removeprefix("Value error, ")
    secret = field.startswith(_SECRETS)
    shown = item["type"] != "missing" and not secret and not isinstance(item["input"], dict)
    got = f" (got {item['input']!r})" if shown else ""
    fix = (item.get("ctx") or {}).get("fix") or _FIXES.get(item["type"])
    if fix is None and item["type"] == "value_error" and ": " in message:
        # This module's own validators end their message with the fix, after the last colon.
        message, fix = message.rsplit(": ", 1)
    return ConfigProblem(
        sources.of(field), field, message + got, fix or "change it as the message says"
    )


# --- what the file says --------------------------------------------------------------------------


def consistency_problems(config: BaseModel) -> list[ConfigProblem]:
    """What a valid-typed configuration still gets wrong (source filled in by the caller)."""
    if isinstance(config, ServerConfig):
        return _server_problems(config)
    if isinstance(config, ClientConfig):
        return _client_problems(config)
    if isinstance(config, RelayConfig):
        return _relay_problems(config)
    return []


def _server_problems(config: ServerConfig) -> list[ConfigProblem]:
    problems = []
    tls = [url for url in config.listen if urlsplit(url).scheme in TLS_SCHEMES]
    if tls and config.pki_dir is None:
        fix = "set pki_dir to the folder `tensorwire certs init` made, or listen on tcp://"
        problems.append(ConfigProblem("", "pki_dir", f"{tls[0]} needs a certificate", fix))
    fedavg = config.fedavg
    if fedavg.num_clients is not None and fedavg.min_clients > fedavg.num_clients:
        problems.append(
            ConfigProblem(
                "",
                "fedavg.min_clients",
                f"{fedavg.min_clients} is more than num_clients = {fedavg.num_clients}: no "
                "round could ever succeed",
                "lower min_clients or raise num_clients",
            )
        )
    return problems


def _client_problems(config: ClientConfig) -> list[ConfigProblem]:
    scheme = urlsplit(config.server).scheme
    if config.token is not None and scheme in PLAIN_SCHEMES:
        secure = config.server.replace(f"{scheme}://", f"{scheme}s://", 1)
        fix = f"use {secure} (TLS) or drop the token"
        return [ConfigProblem("", "token", "a token would travel in clear text", fix)]
    return []


def _relay_problems(config: RelayConfig) -> list[ConfigProblem]:
    problems = []
    tls = [url for url in config.listen if urlsplit(url).scheme in TLS_SCHEMES]
    if tls and config.pki_dir is None:
        fix = "set pki_dir to the folder `tensorwire certs init` made, or listen on tcp://"
        problems.append(ConfigProblem("", "pki_dir", f"{tls[0]} needs a certificate", fix))
    scheme = urlsplit(config.upstream).scheme
    if config.token is not None and scheme in PLAIN_SCHEMES:
        fix = "use a TLS upstream URL (tcps://, grpcs://, https://) or drop the token"
        problems.append(ConfigProblem("", "token", "a token would travel in clear text", fix))
    return problems


# --- what it names on this machine ---------------------------------------------------------------


def path_problems(config: BaseModel) -> list[ConfigProblem]:
    """Files and folders the configuration names that are missing or unusable here."""
    if isinstance(config, ServerConfig):
        problems = _pki_problems(config.pki_dir, "server")
        problems += _creatable("state_dir", config.state_dir)
        return problems + _fedavg_path_problems(config.fedavg)
    if isinstance(config, ClientConfig):
        problems = _pki_problems(config.pki_dir, config.site)
        if not Path(config.script).is_file():
            fix = "give the path of the site's training script"
            problems.append(ConfigProblem("", "script", f"{config.script} is not a file", fix))
        return problems
    if isinstance(config, RelayConfig):
        problems = _pki_problems(config.pki_dir, config.name)
        return problems + _creatable("state_dir", config.state_dir)
    return []


def _pki_problems(pki_dir: str | None, name: str) -> list[ConfigProblem]:
    if pki_dir is None:
        return []
    folder = Path(pki_dir)
    fix = f"make them with `tensorwire certs init --out {pki_dir}` (or `certs issue {name}`)"
    if not folder.is_dir():
        return [ConfigProblem("", "pki_dir", f"{pki_dir} is not a folder", fix)]
    missing = [f for f in (f"{name}.pem", f"{name}.key", "ca.pem") if not (folder / f).is_file()]
    if missing:
        what = f"{pki_dir} has no {', '.join(missing)}"
        return [ConfigProblem("", "pki_dir", what, fix)]
    return []


def _fedavg_path_problems(fedavg: FedAvgSettings) -> list[ConfigProblem]:
    problems = _creatable("fedavg.accumulator_dir", fedavg.accumulator_dir)
    if fedavg.save_path is not None:
        parent = str(Path(fedavg.save_path).parent)
        problems += _creatable("fedavg.save_path", parent)
    model = fedavg.initial_model
    if model is not None and not Path(model).is_file():
        fix = "give an existing safetensors file, or leave it out for the built-in model"
        problems.append(ConfigProblem("", "fedavg.initial_model", f"{model} is not a file", fix))
    return problems


def _creatable(field: str, folder: str | None) -> list[ConfigProblem]:
    """A folder that exists and is writable, or could be created by this user (checked, not
    created: a refused configuration leaves nothing behind)."""
    if folder is None:
        return []
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        problem = f"{folder} cannot be created: {existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{folder} cannot be {'written' if existing == path else 'created'}: " + (
            f"{existing} is not writable by this user"
        )
    else:
        return []
    fix = "choose a folder this user may write, or create it with the right owner"
    return [ConfigProblem("", field, problem, fix)]


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigFileError(
            f"cannot read config file {path}: {error.strerror}; fix: give the path of a "
            "readable .toml or .yaml file"
        ) from None
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigFileError(f"{path}: unknown format; fix: use a .toml, .yaml or .yml file")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml  # type: ignore[import-untyped]  # only needed for YAML configs

            data = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, ValueError) as error:
        syntax = path.suffix[1:].upper()
        raise ConfigFileError(
            f"{path} is not valid {syntax}: {_first_line(error)}; fix: correct the {syntax} syntax"
        ) from None
    except Exception as error:  # yaml.YAMLError without importing yaml for TOML users
        raise ConfigFileError(
            f"{path} is not valid YAML: {_first_line(error)}; fix: correct the YAML syntax"
        ) from None
    if not isinstance(data, dict):
        raise ConfigFileError(
            f"{path}: the top level is not a table; fix: write `field = value` lines (TOML) or "
            "`field: value` (YAML)"
        )
    return data


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value
