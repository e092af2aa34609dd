# Guest side of TestGuestReaderBench's usb-ccid half: QEMU's own usb-ccid
# with ccid-card-passthru, fed by `vscard connect`, timed with the same
# APDU loop as the usbredir path (reader-usbredir.sh).
. /vscard/reader-lib.sh
state card-0 0 present
bench bench-ccid 0
finish_steps
