# Guest side of TestGuestReaderUSBRedirListen: QEMU's usb-redir chardev
# dials `vscard reader --listen`; /init has waited for the reader and
# started pcscd.
. /vscard/reader-lib.sh
state card-0 0 present
head -c 100 /dev/urandom >/tmp/data
emit data /tmp/data
signed sig-0 0
finish_steps
