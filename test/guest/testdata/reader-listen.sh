# Guest side of TestGuestReaderUSBRedirListen: QEMU's usb-redir chardev
# dials `vscard reader --listen`; /init has waited for the reader and
# started pcscd. Slot 0 is a card directory; slot 1 forwards the card in
# the host's pcscd (--pcsc, the way a physical card travels).
. /vscard/reader-lib.sh
state card-0 0 present
state card-1 1 present
head -c 100 /dev/urandom >/tmp/data
emit data /tmp/data
signed sig-0 0
signed sig-1 1
# SIGKILL and restart the listening reader: QEMU's chardev reconnects by
# itself (reconnect=1), and the --pcsc slot finds the host's card again.
reader_restarted kill
state restarted-0 0 present
state restarted-1 1 present
signed sig-restarted-1 1
finish_steps
