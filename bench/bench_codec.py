#!/usr/bin/env python3
"""Codec throughput for 1 MiB WRITE frames, as a ratio to a bare memory copy.

    python3 bench/bench_codec.py [--seconds 0.5]

Measured in one run, on the same 1 MiB of data:

  memcpy     a bare memoryview copy of header + payload (the baseline);
  crc32      zlib.crc32 over the payload, once (the codec needs it twice:
             the sender computes payload_crc, the receiver checks it);
  codec      Write.encode() to parts (header + the caller's buffer), then
             parse_header + decode_body on a header and payload already
             received, as recv_message does;
  decoder    the incremental Decoder, fed in 256 KiB pieces as a socket
             delivers them: a large payload is copied once, from the fed
             bytes into its own buffer.

It also checks that the codec makes no payload copy: encode() returns the
caller's buffer object in its parts, and the decoded WRITE's data is a
memoryview of the receive buffer.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import zlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import protocol as p  # noqa: E402

SIZE = 1 << 20


def rate(fn, nbytes: int, seconds: float) -> float:
    """Best bytes/second over 5 rounds of about ``seconds`` / 5 each."""
    best = 0.0
    for _ in range(5):
        n, start = 0, time.perf_counter()
        deadline = start + seconds / 5
        while True:
            fn()
            n += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, n * nbytes / (now - start))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    ap.add_argument("--json", action="store_true",
                    help="also print a BENCH-JSON line for bench/report.py")
    args = ap.parse_args()

    data = bytearray(SIZE)
    for i in range(0, SIZE, 4096):  # not all zero, not worth a random generator
        data[i:i + 8] = i.to_bytes(8, "big")
    msg = p.Write(request_id=1, volume=1, offset=0, data=data)
    parts = msg.encode()
    header_buf = bytearray(parts[0])  # what recv_message reads into its header buffer
    payload_buf = bytearray(data)     # what recv_message reads into the payload buffer
    frame = bytes(header_buf) + bytes(payload_buf)
    dst = bytearray(len(frame))
    src = memoryview(frame)

    # -- no payload copy ------------------------------------------------------
    assert parts[1] is data, "encode copied the payload"
    decoded = p.decode_body(p.parse_header(header_buf), payload_buf)
    assert isinstance(decoded.data, memoryview) and decoded.data.obj is payload_buf, \
        "decode copied the payload"
    assert decoded.data == data

    def memcpy():
        dst[:] = src

    def crc():
        zlib.crc32(data)

    def codec():
        msg.encode()
        p.decode_body(p.parse_header(header_buf), payload_buf)

    dec = p.Decoder()

    pieces = [src[i:i + 256 * 1024] for i in range(0, len(frame), 256 * 1024)]

    def decoder():
        for piece in pieces:
            dec.feed(piece)
            msg = dec.next_message()
        assert msg is not None

    n = len(frame)
    r_copy = rate(memcpy, n, args.seconds)
    r_crc = rate(crc, n, args.seconds)
    r_codec = rate(codec, n, args.seconds)
    r_dec = rate(decoder, n, args.seconds)
    bound = 1 / (2 / r_crc)  # two CRC passes and nothing else

    gb = 1e9
    print(f"1 MiB WRITE frames ({n} bytes each), best of 5 x {args.seconds / 5:.2f} s")
    print(f"  memcpy (baseline)       {r_copy / gb:7.2f} GB/s   1.00x")
    print(f"  crc32, one pass         {r_crc / gb:7.2f} GB/s   {r_crc / r_copy:4.2f}x")
    print(f"  codec encode+decode     {r_codec / gb:7.2f} GB/s   {r_codec / r_copy:4.2f}x"
          f"   (ceiling with 2 CRC passes: {bound / gb:.2f} GB/s, "
          f"codec reaches {r_codec / bound:.0%} of it)")
    print(f"  Decoder (feed+next)     {r_dec / gb:7.2f} GB/s   {r_dec / r_copy:4.2f}x"
          "   (one copy from the fed bytes)")
    print("  no payload copy: encode returns the caller's buffer; decode_body's data "
          "is a view of the receive buffer")
    print(f"RESULT codec/memcpy ratio {r_codec / r_copy:.2f}x (issue target 0.5x; "
          f"two CRC-32 passes alone allow at most {bound / r_copy:.2f}x here)")
    if args.json:
        ratio = r_codec / r_copy
        print("BENCH-JSON " + json.dumps({"bench": "codec", "figures": [
            {"name": "codec encode+decode, 1 MiB WRITE", "value": round(r_codec / gb, 2),
             "unit": "GB/s", "baseline_name": "memcpy", "baseline": round(r_copy / gb, 2),
             "ratio": round(ratio, 2), "target": ">= 0.5x", "met": ratio >= 0.5,
             "note": f"two CRC-32 passes alone allow at most {bound / r_copy:.2f}x; "
                     f"codec reaches {r_codec / bound:.0%} of that ceiling"},
            {"name": "crc32, one pass over 1 MiB", "value": round(r_crc / gb, 2), "unit": "GB/s",
             "baseline_name": "memcpy", "baseline": round(r_copy / gb, 2),
             "ratio": round(r_crc / r_copy, 2)},
            {"name": "incremental Decoder (feed+next), 1 MiB WRITE",
             "value": round(r_dec / gb, 2), "unit": "GB/s", "baseline_name": "memcpy",
             "baseline": round(r_copy / gb, 2), "ratio": round(r_dec / r_copy, 2)}],
            "notes": [] if ratio >= 0.5 else [
                f"The codec computes CRC-32 twice per payload (the sender's payload_crc, the "
                f"receiver's check) and zlib.crc32 runs at {r_crc / gb:.2f} GB/s here against "
                f"{r_copy / gb:.2f} GB/s for memcpy, so two passes alone allow at most "
                f"{bound / r_copy:.2f}x of memcpy; the codec reaches {r_codec / bound:.0%} of "
                "that ceiling (above 100% means the CRC figure, measured separately, was slowed "
                "by other load) and copies no payload.  The 0.5x target cannot be met while "
                "the payload is checked with CRC-32 in Python's zlib."]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
