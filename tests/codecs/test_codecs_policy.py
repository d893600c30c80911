"""CompressionPolicy on synthetic numbers: the decision follows ratio, codec speed and link rate."""

from __future__ import annotations

import pytest

from transport.codecs import CompressionPolicy
from transport.exceptions import ConfigError

MB = 1e6


def _measured(policy: CompressionPolicy, ratio: float, compress_mb_s: float) -> CompressionPolicy:
    """Feed one codec sample: 100 MB compressed `ratio`-fold at `compress_mb_s` per thread."""
    policy.observe_codec(int(100 * MB), int(100 * MB / ratio), 100 / compress_mb_s)
    return policy


def test_fixed_modes_ignore_measurements() -> None:
    assert CompressionPolicy("on").decide(10e9) is True
    assert CompressionPolicy("off").decide(1e3) is False


def test_auto_compresses_until_it_has_measured_something() -> None:
    policy = CompressionPolicy("auto")
    assert policy.decide() is True  # no link rate, no codec sample
    assert policy.decide(1e9) is True  # a link rate but no codec sample


@pytest.mark.parametrize(
    ("link_mb_s", "threads", "expected"),
    [
        (100, 1, True),  # WAN: ratio 1.45 cuts link time, codec (500 MB/s) is not the limit
        (400, 1, True),  # 1/400 s/B raw vs max(codec 1/500, link 1/580): 20% faster
        (450, 1, False),  # codec bound at 500 MB/s: 10% faster is not beyond the margin
        (520, 2, True),  # two threads lift the codec to 1000 MB/s
        (5000, 2, False),  # a fast LAN: the codec would be the bottleneck
    ],
)
def test_auto_weighs_link_against_codec(link_mb_s: float, threads: int, expected: bool) -> None:
    policy = _measured(CompressionPolicy("auto", threads=threads), 1.45, 500)
    assert policy.decide(link_mb_s * MB) is expected


def test_incompressible_data_is_not_compressed() -> None:
    policy = _measured(CompressionPolicy("auto"), 1.02, 2000)
    assert policy.decide(10 * MB) is False  # saving 2% is below the 10% margin


def test_slow_receiver_decompression_counts() -> None:
    policy = CompressionPolicy("auto", threads=4, receiver_threads=1)
    policy.observe_codec(int(100 * MB), int(50 * MB), 0.05, decompress_seconds=1.0)  # 100 MB/s
    assert policy.decide(150 * MB) is False
    assert policy.decide(50 * MB) is True


def test_decision_follows_the_observed_link_rate() -> None:
    policy = _measured(CompressionPolicy("auto", weight=0.5), 1.45, 500)
    policy.observe_link_rate(int(10 * MB), 1.0)  # 10 MB/s WAN
    assert policy.decide() is True
    for _ in range(10):  # the link turns out to be a 10 GB/s LAN
        policy.observe_link_rate(int(10_000 * MB), 1.0)
    assert policy.link_rate is not None
    assert policy.link_rate > 5000 * MB
    assert policy.decide() is False


def test_estimates_are_exposed() -> None:
    policy = _measured(CompressionPolicy("auto"), 2.0, 400)
    assert policy.ratio == pytest.approx(2.0)
    times = policy.seconds_per_byte(100 * MB)
    assert times is not None
    without, with_compression = times
    assert without == pytest.approx(1 / (100 * MB))
    assert with_compression == pytest.approx(1 / (200 * MB))


@pytest.mark.parametrize(
    "kwargs",
    [{"mode": "maybe"}, {"threads": 0}, {"receiver_threads": -1}, {"margin": 1.0}, {"weight": 0}],
)
def test_bad_configuration_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        CompressionPolicy(**kwargs)  # type: ignore[arg-type]


def test_bad_observations_are_refused() -> None:
    policy = CompressionPolicy("auto")
    with pytest.raises(ConfigError, match="seconds"):
        policy.observe_link_rate(10, float("nan"))
    with pytest.raises(ConfigError, match="raw_bytes"):
        policy.observe_codec(-1, 10, 1.0)
    with pytest.raises(ConfigError, match="link rate"):
        _measured(policy, 1.5, 500).decide(0.0)
