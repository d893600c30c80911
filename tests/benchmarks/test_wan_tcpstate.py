"""The sender-side TCP sampler's pure parts: parsing `ss -tinH` and finding bbr's PROBE_RTT."""

from __future__ import annotations

import pytest

from benchmarks.wan.tcpstate import SocketState, parse_ss, probe_rtt_spans

# Two connections as iproute2 6.1 prints them (`ss -tinH state established`), taken from an
# intercontinental run: the first in PROBE_RTT (cwnd 4 with megabytes not sent), the second
# cruising in PROBE_BW.
SS_OUTPUT = (
    "0      18678608 10.201.0.1:47388 10.201.0.2:37513\n"
    "\t bbr wscale:11,11 rto:404 rtt:202.972/0.171 ato:40 mss:1448 pmtu:1500 rcvmss:536 "
    "advmss:1448 cwnd:4 ssthresh:3482 bytes_sent:226925401 bytes_retrans:4746544 "
    "bytes_acked:216213098 segs_out:156747 bbr:(bw:194066264bps,mrtt:201.404,pacing_gain:1,"
    "cwnd_gain:1) send 228288bps pacing_rate 192125600bps unacked:4120 notsent:12712848 "
    "minrtt:200 snd_wnd:43982848\n"
    "0      7695082 10.201.0.1:47390 10.201.0.2:37513\n"
    "\t bbr wscale:11,11 rto:404 rtt:203.132/0.141 ato:40 mss:1448 cwnd:3388 ssthresh:3482 "
    "bytes_acked:1066090090 bbr:(bw:194517136bps,mrtt:200,pacing_gain:1.25,cwnd_gain:2) "
    "unacked:5315 minrtt:200\n"
)


def test_parse_ss_reads_each_connection() -> None:
    first, second = parse_ss(SS_OUTPUT)
    assert first == SocketState(
        peer="10.201.0.2:37513",
        cwnd=4,
        bytes_acked=216213098,
        notsent=12712848,
        bbr=True,
        pacing_gain=1.0,
        min_rtt_ms=pytest.approx(201.404),
    )
    assert first.in_probe_rtt
    assert (second.cwnd, second.pacing_gain, second.notsent) == (3388, 1.25, 0)
    assert not second.in_probe_rtt


def test_small_cwnd_is_probe_rtt_only_under_bbr() -> None:
    cubic = parse_ss("0 0 10.201.0.1:1 10.201.0.2:2\n\t cubic cwnd:2 ssthresh:7 bytes_acked:9\n")
    assert cubic == [SocketState(peer="10.201.0.2:2", cwnd=2, bytes_acked=9)]
    assert not cubic[0].in_probe_rtt
    assert parse_ss("") == []


def test_probe_rtt_spans_join_consecutive_samples() -> None:
    probing = [SocketState("p:1", cwnd=4, bbr=True, pacing_gain=1.0)]
    cruising = [SocketState("p:1", cwnd=3000, bbr=True, pacing_gain=1.0)]
    samples = [
        (10.0, cruising),
        (10.1, probing),
        (10.2, probing),
        (10.3, probing),
        (10.4, cruising),
        (20.9, probing),
        (21.0, cruising),
    ]
    spans = probe_rtt_spans(samples, sample_s=0.1)
    assert spans == [(10.1, pytest.approx(10.4)), (20.9, pytest.approx(21.0))]
