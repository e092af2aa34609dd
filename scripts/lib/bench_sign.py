"""RSA-2048 signatures through PKCS#11 in one process (peers.md §4.2 row 3a).

Usage: bench_sign.py MODULE PIN N OUTDIR
One C_Login, then N x C_SignInit+C_Sign with CKM_SHA256_RSA_PKCS on 32 bytes
with the private key of CKA_ID 00 01. Writes the last signature, its data and
the card's certificate 0001 to OUTDIR (data.bin, sig.bin, cert.der) so the
caller can verify it with openssl, and the N timings in order, one per line
in ms, to OUTDIR/samples.txt (trace_ops.py pairs each with the card's own
time for that signature). Prints "RESULT sign <median> <p90> <mean>
<setup>" (ms).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stats import line, summary  # noqa: E402

import PyKCS11  # noqa: E402


def main():
    module, pin, n, outdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    t0 = time.perf_counter()
    lib = PyKCS11.PyKCS11Lib()
    lib.load(module)
    slots = lib.getSlotList(tokenPresent=True)
    if not slots:
        sys.exit("bench_sign: no token present")
    session = lib.openSession(slots[0], PyKCS11.CKF_SERIAL_SESSION)
    session.login(pin)
    key_id = (0x00, 0x01)
    keys = session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_ID, key_id)])
    certs = session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_CERTIFICATE), (PyKCS11.CKA_ID, key_id)])
    if not keys or not certs:
        sys.exit("bench_sign: key or certificate 0001 not found")
    setup = (time.perf_counter() - t0) * 1000
    mech = PyKCS11.Mechanism(PyKCS11.CKM_SHA256_RSA_PKCS, None)
    data = os.urandom(32)
    for _ in range(5):  # warm-up: OpenSC caches, CPU state
        session.sign(keys[0], data, mech)
    samples = []
    sig = None
    for _ in range(n):
        t1 = time.perf_counter()
        sig = session.sign(keys[0], data, mech)
        samples.append((time.perf_counter() - t1) * 1000)
    cert = session.getAttributeValue(certs[0], [PyKCS11.CKA_VALUE])[0]
    session.logout()
    session.closeSession()
    with open(os.path.join(outdir, "data.bin"), "wb") as f:
        f.write(data)
    with open(os.path.join(outdir, "sig.bin"), "wb") as f:
        f.write(bytes(sig))
    with open(os.path.join(outdir, "cert.der"), "wb") as f:
        f.write(bytes(cert))
    with open(os.path.join(outdir, "samples.txt"), "w") as f:
        f.writelines("%.4f\n" % v for v in samples)
    st = summary(samples)
    print(line("RSA-2048 SHA256-RSA-PKCS signature (PKCS#11, in process)", st))
    print("setup (load, login, find): %.1f ms" % setup)
    print("RESULT sign %.4f %.4f %.4f %.1f" % (st["median"], st["p90"], st["mean"], setup))


if __name__ == "__main__":
    main()
