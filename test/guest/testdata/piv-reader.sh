# Guest side of TestGuestPIVReader: only qemu-xhci + usb-redir; the USB
# device is `vscard reader` with two slots, 0 an RSA-2048 PIV card and 1 a
# P-256 PIV card. Stock libccid lists one reader per CCID slot, named
# "... 00 00" and "... 00 01".
. /vscard/piv-lib.sh

# slot_id N: the PKCS#11 slot id of the reader whose name ends in "00 0N"
# (pkcs11-tool -L binds every card, seconds under TCG: listed once).
slots() { p11 -L 2>/dev/null | sed -n 's/^Slot [0-9]* (\(0x[0-9a-fA-F]*\)): .* 00 0\([0-9]\)$/\2 \1/p' >/tmp/slots; }
slot_id() { sed -n "s/^$1 //p" /tmp/slots | head -1; }
two_cards() { [ "$(opensc-tool --list-readers 2>/dev/null | grep -cE '^[0-9]+ +Yes ')" -ge 2 ]; }

echo "@@BEGIN cards-present"
poll 60 two_cards
s=$?
opensc-tool --list-readers 2>&1
# The driver OpenSC picks for each card: its PIV driver, by name.
opensc-tool -r 0 --name 2>&1 || s=1
opensc-tool -r 1 --name 2>&1 || s=1
slots
cat /tmp/slots
[ -n "$(slot_id 0)" ] && [ -n "$(slot_id 1)" ] || s=1
echo "@@END cards-present $s"
[ $s = 0 ] || failed="$failed cards-present"
mark cards-present
signed rsa rsa --slot "$(slot_id 0)"
signed ec ec --slot "$(slot_id 1)"
piv_finish
