package store_test

import (
	"crypto"
	"crypto/x509"
	"errors"
	"path/filepath"
	"testing"

	"github.com/vscard/vscard/card/piv"
	"github.com/vscard/vscard/tlv"
	"github.com/vscard/vscard/token/store"
)

// The PIV card directory is a piv.Store; store cannot import card/piv, so
// the check lives in this external test.
var _ piv.Store = (*store.PIVCard)(nil)

// TestPIVWithPersonalize makes a card with the real piv.Personalize and
// checks what the card will read: the certificate objects under their
// tags, the CHUID, and piv.ErrNotFound for an absent object.
func TestPIVWithPersonalize(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "card")
	_, err := store.CreatePIV(dir, store.PIVOptions{
		KeyType: "p256",
		Personalize: func(st *store.PIVCard, certs map[byte]*x509.Certificate) error {
			return piv.Personalize(st, piv.Personalization{Certs: certs})
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	c, err := store.OpenPIV(dir, store.PIVOpenOptions{NotFound: piv.ErrNotFound})
	if err != nil {
		t.Fatal(err)
	}
	for _, ref := range []byte{piv.KeyAuthentication, piv.KeySignature, piv.KeyManagement, piv.KeyCardAuthentication} {
		tag, _ := piv.CertTag(ref)
		v, err := c.Object(tag)
		if err != nil {
			t.Fatalf("certificate object of %02X: %v", ref, err)
		}
		k, err := c.Key(ref)
		if err != nil {
			t.Fatal(err)
		}
		// The object's 70 element is the certificate of the stored key.
		der, ok := tlv.FindBER(v, 0x70)
		if !ok {
			t.Fatalf("object %06X has no 70 element: %x", tag, v)
		}
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		if !k.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(cert.PublicKey) {
			t.Errorf("key %02X does not match its certificate object", ref)
		}
	}
	if _, err := c.Object(0x5FC102); err != nil {
		t.Errorf("CHUID: %v", err)
	}
	if _, err := c.Object(0x5FC10D); !errors.Is(err, piv.ErrNotFound) {
		t.Errorf("absent retired certificate: %v, want piv.ErrNotFound", err)
	}
	if _, err := c.Key(0x95); !errors.Is(err, piv.ErrNotFound) {
		t.Errorf("absent key: %v, want piv.ErrNotFound", err)
	}
	if _, err := piv.New(c, piv.Options{}); err != nil {
		t.Errorf("piv.New: %v", err)
	}
}
