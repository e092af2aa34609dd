# Guest side of TestGuestPIVConnect: QEMU's usb-ccid + ccid-card-passthru,
# fed by `vscard connect --card PIVDIR` (VSCard). The host serves an
# RSA-2048 PIV card, then replaces it with a P-256 PIV card.
. /vscard/piv-lib.sh

echo "@@BEGIN card-present"
poll 60 has_card
s=$?
opensc-tool --list-readers 2>&1
opensc-tool --name 2>&1
echo "@@END card-present $s"
[ $s = 0 ] || failed="$failed card-present"
mark card-present
signed rsa rsa

# The host quits `vscard connect` and starts it again with the P-256 card.
host_wait swap
signed ec ec
piv_finish
