# The NSS database of issue 4, made with the commands of QEMU's smart card
# documentation, run by TestGuestNSS in the database directory ($PWD).
# Only what makes them non-interactive is added: $NEWPW to -N
# (--empty-password or -f FILE), $PW (-f FILE or nothing) and -z $NOISE to
# -S. certutil takes the serial number from the clock in steps of 2^19 µs,
# so commands faster than a typing user would reuse issuer and serial
# (SEC_ERROR_REUSED_ISSUER_AND_SERIAL): hence the sleeps.
set -e
certutil -N -d sql:$PWD $NEWPW
certutil -S -d sql:$PWD -s "CN=Fake Smart Card CA" -x -t TC,TC,TC -n fake-smartcard-ca $PW -z "$NOISE"
sleep 0.6
certutil -S -d sql:$PWD -t ,, -s "CN=John Doe" -n id-cert -c fake-smartcard-ca $PW -z "$NOISE"
sleep 0.6
certutil -S -d sql:$PWD -t ,, -s "CN=John Doe (signing)" --nsCertType smime -n signing-cert -c fake-smartcard-ca $PW -z "$NOISE"
sleep 0.6
certutil -S -d sql:$PWD -t ,, -s "CN=John Doe (encryption)" --nsCertType sslClient -n encryption-cert -c fake-smartcard-ca $PW -z "$NOISE"
