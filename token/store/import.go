package store

import (
	"crypto"
	"crypto/x509"
	"fmt"
	"io"
	"time"
)

// ImportOptions are the inputs of Import.
type ImportOptions struct {
	// Certs holds PEM data (file contents). Every CERTIFICATE block, in
	// order, becomes one credential; the first is the identity
	// certificate. Other blocks (keys) are ignored, so a PEM file holding
	// both a certificate and its key can be passed as both Certs and Keys.
	Certs [][]byte
	// Keys holds PEM private keys: PKCS#1 "RSA PRIVATE KEY", PKCS#8
	// "PRIVATE KEY" or SEC1 "EC PRIVATE KEY". Each certificate gets the key
	// that matches its public key, whatever the order here. EC keys are
	// accepted for a future PIV card; the CAC card serves only RSA (see
	// Card.Warnings).
	Keys [][]byte
	// CA is an optional CA certificate, PEM or DER, stored as ca.pem and
	// ca.der for the guest.
	CA []byte
	// PIN, MaxTries and Rand are as in Options.
	PIN      string
	MaxTries int
	Rand     io.Reader

	iterations int
}

// Import makes a new card in dir, which must not exist yet, from existing
// certificates and keys. Unused keys are an error, as is a certificate
// without its key: both usually mean a wrong file was given.
func Import(dir string, opts ImportOptions) (*Card, error) {
	maxTries, err := checkMaxTries(opts.MaxTries)
	if err != nil {
		return nil, err
	}
	// Fail before parsing if dir is taken (writeCard
	// checks again).
	if err := checkNew(dir); err != nil {
		return nil, err
	}
	rnd := randReader(opts.Rand)
	pinStr, generated, err := choosePIN(opts.PIN, rnd)
	if err != nil {
		return nil, err
	}

	var certs []*x509.Certificate
	for i, b := range opts.Certs {
		cs, err := parseCertPEM(b)
		if err != nil {
			return nil, fmt.Errorf("store: certificate input %d: %w", i+1, err)
		}
		certs = append(certs, cs...)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("store: no certificates given (need PEM CERTIFICATE blocks)")
	}
	if len(certs) > maxCredentials {
		return nil, fmt.Errorf("store: %d certificates given; a card holds at most %d", len(certs), maxCredentials)
	}
	var keys []crypto.Signer
	for i, b := range opts.Keys {
		ks, err := parseKeyPEM(b)
		if err != nil {
			return nil, fmt.Errorf("store: key input %d: %w", i+1, err)
		}
		keys = append(keys, ks...)
	}
	used := make([]bool, len(keys))
	m := &manifest{Version: formatVersion, Type: typeCAC, CN: certs[0].Subject.CommonName}
	var files []file
	for i, c := range certs {
		found := -1
		for j, k := range keys {
			if matches(c, k) {
				found = j
				break
			}
		}
		if found < 0 {
			return nil, fmt.Errorf("store: certificate %d (%s): %w its public key; give its key with --key or --pem", i+1, c.Subject, errNoKey)
		}
		used[found] = true
		kp, err := marshalKeyPEM(keys[found])
		if err != nil {
			return nil, fmt.Errorf("store: encode key of certificate %d: %w", i+1, err)
		}
		label := fmt.Sprintf("cert%d", i+1)
		cn, kn := label+".pem", label+"-key.pem"
		files = append(files, file{cn, certPEM(c), publicMode}, file{kn, kp, secretMode})
		m.Credentials = append(m.Credentials, manifestCred{Label: label, Cert: cn, Key: kn})
	}
	for j, u := range used {
		if !u {
			return nil, fmt.Errorf("store: key %d (%s) matches none of the certificates; check the --cert/--key pairs", j+1, KeyDescription(keys[j].Public()))
		}
	}
	if len(opts.CA) > 0 {
		cas, err := parseCertPEM(opts.CA)
		if err != nil {
			return nil, fmt.Errorf("store: CA certificate: %w", err)
		}
		if len(cas) != 1 {
			return nil, fmt.Errorf("store: CA input holds %d certificates; give exactly one", len(cas))
		}
		files = append(files, file{"ca.pem", certPEM(cas[0]), publicMode}, file{"ca.der", cas[0].Raw, publicMode})
		m.CA = &manifestCA{Cert: "ca.pem", DER: "ca.der"}
	}
	m.Created = time.Now().UTC().Truncate(time.Second)
	if m.ID, err = randomID(rnd); err != nil {
		return nil, err
	}
	if m.PIN, err = newPINParams(pinStr, opts.iterations, maxTries, rnd); err != nil {
		return nil, err
	}
	if err := writeCard(dir, m, files); err != nil {
		return nil, err
	}
	c, err := Open(dir)
	if err != nil {
		return nil, fmt.Errorf("store: card %s was written but does not load: %w", dir, err)
	}
	if generated {
		c.genPIN = pinStr
	}
	return c, nil
}
