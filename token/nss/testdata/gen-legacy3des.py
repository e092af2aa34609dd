#!/usr/bin/env python3
# Generates legacy3des.txt: a pbeWithSha1AndTripleDES-CBC EncryptedData blob
# as NSS's legacy key database writes it (shared reference peers.md §6.2,
# the firepwd decryptMoz3DES derivation), made independently of the Go code:
# the key and IV come from Python's hashlib/hmac, the encryption from
# `openssl enc -des-ede3-cbc`, the DER is assembled by hand below.
# Run from this directory: python3 gen-legacy3des.py > legacy3des.txt
import hashlib, hmac, subprocess

global_salt = bytes.fromhex("7d06febe6fb63ba842df77efb71d92e8c5c7bf7d")
password = b"legacy pw"
entry_salt = bytes.fromhex("0123456789abcdef0123456789abcdef01234567")
plaintext = b"password-check"

hp = hashlib.sha1(global_salt + password).digest()
pes = entry_salt + b"\x00" * (20 - len(entry_salt))
chp = hashlib.sha1(hp + entry_salt).digest()
k1 = hmac.new(chp, pes + entry_salt, hashlib.sha1).digest()
tk = hmac.new(chp, pes, hashlib.sha1).digest()
k2 = hmac.new(chp, tk + entry_salt, hashlib.sha1).digest()
k = k1 + k2
key, iv = k[:24], k[-8:]
ct = subprocess.run(["openssl", "enc", "-des-ede3-cbc", "-K", key.hex(), "-iv", iv.hex()],
                    input=plaintext, capture_output=True, check=True).stdout

def tlv(tag, body):
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(b)]) + b + body

oid = bytes.fromhex("2a864886f70d010c050103")  # 1.2.840.113549.1.12.5.1.3
params = tlv(0x30, tlv(0x04, entry_salt) + tlv(0x02, b"\x01"))
blob = tlv(0x30, tlv(0x30, tlv(0x06, oid) + params) + tlv(0x04, ct))
print("# pbeWithSha1AndTripleDES-CBC vector made by gen-legacy3des.py (hashlib/hmac + openssl)")
print("globalsalt", global_salt.hex())
print("password", password.hex())
print("plaintext", plaintext.hex())
print("blob", blob.hex())
