# /vscard/lib.sh: helpers for guest scripts, shipped with every boot by
# test/guest (Start). Lines starting with @@ are for the host; the protocol
# is described in the package comment (doc.go).

# mark LABEL: a milestone with the guest's uptime.
mark() { echo "@@T $(cut -d' ' -f1 /proc/uptime) $*"; }
# ms: milliseconds since boot.
ms() { awk '{printf "%d\n", $1 * 1000}' /proc/uptime; }
# host_wait NAME: ask the host to act, block until it answers "@@GO NAME".
host_wait() {
  echo "@@WAIT $1"
  while read -r line; do
    case $line in "@@GO $1"*) return 0 ;; esac
  done </dev/console
  return 1
}
# emit NAME FILE: send a file to the host, base64 between markers.
emit() {
  echo "@@BEGIN $1"
  base64 <"$2"
  echo "@@END $1 $?"
}
# poll SECS CMD...: run CMD every 0.1 s until it succeeds, for at most SECS
# seconds. Time, not tries: under TCG one opensc-tool run takes 0.5 s.
poll() {
  _end=$(($(ms) + $1 * 1000)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(ms)" -lt $_end ] || return 1
    sleep 0.1
  done
}
# Reader and card state as the guest's pcscd reports it, through OpenSC.
has_reader() { opensc-tool --list-readers 2>/dev/null | grep -q 'QEMU\|CCID'; }
has_card() { opensc-tool --atr >/dev/null 2>&1; }
no_card() { ! opensc-tool --atr >/dev/null 2>&1; }
# OpenSC's PKCS#11 module in the image, and pkcs11-tool on it.
OPENSC=/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so
p11() { pkcs11-tool --module $OPENSC "$@"; }
# step NAME CMD...: run CMD as a step the host reads ("@@BEGIN NAME" ...
# "@@END NAME STATUS"); failed collects the names of failed steps.
failed=
step() { # NAME CMD...: run CMD, report its output and status
  n=$1; shift
  echo "@@BEGIN $n"
  "$@" 2>&1
  s=$?
  echo "@@END $n $s"
  [ $s = 0 ] || failed="$failed $n"
  return $s
}
