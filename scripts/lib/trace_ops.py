"""The card's own time for one kind of APDU, from a vscard --trace file.

Usage: trace_ops.py TRACE CMD-PREFIX [SAMPLES]
TRACE is the JSON-lines trace of `vscard serve --trace` (one "apdu" event
per command, with "us": the microseconds the card took to answer). Prints
"RESULT card <median> <p90> <n>" (ms) over the commands whose hex starts
with CMD-PREFIX, e.g. 00420000 for the last chunk of a CAC SIGN, where the
RSA operation runs. Measured in the same run as the signatures it is
subtracted from, unlike a separate raw-RSA benchmark, whose CPU state can
differ by a third.

With SAMPLES (a client's timings in ms, one per line, in order, as
bench_sign.py writes them), the last len(SAMPLES) matching commands are the
client's, one each, and it also prints "RESULT overhead <median> <p90> <n>"
(ms): the median over operations of the client's time minus the card's
time for that same operation. Pairing takes out the RSA operation's own
spread (its p90 is 10-25% above its median here), which a difference of
two medians keeps.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stats import summary  # noqa: E402


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    path, prefix = sys.argv[1], sys.argv[2].upper()
    samples = []
    with open(path) as f:
        for raw in f:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue  # a line cut short by the writer's exit
            if ev.get("event") == "apdu" and ev.get("cmd", "").upper().startswith(prefix) and "us" in ev:
                samples.append(ev["us"] / 1000)
    if not samples:
        sys.exit("trace_ops: no %s command in %s" % (prefix, path))
    st = summary(samples)
    print("RESULT card %.4f %.4f %d" % (st["median"], st["p90"], st["n"]))
    if len(sys.argv) == 4:
        with open(sys.argv[3]) as f:
            client = [float(v) for v in f.read().split()]
        if not client or len(client) > len(samples):
            sys.exit("trace_ops: %d client timings but %d %s commands in the trace" % (len(client), len(samples), prefix))
        diffs = [c - k for c, k in zip(client, samples[-len(client):])]
        st = summary(diffs)
        print("RESULT overhead %.4f %.4f %d" % (st["median"], st["p90"], st["n"]))


if __name__ == "__main__":
    main()
