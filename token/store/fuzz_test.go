package store

import (
	"encoding/pem"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// FuzzDecodeManifest: any bytes give a manifest that passes every check or
// an error, never a panic, and a manifest that passes names only plain
// files inside the card directory.
func FuzzDecodeManifest(f *testing.F) {
	dir := filepath.Join(f.TempDir(), "c")
	if _, err := Create(dir, fastOpts("1234")); err != nil {
		f.Fatal(err)
	}
	good, err := os.ReadFile(filepath.Join(dir, ManifestFile))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte(`{"version":1}`))
	f.Add([]byte(`{"version":2,"type":"cac"}`))
	f.Add([]byte(`{"version":1,"type":"cac","credentials":[{"label":"a","cert":"../x","key":"k"}]}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeManifest(b)
		if err != nil {
			return
		}
		names := []string{}
		for _, c := range m.Credentials {
			names = append(names, c.Cert, c.Key)
		}
		if m.CA != nil {
			names = append(names, m.CA.Cert)
		}
		for _, n := range names {
			if n == "" || strings.ContainsAny(n, `/\`) || n == ".." || strings.HasPrefix(n, ".") {
				t.Fatalf("accepted file name %q", n)
			}
		}
		if len(m.Credentials) == 0 || len(m.Credentials) > maxCredentials || m.PIN.MaxTries < 1 ||
			m.PIN.Iterations < minIterations || m.PIN.Iterations > maxIterations || len(m.PIN.Hash) != pinHashLen {
			t.Fatalf("accepted out-of-range manifest %+v", m)
		}
	})
}

// FuzzDecodeState: the counter is either rejected or within [0, max].
func FuzzDecodeState(f *testing.F) {
	f.Add([]byte(`{"version":1,"tries_left":3}`), 3)
	f.Add([]byte(`{"version":1,"tries_left":-1}`), 3)
	f.Add([]byte(`{"version":1,"tries_left":3}{}`), 3)
	f.Add([]byte(`{"version":1,"tries_left":3,"x":1}`), 3)
	f.Add([]byte(`{"version":1,"tries_left":1e3}`), 15)
	f.Add([]byte(`{"version":1,"tries_left":3,"pin":{"alg":"pbkdf2-sha256","iterations":1000,"salt":"AAAAAAAAAAAAAAAAAAAAAA==","hash":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","max_tries":3}}`), 0)
	f.Add([]byte(`{"version":1,"tries_left":4,"pin":{"alg":"pbkdf2-sha256","iterations":1000,"salt":"AAAAAAAAAAAAAAAAAAAAAA==","hash":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","max_tries":3}}`), 0)
	f.Fuzz(func(t *testing.T, b []byte, max int) {
		s, err := decodeState(b, max)
		if err != nil {
			return
		}
		if max == 0 {
			// PIV: the file carries its own hash and maximum.
			if s.PIN == nil || checkPINParams(*s.PIN) != nil {
				t.Fatalf("accepted %+v without valid hash parameters", s)
			}
			max = s.PIN.MaxTries
		} else if s.PIN != nil {
			t.Fatalf("accepted %+v with a hash where the manifest holds it", s)
		}
		if s.TriesLeft < 0 || s.TriesLeft > max || s.Version != formatVersion {
			t.Fatalf("accepted %+v with max %d", s, max)
		}
	})
}

// FuzzParsePEM: key and certificate parsing of hostile PEM never panics,
// and every key returned is a usable signer.
func FuzzParsePEM(f *testing.F) {
	for _, n := range []string{"rsa-pkcs1.key", "rsa-pkcs8.key", "ec-sec1.key", "encrypted.key", "combined.pem", "ca.der"} {
		b, err := os.ReadFile(filepath.Join("testdata", n))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("-----BEGIN EC PRIVATE KEY-----\nMAA=\n-----END EC PRIVATE KEY-----\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		keys, err := parseKeyPEM(b)
		if err == nil {
			for _, k := range keys {
				if k.Public() == nil {
					t.Fatal("key without public half")
				}
				_ = KeyDescription(k.Public())
			}
		}
		certs, err := parseCertPEM(b)
		if err == nil {
			for _, c := range certs {
				_ = KeyDescription(c.PublicKey)
			}
		}
	})
}

// FuzzParseKeyDER reaches the DER parsers behind the PEM armour, which
// random PEM text rarely gets through.
func FuzzParseKeyDER(f *testing.F) {
	for _, n := range []string{"rsa-pkcs1.key", "rsa-pkcs8.key", "ec-sec1.key"} {
		b, err := os.ReadFile(filepath.Join("testdata", n))
		if err != nil {
			f.Fatal(err)
		}
		for blk, rest := pem.Decode(b); blk != nil; blk, rest = pem.Decode(rest) {
			f.Add(uint8(slices.Index(keyBlockTypes, blk.Type)), blk.Bytes)
		}
	}
	f.Fuzz(func(t *testing.T, typ uint8, der []byte) {
		blk := &pem.Block{Type: keyBlockTypes[int(typ)%len(keyBlockTypes)], Bytes: der}
		keys, err := parseKeyPEM(pem.EncodeToMemory(blk))
		if err != nil {
			return
		}
		want := 1
		if blk.Type == "EC PARAMETERS" {
			want = 0 // skipped, as openssl ecparam writes it before the key
		}
		if len(keys) != want {
			t.Fatalf("%d keys from one %s block", len(keys), blk.Type)
		}
		if want == 0 {
			return
		}
		if _, err := marshalKeyPEM(keys[0]); err != nil {
			t.Fatalf("accepted key cannot be stored: %v", err)
		}
	})
}

var keyBlockTypes = []string{"RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "EC PARAMETERS"}

// FuzzDecodePIVManifest: a PIV manifest passes every check or is an error,
// and one that passes names only plain files the store does not write
// itself.
func FuzzDecodePIVManifest(f *testing.F) {
	f.Add([]byte(`{"version":1,"type":"piv","cn":"x","id":"00112233445566778899aabbccddeeff","created":"2026-01-01T00:00:00Z","ca":{"cert":"ca.pem","der":"ca.der","key":"ca-key.pem"}}`))
	f.Add([]byte(`{"version":1,"type":"piv","id":"00112233445566778899aabbccddeeff","ca":{"cert":"key-9a.pem"}}`))
	f.Add([]byte(`{"version":1,"type":"cac"}`))
	f.Add([]byte(`{"version":1,"type":"piv","id":"zz"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodePIVManifest(b)
		if err != nil {
			return
		}
		if m.Type != TypePIV || len(m.ID) != 32 {
			t.Fatalf("accepted %+v", m)
		}
		if m.CA != nil {
			for _, n := range []string{m.CA.Cert, m.CA.DER, m.CA.Key} {
				if n == "" && n != m.CA.Cert {
					continue
				}
				if checkFileName(n) != nil || isPIVStoreFile(n) {
					t.Fatalf("accepted CA file name %q", n)
				}
			}
		}
	})
}

// FuzzDecodeMgm: a management key file gives a key of its algorithm's
// length or an error.
func FuzzDecodeMgm(f *testing.F) {
	f.Add([]byte(`{"version":1,"alg":10,"key":"000102030405060708090a0b0c0d0e0f1011121314151617"}`))
	f.Add([]byte(`{"version":1,"alg":3,"key":"0001"}`))
	f.Add([]byte(`{"version":1,"alg":300,"key":""}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		alg, key, err := decodeMgm(b)
		if err != nil {
			return
		}
		if n, ok := MgmKeyLen(alg); !ok || n != len(key) {
			t.Fatalf("accepted alg %02X with a %d-byte key", alg, len(key))
		}
	})
}

// FuzzParseObjFileName: only the names objFileName makes are accepted,
// so each object has exactly one file.
func FuzzParseObjFileName(f *testing.F) {
	for _, s := range []string{"obj-5fc105", "obj-00007e", "obj-5FC105", "obj-000000", "obj-+1234", "key-9a.pem"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		tag, ok := parseObjFileName(name)
		if ok && (tag == 0 || tag > maxTag || objFileName(tag) != name) {
			t.Fatalf("accepted %q as tag %X", name, tag)
		}
	})
}
