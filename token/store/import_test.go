package store

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vscard/vscard/token"
)

func readTestdata(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestImport(t *testing.T) {
	type want struct {
		cn  string
		key string
		raw bool // implements token.RawRSA
	}
	for _, tc := range []struct {
		name     string
		certs    []string
		keys     []string
		ca       string
		want     []want
		warnings int
	}{
		{
			name:  "PKCS#1 and PKCS#8, keys in other order",
			certs: []string{"rsa-pkcs1.crt", "rsa-pkcs8.crt"},
			keys:  []string{"rsa-pkcs8.key", "rsa-pkcs1.key"},
			want:  []want{{"Alice Import", "RSA-1024", true}, {"Alice Import (signing)", "RSA-1024", true}},
		},
		{
			name:  "order of certs is kept",
			certs: []string{"rsa-pkcs8.crt", "rsa-pkcs1.crt"},
			keys:  []string{"rsa-pkcs1.key", "rsa-pkcs8.key"},
			want:  []want{{"Alice Import (signing)", "RSA-1024", true}, {"Alice Import", "RSA-1024", true}},
		},
		{
			name:  "combined PEM as cert and key",
			certs: []string{"combined.pem"},
			keys:  []string{"combined.pem"},
			ca:    "ca.crt",
			want:  []want{{"Alice Import", "RSA-1024", true}},
		},
		{
			name:  "DER CA",
			certs: []string{"rsa-pkcs1.crt"},
			keys:  []string{"rsa-pkcs1.key"},
			ca:    "ca.der",
			want:  []want{{"Alice Import", "RSA-1024", true}},
		},
		{
			name:     "SEC1 EC key with EC PARAMETERS block",
			certs:    []string{"rsa-pkcs1.crt", "ec-sec1.crt"},
			keys:     []string{"ec-sec1.key", "rsa-pkcs1.key"},
			want:     []want{{"Alice Import", "RSA-1024", true}, {"Alice EC", "ECDSA P-256", false}},
			warnings: 1,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := ImportOptions{PIN: "4321", iterations: minIterations}
			for _, f := range tc.certs {
				opts.Certs = append(opts.Certs, readTestdata(t, f))
			}
			for _, f := range tc.keys {
				opts.Keys = append(opts.Keys, readTestdata(t, f))
			}
			if tc.ca != "" {
				opts.CA = readTestdata(t, tc.ca)
			}
			dir := filepath.Join(t.TempDir(), "card")
			if _, err := Import(dir, opts); err != nil {
				t.Fatal(err)
			}
			c, err := Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			creds := c.Credentials()
			if len(creds) != len(tc.want) {
				t.Fatalf("%d credentials, want %d", len(creds), len(tc.want))
			}
			for i, w := range tc.want {
				cr := creds[i]
				if cr.Cert.Subject.CommonName != w.cn || KeyDescription(cr.Key.Public()) != w.key {
					t.Errorf("credential %d: %q %s, want %q %s", i, cr.Cert.Subject.CommonName, KeyDescription(cr.Key.Public()), w.cn, w.key)
				}
				if _, ok := cr.Key.(token.RawRSA); ok != w.raw {
					t.Errorf("credential %d: RawRSA = %v", i, ok)
				}
				if !matches(cr.Cert, cr.Key) {
					t.Errorf("credential %d: key does not match", i)
				}
			}
			if c.Info().CN != tc.want[0].cn {
				t.Errorf("CN = %q", c.Info().CN)
			}
			if (tc.ca != "") != (c.CA() != nil) {
				t.Errorf("CA = %v", c.CA())
			}
			if tc.ca != "" && c.CA().Subject.CommonName != "Import Test CA" {
				t.Errorf("CA subject %s", c.CA().Subject)
			}
			if got := len(c.Warnings()); got != tc.warnings {
				t.Errorf("warnings %q, want %d", c.Warnings(), tc.warnings)
			}
			if _, err := c.PIN().Verify([]byte("4321")); err != nil {
				t.Errorf("Verify: %v", err)
			}
			// Keys are re-encoded as PKCS#8 0600 files.
			fi, err := os.Stat(filepath.Join(dir, "cert1-key.pem"))
			if err != nil || fi.Mode().Perm() != 0o600 {
				t.Errorf("cert1-key.pem: %v %v", fi, err)
			}
		})
	}
}

func TestImportErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		certs []string
		keys  []string
		ca    string
		pin   string
		want  string
	}{
		{"no certs", nil, []string{"rsa-pkcs1.key"}, "", "1234", "no certificates"},
		{"key file as cert", []string{"rsa-pkcs1.key"}, []string{"rsa-pkcs1.key"}, "", "1234", "no certificates"},
		{"cert without key", []string{"rsa-pkcs1.crt", "rsa-pkcs8.crt"}, []string{"rsa-pkcs1.key"}, "", "1234", "certificate 2 (CN=Alice Import (signing)): no private key matches"},
		{"unused key", []string{"rsa-pkcs1.crt"}, []string{"rsa-pkcs1.key", "ec-sec1.key"}, "", "1234", "key 2 (ECDSA P-256) matches none"},
		{"encrypted key", []string{"rsa-pkcs8.crt"}, []string{"encrypted.key"}, "", "1234", "encrypted"},
		{"bad PIN", []string{"rsa-pkcs1.crt"}, []string{"rsa-pkcs1.key"}, "", "12", "PIN must be"},
		{"CA holds two", []string{"rsa-pkcs1.crt"}, []string{"rsa-pkcs1.key"}, "combined2", "1234", "CA input holds 2"},
		{"CA not a cert", []string{"rsa-pkcs1.crt"}, []string{"rsa-pkcs1.key"}, "rsa-pkcs1.key", "1234", "CA input holds 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := ImportOptions{PIN: tc.pin, iterations: minIterations}
			for _, f := range tc.certs {
				opts.Certs = append(opts.Certs, readTestdata(t, f))
			}
			for _, f := range tc.keys {
				opts.Keys = append(opts.Keys, readTestdata(t, f))
			}
			switch tc.ca {
			case "":
			case "combined2":
				opts.CA = append(readTestdata(t, "ca.crt"), readTestdata(t, "rsa-pkcs1.crt")...)
			default:
				opts.CA = readTestdata(t, tc.ca)
			}
			dir := filepath.Join(t.TempDir(), "card")
			_, err := Import(dir, opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Import = %v, want %q", err, tc.want)
			}
			if _, err := os.Stat(dir); err == nil {
				t.Error("failed Import left a card directory")
			}
		})
	}
}

func TestParseCertPEMOrder(t *testing.T) {
	b := append(readTestdata(t, "ca.crt"), readTestdata(t, "combined.pem")...)
	certs, err := parseCertPEM(b)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range certs {
		names = append(names, c.Subject.CommonName)
	}
	if strings.Join(names, "|") != "Import Test CA|Alice Import" {
		t.Errorf("order %v", names)
	}
}
