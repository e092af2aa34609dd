# Guest side of TestGuestPassthru (issue 5): the host forwards cards from
# its own pcscd with `vscard connect --pcsc`; this guest's pcscd, libccid
# and OpenSC use them through QEMU's usb-ccid. Sourced helpers:
# /vscard/lib.sh (mark, host_wait, emit, poll, has_card, no_card).
# Every check is a step "@@BEGIN NAME" ... "@@END NAME STATUS" that the
# host's subtests read and judge; @@WAIT lines hand control to the host.
. /vscard/lib.sh
PIN=$(cat /vscard/pin)
step() { # NAME CMD...: run CMD, report its output and status
  n=$1; shift
  echo "@@BEGIN $n"
  "$@" 2>&1
  s=$?
  # A failure carries the guest pcscd's view (with APDUs) in its output.
  [ $s = 0 ] || { echo "--- guest pcscd log tail:"; tail -n 40 /tmp/pcscd.log; }
  echo "@@END $n $s"
  [ $s = 0 ] || failed="$failed $n"
  return $s
}
# check NAME CMD...: a step whose status only the host judges (it knows
# which failures are known gaps), so it does not fail the script.
check() { _saved=$failed; step "$@"; _s=$?; failed=$_saved; return $_s; }
# state NAME absent|present: wait until pcscd reports the card state.
state() {
  echo "@@BEGIN $1"
  if [ "$2" = absent ]; then poll 30 no_card; else poll 30 has_card; fi
  s=$?
  opensc-tool --list-readers 2>&1
  echo "@@END $1 $s"
  [ $s = 0 ] || failed="$failed $1"
}
# apdus FILE...: send the APDUs listed in FILEs (one hex APDU a line) in one
# opensc-tool run. "-c default" forces OpenSC's default driver, so only
# these APDUs reach the card: card detection would first send some fifty
# SELECTs, and vicc dies on some of them (SELECT with FCI, P2=00).
apdus() {
  _files="$*"
  set --
  for _f in $_files; do
    while read -r _a; do [ -n "$_a" ] && set -- "$@" -s "$_a"; done <"$_f"
  done
  opensc-tool -c default "$@"
}
# repeat N CMD...: run CMD N times, stop at the first failure.
repeat() {
  _n=$1; shift; _i=0
  while [ $_i -lt "$_n" ]; do "$@" || return 1; _i=$((_i + 1)); done
}
sign() { p11 --login --pin "$PIN" --sign --id 0001 -m SHA256-RSA-PKCS -i /tmp/data -o "$1"; }
# signed NAME: sign /tmp/data (retrying for up to 30 s while the card comes
# up) and send the signature to the host, which verifies it with the
# card's certificate; a mark says how many tries it took, a failure shows
# pkcs11-tool's last words.
signed() {
  _end=$(($(ms) + 30000)); _n=1; s=1
  while :; do
    if sign /tmp/$1.sig >/tmp/$1.err 2>&1; then s=0; break; fi
    [ "$(ms)" -lt $_end ] || break
    _n=$((_n + 1)); sleep 0.1
  done
  mark "$1 signed after $_n tries"
  echo "@@BEGIN $1"
  if [ $s = 0 ]; then base64 </tmp/$1.sig; else cat /tmp/$1.err; fi
  echo "@@END $1 $s"
  [ $s = 0 ] || failed="$failed $1"
}

# QEMU's reader is there before any card client connects.
echo "@@BEGIN reader"
poll 30 has_reader
s=$?
opensc-tool --list-readers 2>&1
echo "@@END reader $s"

# 1. vicc, forwarded from the host's vpcd slot 0: ATR and a scripted APDU
# list, compared by the host with what it gets from the card directly.
host_wait vicc
state vicc-present present
step vicc-atr opensc-tool --atr
check vicc-apdus apdus /vscard/vicc-apdus

# 4. Hot-plug: the host stops vicc (card pulled), then starts it again.
host_wait vicc-stop
state vicc-removed absent
host_wait vicc-start
state vicc-inserted present
step vicc-atr-again opensc-tool --atr
check vicc-apdus-again apdus /vscard/vicc-apdus

# The host ends that passthrough; then forwards a vscard CAC card (slot 1).
host_wait vicc-quit
state switch-removed absent
host_wait cac
state cac-present present
step cac-atr opensc-tool --atr

# 2. Login and signature with OpenSC through the forwarded CAC card.
step cac-list p11 -L
head -c 100 /dev/urandom >/tmp/data
emit data /tmp/data
signed sig

# 3. Concurrent use: while the host runs its own loop on the same card,
# this guest sends its APDU list several times (one opensc-tool run each).
host_wait concurrent
t0=$(ms)
step concurrent repeat "$(cat /vscard/rounds)" apdus /vscard/guest-apdus
t1=$(ms)
echo "@@BEGIN concurrent-ms"; echo "$((t1 - t0))"; echo "@@END concurrent-ms 0"
host_wait concurrent-done

# 5. The last-PIN-try guard: wrong PINs until the card says 63 C1, then the
# guard answers 69 83 itself. The host checks the card's counter, then a
# right PIN is tried here.
mark pin-guard
step pin-wrong apdus /vscard/pin-wrong
mark pin-wrong-done
host_wait pin-checked
step pin-right apdus /vscard/pin-right
mark pin-right-done
host_wait pin-reset
step pin-right-after-reset apdus /vscard/pin-right
mark pin-reset-done
signed sig-after-guard

mark steps-done
# On failure, the guest's pcscd log (with APDUs) ends up in the console
# tail the host prints.
if [ -n "$failed" ]; then
  echo "failed steps:$failed; guest pcscd log tail:"
  tail -n 80 /tmp/pcscd.log
  exit 1
fi
