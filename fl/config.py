"""Daemon configuration: a TOML or YAML file, validated by pydantic, overridable by flags.

A bad file is refused with one line per problem naming the field, e.g.
`server.toml: fedavg.rounds: Input should be greater than or equal to 1 (got 0)`.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, model_validator

_Config = TypeVar("_Config", bound=BaseModel)


class ConfigFileError(ValueError):
    """The configuration file (or a flag) is missing, unreadable or invalid."""


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

    listen: list[str] = Field(default_factory=lambda: ["tcp://127.0.0.1:8765"], min_length=1)
    job: str = Field("job", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    # The job's state (round, global model, optimizer state, history): a restarted server
    # continues from it. Relative paths are from the working directory.
    state_dir: str = "state"
    pki_dir: str | None = None  # serve mutual TLS with the PKI `tensorwire certs` made
    auth_tokens: list[str] | None = None
    allowed_clients: list[str] | None = None  # certificate names (CN) admitted; None: any
    # Plain connections are only for loopback: a daemon listening on the network requires
    # pki_dir (mutual TLS) unless this is set on purpose.
    insecure: bool = False
    idle_timeout: float = Field(120.0, gt=0)
    heartbeat_timeout: float = Field(60.0, gt=0)
    reconnect_grace: float = Field(10.0, gt=0)
    fedavg: FedAvgSettings = Field(default_factory=FedAvgSettings)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _mutual_tls_off_loopback(self) -> ServerConfig:
        exposed = [url for url in self.listen if not _is_loopback(url)]
        if exposed and self.pki_dir is None and not self.insecure:
            raise ValueError(
                f"listening on {', '.join(exposed)} needs mutual TLS: set pki_dir (make one with "
                "`tensorwire certs init`) or insecure = true"
            )
        return self


class ClientConfig(_Strict):
    """`tensorwire client`."""

    server: str
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


def _is_loopback(url: str) -> bool:
    """memory:// and addresses on this machine only (127.0.0.0/8, ::1, localhost)."""
    if url.startswith("memory:"):
        return True
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(
    kind: type[_Config], path: str | Path | None, overrides: Mapping[str, Any] | None = None
) -> _Config:
    """Read `path` (TOML or YAML; None: defaults only), apply non-None `overrides` (dotted keys
    for nested fields, e.g. "fedavg.rounds"), validate."""
    data = _read(Path(path)) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
    try:
        return kind.model_validate(data)
    except ValidationError as error:
        where = str(path) if path is not None else "flags"
        problems = [
            f"{where}: {'.'.join(str(p) for p in item['loc']) or '(top)'}: {item['msg']}"
            + (f" (got {item['input']!r})" if item["type"] != "missing" else "")
            for item in error.errors()
        ]
        raise ConfigFileError("\n".join(problems)) from None


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigFileError(f"cannot read config file {path}: {error.strerror}") from None
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigFileError(f"{path}: use a .toml, .yaml or .yml file")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml  # type: ignore[import-untyped]  # only needed for YAML configs

            data = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, ValueError) as error:
        raise ConfigFileError(f"{path} is not valid {path.suffix[1:].upper()}: {error}") from None
    except Exception as error:  # yaml.YAMLError without importing yaml for TOML users
        raise ConfigFileError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: the top level must be a table/mapping")
    return data


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value
