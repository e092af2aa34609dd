package cac

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/internal/transcript"
	"github.com/vscard/vscard/token"
)

// loadTestCreds reads libcacard's test database credentials exported to
// testdata/testdb (see testdata/README.md), in card order cert1..cert3.
func loadTestCreds(t testing.TB) []token.Credential {
	t.Helper()
	var creds []token.Credential
	for _, name := range []string{"cert1", "cert2", "cert3"} {
		certPEM, err := os.ReadFile(filepath.Join("testdata", "testdb", name+".pem"))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := pem.Decode(certPEM)
		if b == nil {
			t.Fatalf("%s: no PEM block", name)
		}
		cert, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		keyPEM, err := os.ReadFile(filepath.Join("testdata", "testdb", name+".key.pem"))
		if err != nil {
			t.Fatal(err)
		}
		kb, _ := pem.Decode(keyPEM)
		if kb == nil {
			t.Fatalf("%s: no key PEM block", name)
		}
		k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		creds = append(creds, token.Credential{Label: name, Cert: cert, Key: token.NewRSAKey(k.(*rsa.PrivateKey))})
	}
	return creds
}

// readTranscript parses a transcript of testdata/vectors (the shared
// reference's vectors/README.md format).
func readTranscript(t testing.TB, path string) *transcript.Transcript {
	t.Helper()
	tr, err := transcript.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return tr
}

// TestStrictReplay replays every libcacard transcript made with the test
// database against a strict card and requires identical answers,
// signatures included (raw RSA is deterministic).
func TestStrictReplay(t *testing.T) {
	creds := loadTestCreds(t)
	files := []struct {
		name string
		pin  bool
	}{
		{"s1-softdb-nopin.txt", false},
		{"s2-softdb-nopin.txt", false},
		{"s3-softdb-nopin.txt", false},
		{"s4-softdb-nopin.txt", false},
		{"s5-softdb-nopin.txt", false},
		{"s6-softdb-nopin.txt", false},
		{"s7-softdb-nopin.txt", false},
		{"s9-softdb-nopin.txt", false},
		{"s10-softdb-nopin.txt", false},
		{"s13-softdb-nopin.txt", false},
		{"s14-softdb-nopin.txt", false},
		{"s16-softdb-nopin.txt", false},
		{"s17-aca-getacr.txt", false},
		{"s8-softdb-pin12345678.txt", true},
		{"s18-msft-compat-pin.txt", true},
		{"opensc-cac-T0-reconstructed.txt", true},
		{"opensc-cac-T1-reconstructed.txt", true},
		{"coolkey-cac-reconstructed.txt", true},
	}
	// The softhsm transcripts (s12-*) are not replayed: their keys were
	// generated at random inside softhsm2 and are not available, and
	// their certificates differ from the test database's, so neither the
	// buffers nor the signatures can match. Their status-word structure
	// is covered by TestSoftHSMStructure.
	for _, f := range files {
		t.Run(f.name, func(t *testing.T) {
			var pin *token.MemoryPIN
			if f.pin {
				pin = token.NewMemoryPIN("12345678", 1000)
			}
			c, err := New(token.NewMemory(creds, pin), Options{Strict: true})
			if err != nil {
				t.Fatal(err)
			}
			tr := readTranscript(t, filepath.Join("testdata", "vectors", f.name))
			if !bytes.Equal(c.ATR(), tr.ATR) {
				t.Errorf("ATR = %X, transcript %X", c.ATR(), tr.ATR)
			}
			replay(t, c, tr)
		})
	}
}

func replay(t *testing.T, c *Card, tr *transcript.Transcript) {
	t.Helper()
	ctx := context.Background()
	c.PowerOn()
	n := 0
	for _, s := range tr.Steps {
		if s.Power {
			c.PowerOff()
			c.PowerOn()
			continue
		}
		got, err := c.Transmit(ctx, s.Cmd)
		if err != nil {
			t.Fatalf("line %d: %X: %v", s.Line, s.Cmd, err)
		}
		if !bytes.Equal(got, s.Reply) {
			t.Errorf("line %d: %X\n got %X\nwant %X", s.Line, s.Cmd, got, s.Reply)
		}
		n++
	}
	if n == 0 {
		t.Fatal("transcript has no commands")
	}
}

// TestSoftHSMStructure checks the parts of the softhsm transcripts that do
// not depend on the random keys: every status word of non-crypto
// commands, and the length of crypto answers.
func TestSoftHSMStructure(t *testing.T) {
	creds := loadTestCreds(t)
	for _, name := range []string{"s12-softhsm-raw.txt"} {
		t.Run(name, func(t *testing.T) {
			c, err := New(token.NewMemory(creds, token.NewMemoryPIN("12345678", 1000)), Options{Strict: true})
			if err != nil {
				t.Fatal(err)
			}
			tr := readTranscript(t, filepath.Join("testdata", "vectors", name))
			ctx := context.Background()
			checked := 0
			for _, s := range tr.Steps {
				if s.Power {
					c.PowerOff()
					c.PowerOn()
					continue
				}
				got, err := c.Transmit(ctx, s.Cmd)
				if err != nil {
					t.Fatal(err)
				}
				cmd, _ := apdu.Parse(s.Cmd)
				// Buffers hold other certificates: compare only
				// the status word and, for data, the length.
				if cmd.INS == 0x52 || cmd.INS == 0x56 {
					continue
				}
				gsw, wsw := got[len(got)-2:], s.Reply[len(s.Reply)-2:]
				if !bytes.Equal(gsw, wsw) || len(got) != len(s.Reply) {
					t.Errorf("line %d: %X\n got %X\nwant %X", s.Line, s.Cmd, got, s.Reply)
				}
				checked++
			}
			if checked == 0 {
				t.Fatal("nothing checked")
			}
		})
	}
}

// TestNewErrors: libcacard refuses more than 10 certificates; the card
// needs RSA keys with raw RSA that match their certificates.
func TestNewErrors(t *testing.T) {
	creds := loadTestCreds(t)
	many := make([]token.Credential, 0, 11)
	for len(many) < 11 {
		many = append(many, creds[len(many)%3])
	}
	noRaw := []token.Credential{{Label: "x", Cert: creds[0].Cert, Key: signerOnly{creds[0].Key}}}
	mismatch := []token.Credential{{Label: "y", Cert: creds[0].Cert, Key: creds[1].Key}}
	for _, tc := range []struct {
		name  string
		creds []token.Credential
		want  string
	}{
		{"none", nil, "no credentials"},
		{"eleven", many, "at most 10"},
		{"no raw RSA", noRaw, "raw RSA"},
		{"mismatch", mismatch, "does not match"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(token.NewMemory(tc.creds, nil), Options{})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
	if _, err := New(token.NewMemory(many[:10], nil), Options{}); err != nil {
		t.Fatalf("10 credentials: %v", err)
	}
}

// signerOnly hides RawRSA.
type signerOnly struct{ token.Key }
