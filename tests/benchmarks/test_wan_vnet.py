"""virtio_net_hdr parsing and cutting TCP GSO super-packets, on synthetic frames."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.wan.vnet import (
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    NEEDS_CSUM,
    VNET_HDR_LEN,
    VnetHeader,
    ipv4_header_checksum,
    parse_packet,
    split_run,
)

MSS = 1448
SRC4, DST4 = bytes([10, 201, 0, 1]), bytes([10, 201, 0, 2])
SRC6, DST6 = bytes(range(16)), bytes(range(16, 32))
TCP_OPTIONS = b"\x01\x01\x08\x0a" + bytes(8)  # NOP NOP timestamps: a 32-byte TCP header
SEQ, IP_ID = 0xFFFF_F000, 0xFFFE  # both wrap inside the packet


def _ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _pseudo(src: bytes, dst: bytes, tcp_len: int) -> bytes:
    return src + dst + struct.pack("!HH", 6, tcp_len)


def _partial(src: bytes, dst: bytes, tcp_len: int) -> int:
    return _ones_sum(_pseudo(src, dst, tcp_len))


def make_frame(payload: bytes, *, v6: bool = False, flags: int = 0x18 | 0x80) -> bytes:
    """A TCP super-packet as Linux hands it over: partial checksum, GSO type and size set."""
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    ip_len = 40 if v6 else 20
    tcp_len = 32 + len(payload)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, SEQ, 7, 8 << 4, flags, 512, 0, 0) + TCP_OPTIONS
    tcp = tcp[:16] + struct.pack("!H", _partial(src, dst, tcp_len)) + tcp[18:]
    if v6:
        ip = struct.pack("!IHBB", 6 << 28, tcp_len, 6, 64) + src + dst
    else:
        ip = struct.pack("!BBHHHBBH", 0x45, 0, ip_len + tcp_len, IP_ID, 0x4000, 64, 6, 0)
        ip += src + dst
        ip = ip[:10] + struct.pack("!H", ipv4_header_checksum(ip)) + ip[12:]
    gso = GSO_TCPV6 if v6 else GSO_TCPV4
    vnet = VnetHeader(NEEDS_CSUM, gso, ip_len + 32, MSS, ip_len, 16)
    return vnet.pack() + ip + tcp + payload


def _complete_checksum(frame: bytes) -> bytes:
    """What a NIC does with NEEDS_CSUM: sum from csum_start, store the complement."""
    vnet = VnetHeader.parse(frame)
    ip = bytearray(frame[VNET_HDR_LEN:])
    where = vnet.csum_start + vnet.csum_offset
    struct.pack_into("!H", ip, where, ~_ones_sum(bytes(ip[vnet.csum_start :])) & 0xFFFF)
    return bytes(ip)


def _tcp_checksum_ok(ip: bytes, v6: bool) -> bool:
    ip_len = 40 if v6 else 20
    src, dst = (ip[8:24], ip[24:40]) if v6 else (ip[12:16], ip[16:20])
    segment = ip[ip_len:]
    return _ones_sum(_pseudo(src, dst, len(segment)) + segment) == 0xFFFF


def test_vnet_header_round_trip_and_short_input() -> None:
    header = VnetHeader(NEEDS_CSUM, GSO_TCPV4, 72, MSS, 20, 16)
    assert VnetHeader.parse(header.pack()) == header
    with pytest.raises(ValueError, match="shorter than a virtio_net_hdr"):
        VnetHeader.parse(b"\0" * 4)


def test_parse_counts_segments_and_wire_bytes() -> None:
    packet = parse_packet(make_frame(bytes(10 * MSS + 100)))
    assert (packet.ip_header_len, packet.header_len, packet.segments) == (20, 52, 11)
    assert packet.wire_bytes(0) == 52 + MSS
    assert packet.wire_bytes(10) == 52 + 100


def test_a_plain_packet_is_one_segment() -> None:
    frame = VnetHeader().pack() + bytes(60)
    packet = parse_packet(frame)
    assert packet.segments == 1
    assert packet.wire_bytes(0) == 60
    assert split_run(packet, 0, 0) == [frame]


def test_parse_refuses_inconsistent_gso_frames() -> None:
    frame = bytearray(make_frame(bytes(3 * MSS)))
    frame[VNET_HDR_LEN] = 0x60  # says IPv6 under a TCPV4 GSO type
    with pytest.raises(ValueError, match="TCPV4"):
        parse_packet(bytes(frame))
    with pytest.raises(ValueError, match="too short"):
        parse_packet(make_frame(b"")[: VNET_HDR_LEN + 30])


def test_whole_run_is_the_frame_itself() -> None:
    frame = make_frame(bytes(5 * MSS))
    assert split_run(parse_packet(frame), 0, 4) == [frame]


@pytest.mark.parametrize("v6", [False, True])
def test_cut_runs_carry_the_right_bytes_and_headers(v6: bool) -> None:
    payload = bytes(i % 251 for i in range(10 * MSS + 77))
    packet = parse_packet(make_frame(payload, v6=v6))
    ip_len = 40 if v6 else 20
    for first, last in [(0, 2), (4, 9), (3, 3), (10, 10)]:
        frame = b"".join(split_run(packet, first, last))
        vnet = VnetHeader.parse(frame)
        ip = frame[VNET_HDR_LEN:]
        count = last - first + 1
        assert ip[ip_len + 32 :] == payload[first * MSS : (last + 1) * MSS]
        assert vnet.gso_type == (packet.vnet.gso_type if count > 1 else GSO_NONE)
        assert vnet.gso_size == (MSS if count > 1 else 0)
        assert (vnet.flags, vnet.csum_start, vnet.csum_offset) == (NEEDS_CSUM, ip_len, 16)
        seq = struct.unpack_from("!I", ip, ip_len + 4)[0]
        assert seq == (SEQ + first * MSS) % 2**32
        flags = ip[ip_len + 13]
        assert bool(flags & 0x80) == (first == 0)  # CWR on the first segment only
        assert bool(flags & 0x08) == (last == packet.segments - 1)  # PSH on the last only
        if v6:
            assert struct.unpack_from("!H", ip, 4)[0] == len(ip) - 40
        else:
            assert struct.unpack_from("!H", ip, 2)[0] == len(ip)
            assert struct.unpack_from("!H", ip, 4)[0] == (IP_ID + first) % 2**16
            assert ipv4_header_checksum(ip[:20]) == 0  # a valid header sums to all ones
        assert _tcp_checksum_ok(_complete_checksum(frame), v6)


@given(
    segments=st.integers(min_value=2, max_value=45),
    tail=st.integers(min_value=1, max_value=MSS),
    data=st.data(),
)
def test_cutting_then_joining_the_runs_gives_back_the_payload(
    segments: int, tail: int, data: st.DataObject
) -> None:
    payload = bytes(i % 253 for i in range((segments - 1) * MSS + tail))
    packet = parse_packet(make_frame(payload))
    first = data.draw(st.integers(0, segments - 1))
    last = data.draw(st.integers(first, segments - 1))
    frame = b"".join(split_run(packet, first, last))
    assert frame[VNET_HDR_LEN + 52 :] == payload[first * MSS : (last + 1) * MSS]
    assert _tcp_checksum_ok(_complete_checksum(frame), v6=False)


def test_split_refuses_segments_outside_the_packet() -> None:
    packet = parse_packet(make_frame(bytes(3 * MSS)))
    with pytest.raises(ValueError, match="cannot cut"):
        split_run(packet, 2, 5)
