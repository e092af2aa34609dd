package store

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"fmt"
	"io"
	"math/big"
	"path/filepath"
	"time"
)

// Options are the settings for Create. The zero value makes the card from
// QEMU's documentation: "John Doe", RSA-2048, a generated PIN, 3 tries.
type Options struct {
	// CN is the holder's common name; default "John Doe".
	CN string
	// PIN is the user PIN, 4 to 8 printable ASCII characters (see
	// CheckPIN). Empty generates 8 random digits, returned by
	// Card.GeneratedPIN.
	PIN string
	// KeyType is "rsa2048" (default), "rsa3072" or "rsa1024".
	KeyType string
	// MaxTries is the number of wrong PINs before the PIN blocks;
	// default 3, at most 15.
	MaxTries int
	// Validity is how long the certificates are valid; default 10 years.
	Validity time.Duration
	// Rand is the source for serials, PIN, salt and card ID; nil means
	// crypto/rand. (Go's RSA key generation always uses its own source.)
	Rand io.Reader
	// Now returns the current time; nil means time.Now.
	Now func() time.Time

	// iterations overrides the PIN hash cost, for fast tests.
	iterations int
}

// KeyTypes returns the accepted Options.KeyType values, default first.
func KeyTypes() []string { return []string{"rsa2048", "rsa3072", "rsa1024"} }

const defaultCN = "John Doe"

// clockSkew backdates NotBefore: guest clocks are often hours off (an RTC
// kept in local time), and a "not yet valid" certificate fails login.
const clockSkew = 24 * time.Hour

// oidSmartcardLogon is Microsoft's smart card logon EKU
// (1.3.6.1.4.1.311.20.2.2), which Windows wants on a logon certificate.
var oidSmartcardLogon = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 311, 20, 2, 2}

func keyBits(t string) (int, error) {
	switch t {
	case "", "rsa2048":
		return 2048, nil
	case "rsa3072":
		return 3072, nil
	case "rsa1024":
		return 1024, nil
	}
	return 0, fmt.Errorf("store: unknown key type %q; use one of %v", t, KeyTypes())
}

func checkMaxTries(n int) (int, error) {
	if n == 0 {
		return defaultMaxTries, nil
	}
	if n < 1 || n > maxTriesLimit {
		return 0, fmt.Errorf("store: PIN tries must be 1 to %d, not %d", maxTriesLimit, n)
	}
	return n, nil
}

// Create makes a new card in dir, which must not exist yet: a CA "CN=Fake
// Smart Card CA" and three certificates it issues, "CN=<CN>" (identity:
// client auth and smart card logon), "CN=<CN> (signing)" (S/MIME
// signature) and "CN=<CN> (encryption)" (TLS client and S/MIME
// encryption), each with its own key. The CA certificate is also written as
// ca.pem and ca.der for import into a guest.
func Create(dir string, opts Options) (*Card, error) {
	bits, err := keyBits(opts.KeyType)
	if err != nil {
		return nil, err
	}
	maxTries, err := checkMaxTries(opts.MaxTries)
	if err != nil {
		return nil, err
	}
	// Fail before the slow key generation if dir is taken (writeCard
	// checks again).
	if err := checkNew(dir); err != nil {
		return nil, err
	}
	rnd := randReader(opts.Rand)
	pinStr, generated, err := choosePIN(opts.PIN, rnd)
	if err != nil {
		return nil, err
	}
	cn := opts.CN
	if cn == "" {
		cn = defaultCN
	}
	validity := opts.Validity
	if validity <= 0 {
		validity = 10 * 365 * 24 * time.Hour
	}
	now := time.Now
	if opts.Now != nil {
		now = opts.Now
	}
	t := now().UTC().Truncate(time.Second)
	notBefore, notAfter := t.Add(-clockSkew), t.Add(validity)

	caKey, err := rsa.GenerateKey(rnd, bits)
	if err != nil {
		return nil, fmt.Errorf("store: generate CA key: %w", err)
	}
	caTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "Fake Smart Card CA"},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caCert, err := issue(rnd, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("store: make CA certificate: %w", err)
	}

	leaves := []struct {
		label, cn string
		ku        x509.KeyUsage
		eku       []x509.ExtKeyUsage
		other     []asn1.ObjectIdentifier
	}{
		{"id", cn, x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			[]x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, []asn1.ObjectIdentifier{oidSmartcardLogon}},
		{"signing", cn + " (signing)", x509.KeyUsageDigitalSignature | x509.KeyUsageContentCommitment,
			[]x509.ExtKeyUsage{x509.ExtKeyUsageEmailProtection}, nil},
		{"encryption", cn + " (encryption)", x509.KeyUsageKeyEncipherment | x509.KeyUsageDataEncipherment,
			[]x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageEmailProtection}, nil},
	}
	caKeyPEM, err := marshalKeyPEM(caKey)
	if err != nil {
		return nil, fmt.Errorf("store: encode CA key: %w", err)
	}
	files := []file{
		{"ca.pem", certPEM(caCert), publicMode},
		{"ca.der", caCert.Raw, publicMode},
		{"ca-key.pem", caKeyPEM, secretMode},
	}
	m := &manifest{
		Version: formatVersion, Type: typeCAC, CN: cn, Created: t,
		CA: &manifestCA{Cert: "ca.pem", DER: "ca.der", Key: "ca-key.pem"},
	}
	for _, l := range leaves {
		k, err := rsa.GenerateKey(rnd, bits)
		if err != nil {
			return nil, fmt.Errorf("store: generate %s key: %w", l.label, err)
		}
		tmpl := &x509.Certificate{
			Subject:            pkix.Name{CommonName: l.cn},
			NotBefore:          notBefore,
			NotAfter:           notAfter,
			KeyUsage:           l.ku,
			ExtKeyUsage:        l.eku,
			UnknownExtKeyUsage: l.other,
		}
		cert, err := issue(rnd, tmpl, caCert, &k.PublicKey, caKey)
		if err != nil {
			return nil, fmt.Errorf("store: make %s certificate: %w", l.label, err)
		}
		kp, err := marshalKeyPEM(k)
		if err != nil {
			return nil, fmt.Errorf("store: encode %s key: %w", l.label, err)
		}
		certName, keyName := l.label+".pem", l.label+"-key.pem"
		files = append(files, file{certName, certPEM(cert), publicMode}, file{keyName, kp, secretMode})
		m.Credentials = append(m.Credentials, manifestCred{Label: l.label, Cert: certName, Key: keyName})
	}
	if m.ID, err = randomID(rnd); err != nil {
		return nil, err
	}
	if m.PIN, err = newPINParams(pinStr, opts.iterations, maxTries, rnd); err != nil {
		return nil, err
	}
	if err := writeCard(dir, m, files); err != nil {
		return nil, err
	}
	// Read the card back: this checks what was written, through the same
	// code path serve uses.
	c, err := Open(dir)
	if err != nil {
		return nil, fmt.Errorf("store: card %s was written but does not load: %w", filepath.Clean(dir), err)
	}
	if generated {
		c.genPIN = pinStr
	}
	return c, nil
}

// issue signs tmpl with a fresh random serial. Serials are 127-bit positive
// integers: random so two cards (or a re-made card) never collide in a
// guest's certificate cache, and within RFC 5280's 20 octets.
func issue(rnd io.Reader, tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) (*x509.Certificate, error) {
	limit := new(big.Int).Lsh(big.NewInt(1), 127)
	for {
		sn, err := rand.Int(rnd, limit)
		if err != nil {
			return nil, fmt.Errorf("serial: %w", err)
		}
		if sn.Sign() > 0 {
			tmpl.SerialNumber = sn
			break
		}
	}
	der, err := x509.CreateCertificate(rnd, tmpl, parent, pub, signer)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// choosePIN checks a PIN the user gave, or generates one when pin is empty;
// generated tells the caller to show it once.
func choosePIN(pin string, rnd io.Reader) (chosen string, generated bool, err error) {
	if pin != "" {
		return pin, false, CheckPIN(pin)
	}
	pin, err = GeneratePIN(rnd)
	return pin, true, err
}
