package store

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"

	"github.com/vscard/vscard/token"
)

// parseKeyPEM returns the private keys in PEM data: PKCS#1 ("RSA PRIVATE
// KEY"), PKCS#8 ("PRIVATE KEY") and SEC1 ("EC PRIVATE KEY"). Other blocks
// (certificates, EC PARAMETERS) are skipped; encrypted PEM is refused with
// a hint.
func parseKeyPEM(data []byte) ([]crypto.Signer, error) {
	var keys []crypto.Signer
	for n := 1; ; n++ {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if _, enc := b.Headers["Proc-Type"]; enc || b.Type == "ENCRYPTED PRIVATE KEY" {
			return nil, fmt.Errorf("PEM block %d (%s) is encrypted; decrypt it first (openssl pkey -in FILE -out plain.pem)", n, b.Type)
		}
		var k any
		var err error
		switch b.Type {
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(b.Bytes)
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(b.Bytes)
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(b.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("PEM block %d (%s): %w", n, b.Type, err)
		}
		s, err := signer(k)
		if err != nil {
			return nil, fmt.Errorf("PEM block %d (%s): %w", n, b.Type, err)
		}
		keys = append(keys, s)
	}
	return keys, nil
}

// signer accepts the key types a card can hold: RSA (CAC, PIV) and ECDSA
// (PIV only).
func signer(k any) (crypto.Signer, error) {
	switch k := k.(type) {
	case *rsa.PrivateKey:
		if err := k.Validate(); err != nil {
			return nil, fmt.Errorf("invalid RSA key: %w", err)
		}
		return k, nil
	case *ecdsa.PrivateKey:
		return k, nil
	default:
		return nil, fmt.Errorf("unsupported key type %T; a card holds RSA or ECDSA keys", k)
	}
}

// parseCertPEM returns the certificates in PEM data, in order. DER input
// (one certificate) is accepted too, for CA files exported from Windows.
func parseCertPEM(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest := data
	for n := 1; ; n++ {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("PEM block %d: %w", n, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 && len(data) > 0 && data[0] == 0x30 {
		c, err := x509.ParseCertificate(data)
		if err != nil {
			return nil, fmt.Errorf("not PEM, and not a DER certificate: %w", err)
		}
		certs = append(certs, c)
	}
	return certs, nil
}

// matches reports whether key is the private half of cert's public key.
func matches(cert *x509.Certificate, key crypto.Signer) bool {
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	return ok && pub.Equal(cert.PublicKey)
}

// wrapKey returns the token.Key for a stored key: RSA keys get
// token.NewRSAKey so they also do the raw operation CAC needs.
func wrapKey(k crypto.Signer) token.Key {
	if r, ok := k.(*rsa.PrivateKey); ok {
		return token.NewRSAKey(r)
	}
	return k
}

func marshalKeyPEM(k crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func certPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// KeyDescription names a public key's type and size, e.g. "RSA-2048" or
// "ECDSA P-256".
func KeyDescription(pub crypto.PublicKey) string {
	switch p := pub.(type) {
	case *rsa.PublicKey:
		return fmt.Sprintf("RSA-%d", p.N.BitLen())
	case *ecdsa.PublicKey:
		return "ECDSA " + p.Curve.Params().Name
	default:
		return fmt.Sprintf("%T", pub)
	}
}

var errNoKey = errors.New("no private key matches")
