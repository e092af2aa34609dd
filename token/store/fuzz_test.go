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
	f.Fuzz(func(t *testing.T, b []byte, max int) {
		s, err := decodeState(b, max)
		if err != nil {
			return
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
