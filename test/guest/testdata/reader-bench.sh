# Guest side of TestGuestReaderBench: one boot with both readers at once,
# QEMU's usb-ccid (+ ccid-card-passthru, fed by `vscard connect`) and
# usb-redir (fed by `vscard reader --usbredir`), both on the one xHCI
# controller, timed with the same APDU loop in interleaved rounds so that
# whatever slows the TCG guest down hits both paths alike.
. /vscard/reader-lib.sh
ROUNDS=$(cat /vscard/rounds)
PER=$(cat /vscard/per-round)

# Both 08e6:4433 devices: usb-ccid is there from boot, usb-redir comes when
# vscard reader has dialled QEMU. /init started pcscd at the first one and
# the guest has no udevd to tell pcscd of the second: start it again.
n08e6() { grep -ls '^08e6$' /sys/bus/usb/devices/*/idVendor 2>/dev/null | wc -l; }
two_devices() { [ "$(n08e6)" -ge 2 ]; }
echo "@@BEGIN devices"
poll 60 two_devices
s=$?
grep -H . /sys/bus/usb/devices/*/product 2>/dev/null
echo "@@END devices $s"
[ $s = 0 ] || { failed="$failed devices"; finish_steps; }
kill "$(pidof pcscd)" 2>/dev/null
poll 10 sh -c '! pidof pcscd'
pcscd --foreground --debug --apdu >>/tmp/pcscd.log 2>&1 &

# Which pcscd reader is which: libccid names both after the same VID:PID.
# Only vscard reader has a card yet (no VSCard client is on QEMU's
# passthru chardev), so the reader with a card is the usbredir one.
REDIR=; CCID=
which_redir() {
  card_in 0 && ! card_in 1 && { REDIR=0; CCID=1; return 0; }
  card_in 1 && ! card_in 0 && { REDIR=1; CCID=0; return 0; }
  return 1
}
echo "@@BEGIN readers"
poll 30 readers_ge 2 && poll 30 which_redir
s=$?
opensc-tool --list-readers 2>&1
echo "redir=$REDIR ccid=$CCID"
echo "@@END readers $s"
[ $s = 0 ] || { failed="$failed readers"; finish_steps; }

host_wait vscard-connect
state ccid-present "$CCID" present

# Rounds alternate which path goes first (ABBA), so a slow spell of the
# host lands on both paths' samples alike.
echo "@@BEGIN bench"
s=0
i=0
while [ $i -lt "$ROUNDS" ]; do
  if [ $((i % 2)) = 0 ]; then
    bench_rtt redir "$REDIR" "$PER" || s=1
    bench_rtt ccid "$CCID" "$PER" || s=1
  else
    bench_rtt ccid "$CCID" "$PER" || s=1
    bench_rtt redir "$REDIR" "$PER" || s=1
  fi
  echo "round=$i"
  i=$((i + 1))
done
echo "@@END bench $s"
[ $s = 0 ] || failed="$failed bench"
# The last APDUs as pcscd and libccid logged them (deltas in µs): where
# the time of each path goes, for whoever reads the test log.
echo "@@BEGIN pcscd-tail"
last_apdu() {
  awk '/APDU: 00 A4 04 00 06 F0 01 02 03 04 05/ { buf = ""; on = 1 }
    on { buf = buf $0 "\n" } on && $2 == "SW:" { last = buf; on = 0 }
    END { printf "%s", last }' /tmp/pcscd.log
}
bench_rtt redir "$REDIR" 2 >/dev/null; last_apdu
bench_rtt ccid "$CCID" 2 >/dev/null; last_apdu
echo "@@END pcscd-tail 0"
finish_steps
