"""One guest TCP connection to the host's loopback, for QEMU's guestfwd.

QEMU (libslirp) runs this once per connection the guest opens to the
guestfwd address (guestfwd=tcp:ADDR:PORT-cmd:...), with that connection as
stdin and stdout. It connects to HOST:PORT (always 127.0.0.1 in the tests)
and copies bytes both ways until either side closes, so a guest can connect
as often as it likes: a chardev guestfwd connects once, when QEMU starts.

Usage: guestfwd_relay.py HOST PORT
"""
import os
import socket
import sys
import threading


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def guest_to_host():
        while True:
            b = os.read(0, 65536)
            if not b:
                break
            s.sendall(b)
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=guest_to_host, daemon=True).start()
    while True:
        b = s.recv(65536)
        if not b:
            break
        view = memoryview(b)
        while view:
            n = os.write(1, view)
            view = view[n:]


if __name__ == "__main__":
    try:
        main()
    except (OSError, KeyboardInterrupt):
        pass
