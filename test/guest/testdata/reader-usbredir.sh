# Guest side of TestGuestReaderUSBRedir: QEMU has only qemu-xhci and
# usb-redir (no usb-ccid); the USB device is `vscard reader`'s own CCID
# reader with three slots: 0 an RSA-2048 card, 1 an RSA-3072 card, 2 a
# --vscard-listen slot that the host fills with `vscard connect` and then
# with a vscclient mimic. /init has waited for 08e6:4433 and started pcscd.
. /vscard/reader-lib.sh

# Stock libccid drives the reader: pcscd lists one reader per CCID slot.
echo "@@BEGIN readers"
poll 30 readers_ge 3
s=$?
poll 15 card_in 1
opensc-tool --list-readers 2>&1
grep -H . /sys/bus/usb/devices/*/idVendor /sys/bus/usb/devices/*/idProduct /sys/bus/usb/devices/*/product 2>/dev/null
echo "@@END readers $s"
[ $s = 0 ] || failed="$failed readers"
state card-0 0 present
step list p11 -L
step test p11 --slot "$(slot_of 0)" --login --pin "$PIN" --test

# Two cards, two signatures, two certificates: the host checks each
# signature with the certificate of the card it expects in that slot.
head -c 100 /dev/urandom >/tmp/data
emit data /tmp/data
signed sig-0 0
cert cert-0 0
signed sig-1 1
cert cert-1 1
# The RSA-3072 signature again, in one extended APDU (Le 65536) whose
# answer is 386 bytes: more than QEMU usb-ccid's 374-byte cap. OpenSC's
# CAC driver never sends extended APDUs, so the host's block goes through
# vscard's own pure-Go PC/SC client (`vscard apdu`, static, no libpcsclite).
echo "@@BEGIN ext-sign"
/vscard/vscard apdu --reader 1 --no-follow --json $(cat /vscard/ext-apdus) 2>/tmp/ext.err
s=$?
echo "@@END ext-sign $s"
[ $s = 0 ] || { failed="$failed ext-sign"; cat /tmp/ext.err; }

# remove/insert of slot 0 through the control socket; slot 1 stays.
host_wait remove
state removed 0 absent
step other-slot-stays card_in 1
host_wait insert
state inserted 0 present
signed sig-inserted 0

# Slot 2: `vscard connect` into the reader's VSCard host socket.
host_wait vscard-connect
state vc-present 2 present
signed sig-vc 2
host_wait vscard-quit
state vc-removed 2 absent

# Slot 2 again: the Python client that mimics vscclient. Then one APDU is
# answered with vscclient's host-order VSC_Error (VReaderStatus 2, out of
# memory: the card is still there): the guest sees that command fail, and
# the card should stay in the slot, as it does behind QEMU's passthru.
host_wait mimic
state mimic-present 2 present
signed sig-mimic 2
echo "@@BEGIN mimic-error"
opensc-tool -r 2 -c default -s 80EE000000 2>&1
echo "status=$?"
echo "@@END mimic-error 0"
echo "@@BEGIN mimic-after-error"
sleep 1
card_in 2
s=$?
opensc-tool --list-readers 2>&1
echo "@@END mimic-after-error $s"
[ $s = 0 ] || failed="$failed mimic-after-error"
signed sig-mimic-after-error 2

# SIGKILL and restart `vscard reader` (reader-lib.sh).
reader_restarted kill
state restarted 0 present
signed sig-restarted 0
finish_steps
