"""Packets as a TUN device opened with IFF_VNET_HDR hands them over: a virtio_net_hdr, then an IP
packet that may be a TCP segmentation-offload (GSO) super-packet of up to 64 KB.

A super-packet stands for `segments` packets of `gso_size` payload bytes each that a real NIC
would have put on the wire one by one. The link model decides per segment; when some segments of
a super-packet are dropped, `split_run` rebuilds a smaller super-packet (or a plain packet) from a
contiguous run of the surviving ones, exactly as the kernel's own segmentation would have cut
them: IP total length, IPv4 id, TCP sequence number and flags adjusted, the IPv4 header checksum
recomputed and the TCP checksum left as the partial (pseudo-header) sum that
VIRTIO_NET_HDR_F_NEEDS_CSUM asks the receiving kernel to complete. The payload is not copied:
a run is a list of buffers for os.writev().
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "GSO_ECN",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "NEEDS_CSUM",
    "VNET_HDR_LEN",
    "Packet",
    "VnetHeader",
    "ipv4_header_checksum",
    "parse_packet",
    "split_run",
]

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size
NEEDS_CSUM = 0x01
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN = 0, 1, 4, 0x80
_IPPROTO_TCP = 6
_TCP_CHECK_OFFSET = 16
_TCP_FIN, _TCP_PSH, _TCP_CWR = 0x01, 0x08, 0x80


@dataclass(frozen=True, slots=True)
class VnetHeader:
    """struct virtio_net_hdr (little-endian on the hosts we run on)."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def parse(cls, frame: bytes | memoryview) -> VnetHeader:
        """Read the header at the start of `frame`; ValueError if it is too short."""
        if len(frame) < VNET_HDR_LEN:
            raise ValueError(f"frame of {len(frame)} bytes is shorter than a virtio_net_hdr")
        return cls(*VNET_HDR.unpack_from(frame))

    def pack(self) -> bytes:
        """The header's 10 bytes."""
        return VNET_HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )


@dataclass(frozen=True, slots=True)
class Packet:
    """One frame read from the TUN device, seen as `segments` wire packets.

    `header_len` is the IP + TCP header length of a TCP super-packet (0 for anything else: such a
    packet is one segment and is never split). `wire_bytes(i)` is what segment i occupies on the
    link: its headers plus its share of the payload.
    """

    frame: bytes
    vnet: VnetHeader
    ip_header_len: int
    header_len: int
    segment_size: int
    segments: int

    @property
    def ip(self) -> memoryview:
        """The IP packet (after the virtio_net_hdr)."""
        return memoryview(self.frame)[VNET_HDR_LEN:]

    @property
    def payload_len(self) -> int:
        """TCP payload bytes of the whole (super-)packet; for other packets, all IP bytes."""
        return len(self.frame) - VNET_HDR_LEN - self.header_len

    def wire_bytes(self, index: int) -> int:
        """Bytes segment `index` puts on the wire."""
        start = index * self.segment_size
        return self.header_len + min(self.segment_size, self.payload_len - start)


def parse_packet(frame: bytes) -> Packet:
    """Describe a frame read from a TUN device with IFF_VNET_HDR; ValueError when malformed."""
    vnet = VnetHeader.parse(frame)
    ip_len = len(frame) - VNET_HDR_LEN
    gso = vnet.gso_type & ~GSO_ECN
    if gso not in (GSO_TCPV4, GSO_TCPV6) or vnet.gso_size == 0:
        return Packet(frame, vnet, 0, 0, max(ip_len, 1), 1)
    ip_header_len = _ip_header_len(frame, gso)
    if ip_len < ip_header_len + 20:
        raise ValueError(f"GSO frame of {ip_len} IP bytes is too short for IP and TCP headers")
    tcp_header_len = (frame[VNET_HDR_LEN + ip_header_len + 12] >> 4) * 4
    header_len = ip_header_len + tcp_header_len
    if tcp_header_len < 20 or ip_len < header_len:
        raise ValueError(f"GSO frame has a bad TCP header length {tcp_header_len}")
    payload_len = ip_len - header_len
    segments = max(1, -(-payload_len // vnet.gso_size))
    return Packet(frame, vnet, ip_header_len, header_len, vnet.gso_size, segments)


def _ip_header_len(frame: bytes, gso: int) -> int:
    version = frame[VNET_HDR_LEN] >> 4
    if gso == GSO_TCPV4:
        if version != 4:
            raise ValueError(f"GSO type TCPV4 on an IP version {version} packet")
        return (frame[VNET_HDR_LEN] & 0x0F) * 4
    if version != 6 or frame[VNET_HDR_LEN + 6] != _IPPROTO_TCP:
        raise ValueError("GSO type TCPV6 on a packet that is not IPv6 with TCP right after")
    return 40


def split_run(packet: Packet, first: int, last: int) -> list[bytes | memoryview]:
    """Buffers (for os.writev) of one frame carrying segments first..last of `packet`."""
    if first == 0 and last == packet.segments - 1:
        return [packet.frame]
    if packet.header_len == 0 or not 0 <= first <= last < packet.segments:
        raise ValueError(
            f"cannot cut segments {first}..{last} from a {packet.segments}-segment frame"
        )
    ip = packet.ip
    start = packet.header_len + first * packet.segment_size
    end = min(packet.header_len + (last + 1) * packet.segment_size, len(ip))
    payload = ip[start:end]
    ip_header = _cut_ip_header(packet, first, packet.header_len + len(payload))
    tcp_header = _cut_tcp_header(packet, first, last, ip_header, packet.header_len + len(payload))
    count = last - first + 1
    vnet = VnetHeader(
        flags=NEEDS_CSUM,
        gso_type=packet.vnet.gso_type if count > 1 else GSO_NONE,
        hdr_len=packet.header_len,
        gso_size=packet.segment_size if count > 1 else 0,
        csum_start=packet.ip_header_len,
        csum_offset=_TCP_CHECK_OFFSET,
    )
    return [vnet.pack(), bytes(ip_header), bytes(tcp_header), payload]


def _cut_ip_header(packet: Packet, first: int, total_len: int) -> bytearray:
    header = bytearray(packet.ip[: packet.ip_header_len])
    if packet.ip_header_len == 40:  # IPv6: payload length excludes the fixed header
        struct.pack_into("!H", header, 4, total_len - 40)
        return header
    ident = (struct.unpack_from("!H", header, 4)[0] + first) & 0xFFFF
    struct.pack_into("!HH", header, 2, total_len, ident)
    struct.pack_into("!H", header, 10, 0)
    struct.pack_into("!H", header, 10, ipv4_header_checksum(header))
    return header


def _cut_tcp_header(
    packet: Packet, first: int, last: int, ip_header: bytearray, total_len: int
) -> bytearray:
    header = bytearray(packet.ip[packet.ip_header_len : packet.header_len])
    seq = (struct.unpack_from("!I", header, 4)[0] + first * packet.segment_size) & 0xFFFFFFFF
    struct.pack_into("!I", header, 4, seq)
    flags = header[13]
    if first > 0:  # only the first segment of a burst carries CWR
        flags &= ~_TCP_CWR
    if last < packet.segments - 1:  # only the last one carries FIN and PSH
        flags &= ~(_TCP_FIN | _TCP_PSH)
    header[13] = flags
    tcp_len = total_len - packet.ip_header_len
    struct.pack_into("!H", header, _TCP_CHECK_OFFSET, _pseudo_header_sum(ip_header, tcp_len))
    return header


def _pseudo_header_sum(ip_header: bytearray, tcp_len: int) -> int:
    """The folded, uncomplemented pseudo-header sum Linux leaves in a CHECKSUM_PARTIAL header."""
    addresses = ip_header[12:20] if len(ip_header) != 40 else ip_header[8:40]
    total = sum(struct.unpack(f"!{len(addresses) // 2}H", addresses)) + _IPPROTO_TCP + tcp_len
    return _fold(total)


def _fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ipv4_header_checksum(header: bytes | bytearray) -> int:
    """The IPv4 header checksum of `header` (whose checksum field must be zero)."""
    return ~_fold(sum(struct.unpack(f"!{len(header) // 2}H", header))) & 0xFFFF
