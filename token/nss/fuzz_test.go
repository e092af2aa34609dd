package nss

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
)

// FuzzPBE feeds arbitrary EncryptedData DER to the PBE decoder (PBES2 and
// legacy 3DES) with a fixed password and global salt: it must never
// panic, and a success must return less than the ciphertext.
func FuzzPBE(f *testing.F) {
	db, err := Open(testDB, nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(db.check)
	salt := db.salt
	var a123 []byte
	if err := db.keyDB.QueryRow("SELECT a123 FROM nssPrivate LIMIT 1").Scan(&a123); err != nil {
		f.Fatal(err)
	}
	f.Add(a123)
	db.Close()
	if b, err := os.ReadFile(filepath.Join("testdata", "legacy3des.txt")); err == nil {
		for _, line := range bytes.Split(b, []byte("\n")) {
			if v, ok := bytes.CutPrefix(line, []byte("blob ")); ok {
				blob, _ := hex.DecodeString(string(v))
				f.Add(blob)
			}
		}
	}
	f.Fuzz(func(t *testing.T, der []byte) {
		// A low iteration cap keeps the fuzzer fast; the cap itself is
		// checked before any PBKDF2 work.
		pt, err := decryptPBE(der, salt, nil, 64)
		if err == nil && len(pt) >= len(der) {
			t.Fatalf("plaintext of %d bytes from %d bytes of input", len(pt), len(der))
		}
		pt, err = decryptPBE(der, salt, []byte("pw"), 64)
		if err == nil && len(pt) >= len(der) {
			t.Fatalf("plaintext of %d bytes from %d bytes of input", len(pt), len(der))
		}
	})
}

// FuzzAttribute feeds arbitrary stored attribute values to the attribute
// decoders: the A5 00 5A empty marker, CK_ULONG and CKA_EC_PARAMS.
func FuzzAttribute(f *testing.F) {
	for _, s := range []string{"", "a5005a", "00000003", "ce534353", "06082a8648ce3d030107", "06052b81040022", "0000000001", "a5005a00"} {
		b, _ := hex.DecodeString(s)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		marker := bytes.Equal(in, []byte{0xA5, 0x00, 0x5A})
		v, ok := attrValue(in)
		if ok == marker || (ok && !bytes.Equal(v, in)) {
			t.Fatalf("attrValue(%x) = %x, %v", in, v, ok)
		}
		if sv, sok := attrValue(string(in)); sok != ok || !bytes.Equal(sv, v) {
			t.Fatalf("attrValue(string %x) = %x, %v; []byte gave %x, %v", in, sv, sok, v, ok)
		}
		u, uok, err := attrULONG(in)
		switch {
		case marker:
			if uok || err != nil {
				t.Fatalf("attrULONG(marker) = %v, %v", uok, err)
			}
		case len(in) == 4:
			if !uok || err != nil || u != binary.BigEndian.Uint32(in) {
				t.Fatalf("attrULONG(%x) = %#x, %v, %v", in, u, uok, err)
			}
		default:
			if uok || err == nil {
				t.Fatalf("attrULONG(%x) accepted %d bytes", in, len(in))
			}
		}
		if c, err := curveOf(in); err == nil && c == nil {
			t.Fatal("curveOf returned no curve and no error")
		}
	})
}
