"""APDU round trip over PC/SC: one pyscard connection, N x SELECT PKI 0.

Usage: bench_apdu.py READER N
Prints one "RESULT apdu <median> <p90> <p99> <mean>" line (ms) for scripts/bench,
after a human-readable summary. This is peers.md §4.2 row 3b's method.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stats import line, summary  # noqa: E402

from smartcard.System import readers  # noqa: E402

SELECT_PKI0 = list(bytes.fromhex("00A4040007A0000000790100"))


def main():
    want, n = sys.argv[1], int(sys.argv[2])
    matches = [r for r in readers() if str(r).endswith(want)]
    if not matches:
        sys.exit("bench_apdu: reader %r not found among %s" % (want, [str(r) for r in readers()]))
    conn = matches[0].createConnection()
    conn.connect()
    sw_seen = {}
    for _ in range(20):  # warm-up: first APDUs pay for card power-on
        conn.transmit(SELECT_PKI0)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        _, sw1, sw2 = conn.transmit(SELECT_PKI0)
        samples.append((time.perf_counter() - t0) * 1000)
        sw_seen["%02X %02X" % (sw1, sw2)] = sw_seen.get("%02X %02X" % (sw1, sw2), 0) + 1
    conn.disconnect()
    st = summary(samples)
    print(line("APDU round trip (SELECT PKI 0)", st))
    print("status words: %s (libcacard answers 61 0D)" % sw_seen)
    bad = {sw: c for sw, c in sw_seen.items() if not (sw.startswith("61") or sw == "90 00")}
    if bad:
        sys.exit("bench_apdu: SELECT PKI 0 failed: %s" % bad)
    print("RESULT apdu %.4f %.4f %.4f %.4f" % (st["median"], st["p90"], st["p99"], st["mean"]))


if __name__ == "__main__":
    main()
