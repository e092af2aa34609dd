# /vscard/reader-lib.sh: helpers shared by the guest scripts of
# reader_test.go (vscard reader over usbredir and USB/IP, issue 6). Built
# on /vscard/lib.sh (mark, host_wait, emit, poll, ms).
. /vscard/lib.sh
PIN=$(cat /vscard/pin)
# Readers as pcscd lists them ("0    Yes   ...  NAME 00 00"), whatever
# name libccid's Info.plist gives this VID:PID.
nreaders() { opensc-tool --list-readers 2>/dev/null | grep -cE '^[0-9]+ +(Yes|No) '; }
readers_ge() { [ "$(nreaders)" -ge "$1" ]; }
# Card state of reader index N (pcscd's order is the CCID slot order).
card_in() { opensc-tool -r "$1" --atr >/dev/null 2>&1; }
card_out() { ! opensc-tool -r "$1" --atr >/dev/null 2>&1; }
# state NAME READER absent|present: wait until pcscd reports that state.
state() {
  echo "@@BEGIN $1"
  if [ "$3" = absent ]; then poll 30 card_out "$2"; else poll 30 card_in "$2"; fi
  s=$?
  opensc-tool --list-readers 2>&1
  echo "@@END $1 $s"
  [ $s = 0 ] || failed="$failed $1"
}
# slot_of N: the PKCS#11 slot id (for --slot) of the reader whose name
# ends in "00 0N", i.e. CCID slot N.
# Each pkcs11-tool run binds every card (seconds under TCG), so the ids
# are listed once and kept in /tmp/slots; slot_fresh lists them again.
slot_fresh() { p11 -L 2>/dev/null | sed -n 's/^Slot [0-9]* (\(0x[0-9a-fA-F]*\)): .* 00 0\([0-9]\)$/\2 \1/p' >/tmp/slots; }
slot_of() {
  grep -q "^$1 " /tmp/slots 2>/dev/null || slot_fresh
  sed -n "s/^$1 //p" /tmp/slots | head -1
}
sign() { # SLOTID OUT
  p11 --slot "$1" --login --pin "$PIN" --sign --id 0001 -m SHA256-RSA-PKCS -i /tmp/data -o "$2"
}
# signed NAME CCIDSLOT: sign /tmp/data with the ID key of that slot's card
# (retrying while the card comes up) and send the signature to the host,
# which verifies it with that card's certificate.
signed() {
  _slot=
  _end=$(($(ms) + 30000))
  until _slot=$(slot_of "$2"); [ -n "$_slot" ] && sign "$_slot" /tmp/$1.sig >/tmp/$1.out 2>&1; do
    [ "$(ms)" -lt $_end ] || break
    _slot=; rm -f /tmp/slots; sleep 0.2
  done
  s=1; [ -n "$_slot" ] && [ -s /tmp/$1.sig ] && s=0
  echo "@@BEGIN $1"
  if [ $s = 0 ]; then base64 </tmp/$1.sig; else p11 -L 2>&1; cat /tmp/$1.out; fi
  echo "@@END $1 $s"
  [ $s = 0 ] || failed="$failed $1"
}
# cert NAME CCIDSLOT: the ID certificate as OpenSC reads it from the slot.
cert() {
  _slot=$(slot_of "$2")
  echo "@@BEGIN $1"
  p11 --slot "$_slot" --read-object --type cert --id 0001 -o /tmp/$1.der >/tmp/$1.out 2>&1 && base64 </tmp/$1.der
  s=$?
  [ $s = 0 ] || cat /tmp/$1.out
  echo "@@END $1 $s"
  [ $s = 0 ] || failed="$failed $1"
}
# bench_rtt TAG READER N: N SELECTs of an absent AID (answer 6A 82, no
# card state touched) in one opensc-tool run on READER; prints, from
# pcscd's --apdu log (each line starts with the microseconds since the
# previous one), every APDU's round trip through the driver as "TAG
# rtt_us=US": the sum of deltas from its "APDU:" line to its "SW:" line.
# Only pcscd's log is timed, so opensc-tool's own start-up is left out.
BENCH_APDU=00A4040006F00102030405
bench_rtt() {
  _from=$(($(wc -l </tmp/pcscd.log) + 1))
  _args=; _i=0
  while [ $_i -lt "$3" ]; do _args="$_args -s $BENCH_APDU"; _i=$((_i + 1)); done
  opensc-tool -r "$2" -c default $_args >/tmp/bench.out 2>&1
  _s=$?
  tail -n +$_from /tmp/pcscd.log | awk -v tag="$1" '
    $2 == "APDU:" && $0 ~ /APDU: 00 A4 04 00 06 F0 01 02 03 04 05/ { on = 1; sum = 0; next }
    on { sum += $1 + 0; if ($2 == "SW:") { print tag " rtt_us=" sum; on = 0 } }'
  [ $_s = 0 ] || { echo "opensc-tool -r $2 failed ($_s):"; tail -n 5 /tmp/bench.out; }
  return $_s
}
# reader_restarted HOSTSTEP: the host SIGKILLs and restarts `vscard
# reader` at HOSTSTEP; the USB device leaves and comes back with a new
# address. The guest has no udevd, so pcscd (libudev hotplug) and libusb
# never hear of the new device; restart pcscd, as udev would have told it.
devnum() {
  for d in /sys/bus/usb/devices/*; do
    [ "$(cat $d/idVendor 2>/dev/null)" = 08e6 ] && cat $d/devnum
  done
}
reader_restarted() {
  _before=$(devnum)
  host_wait "$1"
  echo "@@BEGIN reader-back"
  came_back() { _d=$(devnum); [ -n "$_d" ] && [ "$_d" != "$_before" ]; }
  poll 60 came_back
  s=$?
  echo "usb device number before=$_before after=$(devnum)"
  echo "@@END reader-back $s"
  [ $s = 0 ] || failed="$failed reader-back"
  pcscd_restart
}
# pcscd_restart: a new pcscd, which finds the reader's device as it is
# now (the guest has no udevd to tell the old one of a new device).
pcscd_restart() {
  kill "$(pidof pcscd)" 2>/dev/null
  poll 10 sh -c '! pidof pcscd'
  pcscd --foreground --debug --apdu >>/tmp/pcscd.log 2>&1 &
  rm -f /tmp/slots # PKCS#11 slot ids change with the new pcscd
}
# finish: report failed steps with the pcscd log tail, for the console.
finish_steps() {
  if [ -n "$failed" ]; then
    echo "failed steps:$failed; guest pcscd log tail:"
    tail -n 80 /tmp/pcscd.log
    exit 1
  fi
  exit 0
}
