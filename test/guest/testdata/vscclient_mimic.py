#!/usr/bin/env python3
"""vscclient_mimic: a VSCard client that behaves on the wire like libcacard's
vscclient (protocols.md §2, peers.md §1), for TestGuestReaderUSBRedir.

It has no card of its own. It plays QEMU's ccid-card-passthru towards a
`vscard connect --card DIR` that dials --card-listen, and relays that
card's APDUs to the VSCard host it dials itself (`vscard reader
--vscard-listen`), with vscclient's quirks:
  - every header carries reader_id 0 (send_msg ignores its id argument);
  - Init, then ReaderRemove(0) "in case of unclean previous exit", then a
    ReaderAdd with an empty payload, then the ATR once an Error(0) came;
  - a failed transfer is answered with VSC_Error whose code is in host
    byte order (little-endian here), not network order (peers.md §1.5);
    --error-apdu HEX names a command answered that way (code 2, out of
    memory), without reaching the card;
  - each message is written in one segment, with TCP_NODELAY;
  - its receive buffer is 270 bytes: a longer host message would overflow
    vscclient, so the mimic reports it and exits 3.
It prints one line per event on stdout; the test reads them.
"""
import argparse
import socket
import struct
import sys

INIT, ERROR, READER_ADD, READER_REMOVE, ATR, CARD_REMOVE, APDU, FLUSH, FLUSH_COMPLETE = range(1, 10)
MAGIC = b"VSCD"
VERSION = 2
BUF = 270  # vscclient's static APDU buffer


def log(*a):
    print(*a, flush=True)


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("peer closed")
        b += c
    return b


def recv_msg(s):
    typ, rid, ln = struct.unpack(">III", recv_exact(s, 12))
    if ln > 65536:
        raise ValueError("length %d" % ln)
    return typ, rid, recv_exact(s, ln) if ln else b""


def send_msg(s, typ, payload=b"", rid=0):
    s.sendall(struct.pack(">III", typ, rid, len(payload)) + payload)


def init_payload():
    return MAGIC + struct.pack(">II", VERSION, 0)


def serve_card(ln):
    """Accept `vscard connect` and answer its handshake as QEMU 7.2 does;
    return the connection and the card's ATR."""
    c, _ = ln.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    atr = None
    while atr is None:
        typ, rid, p = recv_msg(c)
        if typ == INIT:
            send_msg(c, INIT, init_payload(), rid=0xFFFFFFFF)
        elif typ in (READER_ADD, READER_REMOVE, CARD_REMOVE):
            send_msg(c, ERROR, struct.pack(">I", 0), rid=0)
        elif typ == ATR:
            send_msg(c, ERROR, struct.pack(">I", 0), rid=0)
            atr = p
        else:
            log("card-side unexpected type", typ)
    log("card atr", atr.hex())
    return c, atr


def card_apdu(c, cmd):
    send_msg(c, APDU, cmd, rid=0)
    while True:
        typ, _, p = recv_msg(c)
        if typ == APDU:
            return p
        if typ == ERROR:
            return None
        if typ in (READER_ADD, READER_REMOVE, CARD_REMOVE, ATR):
            send_msg(c, ERROR, struct.pack(">I", 0), rid=0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reader", required=True, help="HOST:PORT of vscard reader --vscard-listen")
    ap.add_argument("--card-listen", type=int, required=True, help="127.0.0.1 port vscard connect dials")
    ap.add_argument("--error-apdu", default="", help="hex command answered with a host-order VSC_Error")
    a = ap.parse_args()
    err_apdu = bytes.fromhex(a.error_apdu)

    ln = socket.socket()
    ln.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ln.bind(("127.0.0.1", a.card_listen))
    ln.listen(1)
    log("listening", a.card_listen)
    card, atr = serve_card(ln)

    host, port = a.reader.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.settimeout(None)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # vscclient: Init with reader_id 0; on the host's Init, ReaderRemove(0)
    # and the ReaderAdd with no name; the first Error(0) while the reader is
    # pending accepts it; then the ATR.
    send_msg(s, INIT, init_payload())
    typ, rid, p = recv_msg(s)
    if typ != INIT or p[:4] != MAGIC:
        log("bad host init", typ, p.hex())
        return 2
    log("host init version", struct.unpack(">I", p[4:8])[0], "reader_id", hex(rid))
    send_msg(s, READER_REMOVE)
    send_msg(s, READER_ADD)  # empty name, as vscclient sends it
    typ, rid, p = recv_msg(s)
    if typ != ERROR:
        log("no error(0) for the reader, got type", typ)
        return 2
    log("reader accepted code", struct.unpack(">I", p)[0], "reader_id", rid)
    send_msg(s, ATR, atr)
    apdus = errors = maxlen = 0
    while True:
        try:
            typ, rid, p = recv_msg(s)
        except EOFError:
            log("host closed; apdus", apdus, "errors-sent", errors, "max-apdu", maxlen)
            return 0
        if len(p) > BUF:
            log("OVERFLOW: host sent type", typ, "with", len(p), "bytes; vscclient's buffer is", BUF)
            return 3
        if typ == APDU:
            maxlen = max(maxlen, len(p))
            if err_apdu and p == err_apdu:
                # vscclient sends the VReaderStatus without htonl; 2 is
                # VREADER_OUT_OF_MEMORY, a failure with the card still in.
                send_msg(s, ERROR, struct.pack("<I", 2))
                errors += 1
                log("answered", p.hex(), "with host-order error 2")
                continue
            r = card_apdu(card, p)
            if r is None:
                send_msg(s, ERROR, struct.pack("<I", 2))
                errors += 1
                continue
            send_msg(s, APDU, r)
            apdus += 1
            if apdus % 50 == 0:
                log("apdus", apdus, "max-apdu", maxlen)
        elif typ == ERROR:
            log("host error code", p.hex())
        elif typ == FLUSH:
            send_msg(s, FLUSH_COMPLETE)
        else:
            # vscclient stops reading on an unexpected type.
            log("unexpected type", typ)
            return 4


if __name__ == "__main__":
    sys.exit(main())
