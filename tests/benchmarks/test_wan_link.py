"""The pure parts of the WAN emulation: profiles, the link model's clock, queue and loss."""

from __future__ import annotations

import math
import random

import pytest

from benchmarks.wan.link import LinkModel
from benchmarks.wan.profiles import MIN_QUEUE_BYTES, PROFILES, Profile, profile_named
from benchmarks.wan.validate import judge, steady_rate


def test_profiles_required_by_the_issue() -> None:
    regional, intercontinental = PROFILES["regional"], PROFILES["intercontinental"]
    assert PROFILES["lan"].rtt_s == 0
    assert (regional.rtt_s, regional.rate_bit_s, regional.loss) == (0.050, 1e9, 0.0)
    assert (intercontinental.rtt_s, intercontinental.rate_bit_s) == (0.200, 200e6)
    assert intercontinental.loss == 0.001


def test_profile_math() -> None:
    regional = PROFILES["regional"]
    assert regional.one_way_delay_s == 0.025
    assert regional.link_mb_s == 125.0
    assert regional.bdp_bytes == 6_250_000
    assert regional.queue_bytes == regional.bdp_bytes
    assert PROFILES["lan"].queue_bytes == MIN_QUEUE_BYTES


@pytest.mark.parametrize(
    ("field", "value"), [("rtt_s", -1.0), ("rate_bit_s", 0.0), ("loss", 1.0), ("loss", -0.1)]
)
def test_profile_refuses_bad_values(field: str, value: float) -> None:
    fields = {"name": "x", "rtt_s": 0.1, "rate_bit_s": 1e6, field: value}
    with pytest.raises(ValueError, match=field):
        Profile(**fields)


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="regional"):
        profile_named("moon")


def test_virtual_clock_spaces_segments_at_the_link_rate() -> None:
    link = LinkModel(rate_bytes_s=1000.0, delay_s=0.5, queue_bytes=10_000)
    runs = link.admit(0.0, [100, 100, 100])
    assert runs == [(0, 2, pytest.approx(0.3 + 0.5))]
    # A packet arriving while the link is busy waits behind the backlog.
    assert link.admit(0.1, [100]) == [(0, 0, pytest.approx(0.4 + 0.5))]
    # After the link went idle, the clock restarts from the arrival time.
    assert link.admit(10.0, [100]) == [(0, 0, pytest.approx(10.1 + 0.5))]


def test_drop_tail_queue_drops_what_does_not_fit() -> None:
    link = LinkModel(rate_bytes_s=1000.0, delay_s=0.0, queue_bytes=250)
    runs = link.admit(0.0, [100, 100, 100, 100])
    assert runs == [(0, 1, pytest.approx(0.2))]
    assert link.stats.dropped_queue == 2
    assert link.stats.peak_backlog_bytes == 200
    # Once the queue drained by 100 bytes' worth of time, one more segment fits.
    assert link.admit(0.1, [100, 100]) == [(0, 0, pytest.approx(0.3))]


def test_due_times_never_decrease() -> None:
    link = LinkModel(1e6, 0.01, 50_000, loss=0.05, rng=random.Random(1))
    dues = []
    for step in range(500):
        dues += [due for _, _, due in link.admit(step * 1e-4, [1500] * 10)]
    assert dues == sorted(dues)


def test_random_loss_cuts_a_super_packet_into_runs() -> None:
    link = LinkModel(1e9, 0.0, 10**9, loss=0.001, rng=random.Random(7))
    link._until_loss = 3  # the fourth segment is lost
    runs = link.admit(0.0, [1500] * 10)
    assert [(first, last) for first, last, _ in runs] == [(0, 2), (4, 9)]
    assert link.stats.lost_random == 1


def test_random_loss_rate_is_per_segment() -> None:
    loss = 0.01
    link = LinkModel(1e12, 0.0, 10**12, loss=loss, rng=random.Random(3))
    for _ in range(20_000):
        link.admit(0.0, [1500] * 45)
    expected = loss * link.stats.segments
    assert abs(link.stats.lost_random - expected) < 4 * math.sqrt(expected)


def test_no_loss_without_probability() -> None:
    link = LinkModel(1e12, 0.0, 10**12)
    for _ in range(1000):
        assert len(link.admit(0.0, [1500] * 45)) == 1
    assert link.stats.lost_random == 0


def test_link_refuses_bad_parameters() -> None:
    with pytest.raises(ValueError, match="rate"):
        LinkModel(0.0, 0.0, 1)
    with pytest.raises(ValueError, match="loss"):
        LinkModel(1.0, 0.0, 1, loss=1.5)


def test_steady_rate_runs_from_the_middle_to_the_end_of_file() -> None:
    # 1 MB/s for the first two seconds (slow start), then 10 MB/s, draining until 4.5 s.
    timeline = [(t / 10, int(min(t, 20) * 1e5 + max(0, t - 20) * 1e6)) for t in range(1, 46)]
    assert steady_rate(timeline, 4.0) == pytest.approx(10e6)
    assert steady_rate([(0.1, 5)], 4.0) == 0.0


def test_steady_rate_is_not_thrown_by_data_held_behind_a_hole() -> None:
    # 10 MB/s, but at the window's first point 5 MB waited behind a lost segment.
    timeline = [(t / 20, int(t / 20 * 10e6)) for t in range(1, 181)]
    timeline[80] = (timeline[80][0], timeline[80][1] - 5_000_000)
    assert steady_rate(timeline, 8.0) == pytest.approx(10e6, rel=0.05)


def test_judge_accepts_a_faithful_link_and_names_what_is_off() -> None:
    profile = PROFILES["regional"]
    good = judge(profile, 0.051, 0.95 * profile.rate_bytes_s)
    assert good["emulation_validated"]
    assert good["validation_problems"] == []
    starved = judge(profile, 0.050, profile.rate_bytes_s, late_fraction=0.2)
    assert not starved["emulation_validated"]
    assert "too busy" in starved["validation_problems"][0]
    too_fast = judge(profile, 0.050, 1.2 * profile.rate_bytes_s)
    assert "more than the" in too_fast["validation_problems"][0]
    bad = judge(profile, 0.060, 0.5 * profile.rate_bytes_s)
    assert not bad["emulation_validated"]
    assert "RTT 60.00 ms" in bad["validation_problems"][0]
    assert "bulk TCP flow" in bad["validation_problems"][1]


def test_judge_of_a_profile_without_delay_allows_a_millisecond() -> None:
    lan = PROFILES["lan"]
    assert judge(lan, 0.0004, lan.rate_bytes_s)["emulation_validated"]
    assert not judge(lan, 0.003, lan.rate_bytes_s)["emulation_validated"]
