# Guest side of the second boot of TestGuestCard: vscard connect kept
# running while QEMU restarted; the card must be back without help.
. /vscard/lib.sh
PIN=$(cat /vscard/pin)
echo "@@BEGIN reboot-present"; poll 60 has_card; s=$?; opensc-tool --list-readers 2>&1; echo "@@END reboot-present $s"
head -c 100 /dev/urandom >/tmp/data
emit data /tmp/data
poll 30 pkcs11-tool --module /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so --login --pin "$PIN" --sign --id 0001 -m SHA256-RSA-PKCS -i /tmp/data -o /tmp/sig
s=$?
echo "@@BEGIN sig"; [ $s = 0 ] && base64 </tmp/sig; echo "@@END sig $s"
