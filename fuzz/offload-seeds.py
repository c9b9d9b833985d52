#!/usr/bin/env python3
# Writes the hand-made seeds of the offload and netlink fuzz targets (fuzz/corpus/{tso,gro,netlink}/):
# what a tun with IFF_VNET_HDR hands out, what a UDP GRO receive holds, what the kernel answers on rtnetlink.
# Run from the repository root: python3 fuzz/offload-seeds.py
import os, struct

def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return s

def ip(a): return bytes(int(x) for x in a.split("."))

def ipv4(src, dst, proto, payload, ttl=64, ident=0x1234, flags=0x4000, ihl_options=b""):
    ihl = 20 + len(ihl_options)
    total = ihl + len(payload)
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, 0, total, ident, flags, ttl, proto, 0, ip(src), ip(dst)) + ihl_options
    h = h[:10] + struct.pack("!H", ~csum(h) & 0xFFFF) + h[12:]
    return h + payload

def pseudo(src, dst, proto, length):
    return csum(ip(src) + ip(dst) + struct.pack("!BBH", 0, proto, length))

def tcp(src, dst, seq, payload, flags=0x10, options=b"", ident=0x1234, full=True, ttl=64):
    thl = 20 + len(options)
    t = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 0x1000, (thl // 4) << 4, flags, 502, 0, 0) + options + payload
    if full:
        c = ~csum(struct.pack("!H", pseudo(src, dst, 6, len(t))) + t) & 0xFFFF
    else:
        c = pseudo(src, dst, 6, len(t))  # NEEDS_CSUM: the pseudo-header sum only
    t = t[:16] + struct.pack("!H", c) + t[18:]
    return ipv4(src, dst, 6, t, ident=ident, ttl=ttl)

def vnet(flags=0, gso=0, hdr_len=0, gso_size=0, start=0, offset=0):
    return struct.pack("<BBHHHH", flags, gso, hdr_len, gso_size, start, offset)

def write(target, name, data):
    d = os.path.join("fuzz", "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f: f.write(data)

A, B = "10.244.1.2", "10.244.2.2"
data = bytes(i % 251 for i in range(6000))
ts = bytes([1, 1, 8, 10]) + struct.pack("!II", 7, 9)

# tso: virtio header + packet as read from the tun.
write("tso", "tso4-4k", vnet(1, 1, 40, 1448, 20, 16) + tcp(A, B, 1000, data[:4000], full=False))
write("tso", "tso4-timestamps-psh-fin", vnet(1, 1, 52, 1436, 20, 16) + tcp(A, B, 5, data[:3000], flags=0x19, options=ts, full=False))
write("tso", "tso4-ecn-cwr", vnet(1, 0x81, 40, 500, 20, 16) + tcp(A, B, 7, data[:1200], flags=0x90, full=False))
write("tso", "tso4-tiny-gso", vnet(1, 1, 40, 1, 20, 16) + tcp(A, B, 7, data[:200], full=False))
write("tso", "tso4-no-payload", vnet(1, 1, 40, 1448, 20, 16) + tcp(A, B, 7, b"", full=False))
udp = struct.pack("!HHHH", 40000, 53, 8 + 100, pseudo(A, B, 17, 108)) + data[:100]
write("tso", "csum-udp", vnet(1, 0, 0, 0, 20, 6) + ipv4(A, B, 17, udp))
write("tso", "csum-out-of-range", vnet(1, 0, 0, 0, 20, 200) + ipv4(A, B, 17, udp))
write("tso", "plain", vnet() + tcp(A, B, 1, data[:100]))
big = bytes(i % 253 for i in range(65526 - 40))
write("tso", "tso4-64k-seq-wrap", vnet(1, 1, 40, 1448, 20, 16) + tcp(A, B, 0xFFFFF000, big, full=False))
write("tso", "tso6-refused", vnet(1, 4, 60, 1440, 40, 16) + tcp(A, B, 1, data[:3000]))

# gro: selector (0: strict, outer 192.168.77.2 = the peer owning 10.244.2.0/24), segment size, the buffer.
def run(n, size, last, seq=100, ident=50, dst=A, flags=0x10):
    out = b""
    for k in range(n):
        p = last if k == n - 1 else size
        out += tcp(B, dst, seq + k * size, data[k * size:k * size + p], flags=flags if k == n - 1 else 0x10, ident=ident + k)
    return out

seg = 1400 + 40
write("gro", "flow-4", bytes([0]) + struct.pack("!h", seg) + run(4, 1400, 700))
write("gro", "flow-4-psh", bytes([0]) + struct.pack("!h", seg) + run(4, 1400, 1400, flags=0x18))
write("gro", "flow-to-underlay", bytes([0]) + struct.pack("!h", seg) + run(3, 1400, 1400, dst="192.168.77.1"))
def bigrun(n, size, seq=0xFFFFFF00, ident=0xFFF0):
    return b"".join(tcp(B, A, (seq + k * size) & 0xFFFFFFFF, bytes((k + i) % 251 for i in range(size)), ident=(ident + k) & 0xFFFF) for k in range(n))
write("gro", "flow-45-near-64k", bytes([0]) + struct.pack("!h", 1440) + bigrun(45, 1400))
write("gro", "flow-70-tiny", bytes([0]) + struct.pack("!h", 41 + 40 - 1) + bigrun(70, 40))
write("gro", "single", bytes([0]) + struct.pack("!h", 0) + run(1, 1400, 1400))
write("gro", "negative-size", bytes([0]) + struct.pack("!h", -1) + run(1, 100, 100))
write("gro", "relaxed-stranger", bytes([1 | (4 << 1)]) + struct.pack("!h", seg) + run(2, 1400, 1400))
gap = run(2, 1400, 1400) + tcp(B, A, 100 + 5 * 1400, data[:1400], ident=52)
write("gro", "flow-gap", bytes([0]) + struct.pack("!h", seg) + gap)

# netlink: byte 0 picks the reply type (0 link, 1 address, 2 route), then datagrams as [u16 LE length][bytes].
def attr(t, payload):
    a = struct.pack("<HH", 4 + len(payload), t) + payload
    return a + b"\0" * (-len(a) % 4)

def msg(t, flags, body, seq=77, pid=4242):
    return struct.pack("<IHHII", 16 + len(body), t, flags, seq, pid) + body

def route(n, flags=2):
    body = struct.pack("<BBBBBBBBI", 2, 16, 0, 0, 254, 3, 253, 1, 0)
    body += attr(15, struct.pack("<I", 254)) + attr(1, bytes([10, n, 0, 0])) + attr(4, struct.pack("<I", n))
    return msg(24, flags, body)

def done(flags=2, err=0): return msg(3, flags, struct.pack("<i", err))
def ack(err=0, text=None):
    body = struct.pack("<i", err) + b"\0" * 16
    flags = 0x100
    if text:
        body += attr(1, text.encode() + b"\0"); flags |= 0x200
    return msg(2, flags, body)

def link(index, name, mtu, kind=None):
    body = struct.pack("<BBHiII", 0, 0, 1, index, 0x1043, 0)
    body += attr(3, name.encode() + b"\0") + attr(4, struct.pack("<I", mtu))
    if kind: body += attr(18, attr(1, kind.encode() + b"\0"))
    return msg(16, 2, body)

def address(index, a, plen):
    body = struct.pack("<BBBBI", 2, plen, 0, 0, index) + attr(1, ip(a)) + attr(2, ip(a))
    return msg(20, 2, body)

def datagrams(*ds): return b"".join(struct.pack("<H", len(d)) + d for d in ds)

write("netlink", "route-dump", bytes([2]) + datagrams(route(1) + route(2), route(3) + done()))
write("netlink", "route-dump-interrupted", bytes([2]) + datagrams(route(1), route(2, 0x12) + done(0x12)))
write("netlink", "link-dump", bytes([0]) + datagrams(link(1, "lo", 65536) + link(2, "eth0", 1500, "veth") + done()))
write("netlink", "address-dump", bytes([1]) + datagrams(address(2, "192.168.77.1", 24) + done()))
write("netlink", "ack-error-text", bytes([2]) + datagrams(ack(-19, "Nexthop device is not up")))
write("netlink", "other-sequence", bytes([2]) + datagrams(msg(24, 2, b"\0" * 12, seq=76)))
