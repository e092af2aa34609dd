# Guest side of TestGuestCard (issue 3 acceptance and the harness's own
# smoke check: the reader without a card). Sourced helpers:
# /vscard/lib.sh (mark, host_wait, emit, poll, has_card, no_card).
# Every check is a step "@@BEGIN NAME" ... "@@END NAME STATUS" that the
# host's subtests read; @@WAIT lines hand control to the host.
. /vscard/lib.sh
PIN=$(cat /vscard/pin)
printf '%s\n' "$PIN" >/tmp/pinfile
COOLKEY=/usr/lib/pkcs11/libcoolkeypk11.so
# state NAME absent|present: wait until pcscd reports the card state.
state() {
  echo "@@BEGIN $1"
  if [ "$2" = absent ]; then poll 30 no_card; else poll 30 has_card; fi
  s=$?
  opensc-tool --list-readers 2>&1
  echo "@@END $1 $s"
  [ $s = 0 ] || failed="$failed $1"
}
sign() { p11 --login --pin "$PIN" --sign --id 0001 -m SHA256-RSA-PKCS -i /tmp/data -o "$1"; }
# signed NAME: sign /tmp/data (retrying while the card comes back) and
# send the signature to the host, which verifies it.
signed() {
  poll 30 sign /tmp/$1.sig
  s=$?
  echo "@@BEGIN $1"
  [ $s = 0 ] && base64 </tmp/$1.sig
  echo "@@END $1 $s"
  [ $s = 0 ] || failed="$failed $1"
}

# Before any card client connects, QEMU's reader is there and empty.
echo "@@BEGIN no-card"
poll 30 has_reader
s=$?
opensc-tool --list-readers 2>&1
has_card && s=1
echo "@@END no-card $s"
[ $s = 0 ] || failed="$failed no-card"
host_wait connect-card
state card-present present
step readers opensc-tool --list-readers
step list p11 -L
step test p11 --login --pin "$PIN" --test

# A signature made here, verified on the host with the card's certificate.
head -c 100 /dev/urandom >/tmp/data
emit data /tmp/data
signed sig

# CoolKey through NSS: the three certificates, PIN from a file.
mkdir -p /tmp/nssdb
certutil -N -d sql:/tmp/nssdb --empty-password >/dev/null 2>&1
export COOL_KEY_LOG_FILE=/tmp/coolkey.log
step modutil modutil -dbdir sql:/tmp/nssdb -add coolkey -libfile $COOLKEY -force
step certutil certutil -d sql:/tmp/nssdb -L -h all -f /tmp/pinfile
# The ID certificate as NSS reads it through CoolKey, for the host to
# compare with the card's (certutil logs in to find it by name).
nick=$(certutil -d sql:/tmp/nssdb -L -h all -f /tmp/pinfile 2>/dev/null | sed -n 's/^\(.*:CAC ID Certificate\)  *[a-zA-Z]*,[a-zA-Z]*,[a-zA-Z]* *$/\1/p')
step coolkey-idcert certutil -d sql:/tmp/nssdb -L -h "${nick%%:*}" -f /tmp/pinfile -n "$nick" -a
step coolkey-log tail -n 25 /tmp/coolkey.log
unset COOL_KEY_LOG_FILE

# Speed: 20 pkcs11-tool --sign calls, each a whole PKCS#11 session.
t0=$(ms); i=0
while [ $i -lt 20 ] && sign /tmp/s20.sig >/dev/null 2>&1; do i=$((i + 1)); done
t1=$(ms)
echo "@@BEGIN sign20"; echo "calls=$i ms=$((t1 - t0))"; echo "@@END sign20 $([ $i = 20 ]; echo $?)"

# Lifecycle through the control socket.
host_wait remove
state removed absent
host_wait insert
state inserted present
step list-inserted p11 -L

# SIGKILL vscard connect; the host starts it again.
host_wait kill
signed sig-after-kill

# A clean quit removes the card; then libcacard-style vscclient serves it.
host_wait quit
state quit-removed absent
host_wait vscclient
signed sig-vscclient

# Back to vscard connect, which stays up while QEMU restarts.
host_wait connect
signed sig-connect
mark steps-done
# On failure, the guest's pcscd log (with APDUs) ends up in the console
# tail the host prints.
if [ -n "$failed" ]; then
  echo "failed steps:$failed; guest pcscd log tail:"
  tail -n 80 /tmp/pcscd.log
  exit 1
fi
