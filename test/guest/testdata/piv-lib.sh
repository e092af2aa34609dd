# /vscard/piv-lib.sh: helpers of the PIV guest scripts (piv_test.go,
# issue 7): OpenSC's PIV driver in the guest signs with key 9A, which it
# exposes as PKCS#11 id 01. Built on /vscard/lib.sh (mark, host_wait,
# emit, poll, ms). The host ships /vscard/pin, /vscard/piv-data (the
# message) and /vscard/piv-digest (its SHA-256, signed as is by ECDSA:
# the image has no openssl to hash with).
. /vscard/lib.sh
PIN=$(cat /vscard/pin)
# piv_sign rsa|ec OUT [pkcs11-tool slot options]: one signature with 9A.
# RSA: OpenSC pads (PKCS#1 v1.5, SHA-256) and the card does the raw
# operation. EC: raw ECDSA over the host's digest; pkcs11-tool writes r||s.
piv_sign() {
  _kind=$1 _out=$2; shift 2
  if [ "$_kind" = rsa ]; then
    p11 "$@" --login --pin "$PIN" --sign --id 01 -m SHA256-RSA-PKCS -i /vscard/piv-data -o "$_out"
  else
    p11 "$@" --login --pin "$PIN" --sign --id 01 -m ECDSA -i /vscard/piv-digest -o "$_out"
  fi
}
# signed NAME rsa|ec [slot options]: sign (retrying for 30 s while the card
# comes up or changes) and send the signature as step NAME, with the time
# the successful pkcs11-tool run took and the attempts made; then the 9A certificate as OpenSC
# reads it, as step NAME-cert. The host verifies one with the other and
# checks the certificate is the card's. On failure the step shows the last
# attempt's output and its APDUs from pcscd's log.
signed() {
  _n=$1 _kind=$2; shift 2
  _end=$(($(ms) + 30000))
  _s=1 _tries=0
  while :; do
    _tries=$((_tries + 1))
    _from=$(($(wc -l </tmp/pcscd.log) + 1))
    _t0=$(ms)
    if piv_sign "$_kind" /tmp/$_n.sig "$@" >/tmp/$_n.out 2>&1 && [ -s /tmp/$_n.sig ]; then _s=0; break; fi
    [ "$(ms)" -lt $_end ] || break
    sleep 0.5
  done
  _t1=$(ms)
  echo "@@BEGIN $_n"
  if [ $_s = 0 ]; then
    echo "sign_ms=$((_t1 - _t0)) attempts=$_tries"
    base64 </tmp/$_n.sig
  else
    cat /tmp/$_n.out
    echo "APDUs of the last attempt (guest pcscd):"
    tail -n +$_from /tmp/pcscd.log | grep -E ' (APDU|SW): ' | cut -c1-200 | tail -n 40
  fi
  echo "@@END $_n $_s"
  [ $_s = 0 ] || { failed="$failed $_n"; return 1; }
  echo "@@BEGIN $_n-cert"
  p11 "$@" --read-object --type cert --id 01 -o /tmp/$_n.der >/tmp/$_n.out 2>&1 && base64 </tmp/$_n.der
  _s=$?
  [ $_s = 0 ] || cat /tmp/$_n.out
  echo "@@END $_n-cert $_s"
  [ $_s = 0 ] || failed="$failed $_n-cert"
  mark "$_n-done"
}
# piv_finish: report failed steps with the pcscd log tail, for the console.
piv_finish() {
  mark piv-steps-done
  if [ -n "$failed" ]; then
    echo "failed steps:$failed; guest pcscd log tail:"
    tail -n 80 /tmp/pcscd.log
    exit 1
  fi
  exit 0
}
