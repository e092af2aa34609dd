# Guest side of TestGuestNSS (issue 4 acceptance): the same checks for two
# NSS databases that vscclient serves one after the other, first the one
# with an empty password (any PIN), then the one with a password (the PIN);
# then a signature with the second one served by vscard connect --nss.
# Helpers from /vscard/lib.sh; steps are "@@BEGIN NAME" ... "@@END NAME
# STATUS" for the host's subtests.
. /vscard/lib.sh
COOLKEY=/usr/lib/pkcs11/libcoolkeypk11.so
state() { # NAME absent|present: wait until pcscd reports the card state
  echo "@@BEGIN $1"
  if [ "$2" = absent ]; then poll 30 no_card; else poll 60 has_card; fi
  s=$?
  opensc-tool --list-readers 2>&1
  echo "@@END $1 $s"
  [ $s = 0 ] || failed="$failed $1"
}
# sign R PIN: data (emitted) signed with the ID key, PIN = database
# password; the host verifies it with certutil's id-cert.
sign() {
  r=$1 pin=$2
  emit $r-data /tmp/$r.data
  poll 30 p11 --login --pin "$pin" --sign --id 0001 -m SHA256-RSA-PKCS -i /tmp/$r.data -o /tmp/$r.sig
  s=$?
  echo "@@BEGIN $r-sig"; [ $s = 0 ] && base64 </tmp/$r.sig; echo "@@END $r-sig $s"
  [ $s = 0 ] || failed="$failed $r-sig"
}
# round R PIN: one database served as a card.
round() {
  r=$1 pin=$2
  state $r-present present
  # OpenSC lists the three certificates.
  step $r-certs p11 -O --type cert
  # A signature with the ID key, PIN = database password, verified on the
  # host with certutil's id-cert.
  head -c 100 /dev/urandom >/tmp/$r.data
  if [ "$r" = password ]; then
    # Only the database password unlocks the keys.
    step $r-wrong-pin sh -c "! pkcs11-tool --module $OPENSC --login --pin 99999999 --sign --id 0001 -m SHA256-RSA-PKCS -i /tmp/$r.data -o /tmp/$r.bad"
  fi
  sign $r "$pin"
  # CoolKey through NSS: certutil -L -h all with the PIN from a file.
  printf '%s\n' "$pin" >/tmp/$r.pin
  mkdir -p /tmp/$r.nssdb
  certutil -N -d sql:/tmp/$r.nssdb --empty-password >/dev/null 2>&1
  step $r-modutil modutil -dbdir sql:/tmp/$r.nssdb -add coolkey -libfile $COOLKEY -force
  step $r-coolkey certutil -d sql:/tmp/$r.nssdb -L -h all -f /tmp/$r.pin
}

host_wait serve-empty
round empty "$(cat /vscard/any-pin)"
host_wait stop-empty
state empty-gone absent
host_wait serve-password
round password "$(cat /vscard/db-password)"
# The same database through vscard connect --nss ... --certs ...
host_wait stop-password
state password-gone absent
host_wait serve-connect
state connect-present present
head -c 100 /dev/urandom >/tmp/connect.data
sign connect "$(cat /vscard/db-password)"
mark steps-done
if [ -n "$failed" ]; then
  echo "failed steps:$failed; guest pcscd log tail:"
  tail -n 60 /tmp/pcscd.log
  exit 1
fi
