# Extracts the novels of janeaustenr's data/Rdata.rdb (R serialization, XDR, version 3:
# each object is a 4-byte length and a zlib stream holding one character vector of lines).
import struct, sys, zlib

def strings(raw):
    assert raw[:2] == b"X\n", "not an XDR R serialization"
    pos = 2 + 12  # format, version, writer and min reader versions
    (nlen,) = struct.unpack(">I", raw[pos:pos + 4])
    pos += 4 + nlen  # native encoding name (version 3)
    (flags, n) = struct.unpack(">Ii", raw[pos:pos + 8])
    assert flags & 0xFF == 16, "not a character vector"
    pos += 8
    out = []
    for _ in range(n):
        (cflags, clen) = struct.unpack(">Ii", raw[pos:pos + 8])
        assert cflags & 0xFF == 9, "not a CHARSXP"
        pos += 8
        if clen < 0:
            out.append("")
            continue
        out.append(raw[pos:pos + clen].decode("utf-8"))
        pos += clen
    return out

rdb, wanted, dst = sys.argv[1:]
data = open(rdb, "rb").read()
off = 0
while off < len(data):
    d = zlib.decompressobj()
    raw = d.decompress(data[off + 4:])
    off += 4 + len(data) - off - 4 - len(d.unused_data)
    lines = strings(raw)
    title = next(l for l in lines if l.strip())
    print(f"found: {title.strip()} ({len(lines)} lines)", file=sys.stderr)
    if title.strip().upper() == wanted.upper():
        with open(dst, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        sys.exit(0)
sys.exit(f"{wanted!r} not found in {rdb}")
