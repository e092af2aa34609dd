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
	leaves := []leafSpec{
		{"id", cn, x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			[]x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, []asn1.ObjectIdentifier{oidSmartcardLogon}},
		{"signing", cn + " (signing)", x509.KeyUsageDigitalSignature | x509.KeyUsageContentCommitment,
			[]x509.ExtKeyUsage{x509.ExtKeyUsageEmailProtection}, nil},
		{"encryption", cn + " (encryption)", x509.KeyUsageKeyEncipherment | x509.KeyUsageDataEncipherment,
			[]x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageEmailProtection}, nil},
	}
	gen := func(r io.Reader) (crypto.Signer, error) { return rsa.GenerateKey(r, bits) }
	is, err := issueCard(rnd, gen, "Fake Smart Card CA", opts.Validity, opts.Now, leaves)
	if err != nil {
		return nil, err
	}
	files, err := is.caFiles()
	if err != nil {
		return nil, err
	}
	m := &manifest{
		Version: formatVersion, Type: typeCAC, CN: cn, Created: is.created,
		CA: &manifestCA{Cert: "ca.pem", DER: "ca.der", Key: "ca-key.pem"},
	}
	for i, l := range leaves {
		kp, err := marshalKeyPEM(is.keys[i])
		if err != nil {
			return nil, fmt.Errorf("store: encode %s key: %w", l.name, err)
		}
		certName, keyName := l.name+".pem", l.name+"-key.pem"
		files = append(files, file{certName, certPEM(is.certs[i]), publicMode}, file{keyName, kp, secretMode})
		m.Credentials = append(m.Credentials, manifestCred{Label: l.name, Cert: certName, Key: keyName})
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

// leafSpec is one end-entity certificate a new card gets.
type leafSpec struct {
	name  string // file label (CAC) or key reference (PIV), for errors
	cn    string
	ku    x509.KeyUsage
	eku   []x509.ExtKeyUsage
	other []asn1.ObjectIdentifier
}

// issuedCard is a new card's CA and its leaves, keys in leaf order.
type issuedCard struct {
	created time.Time
	caKey   crypto.Signer
	caCert  *x509.Certificate
	keys    []crypto.Signer
	certs   []*x509.Certificate
}

// issueCard makes a CA named caCN and one key and certificate per leaf,
// every key from gen, all valid from now (minus clockSkew) for validity
// (default 10 years). Create and CreatePIV differ only in the leaves and
// the key type; the CA is the same kind of throwaway "fake" CA QEMU's
// documentation makes with certutil.
func issueCard(rnd io.Reader, gen func(io.Reader) (crypto.Signer, error), caCN string, validity time.Duration, now func() time.Time, leaves []leafSpec) (*issuedCard, error) {
	if validity <= 0 {
		validity = 10 * 365 * 24 * time.Hour
	}
	if now == nil {
		now = time.Now
	}
	t := now().UTC().Truncate(time.Second)
	notBefore, notAfter := t.Add(-clockSkew), t.Add(validity)

	caKey, err := gen(rnd)
	if err != nil {
		return nil, fmt.Errorf("store: generate CA key: %w", err)
	}
	caTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: caCN},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caCert, err := issue(rnd, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return nil, fmt.Errorf("store: make CA certificate: %w", err)
	}
	is := &issuedCard{created: t, caKey: caKey, caCert: caCert}
	for _, l := range leaves {
		k, err := gen(rnd)
		if err != nil {
			return nil, fmt.Errorf("store: generate %s key: %w", l.name, err)
		}
		tmpl := &x509.Certificate{
			Subject:            pkix.Name{CommonName: l.cn},
			NotBefore:          notBefore,
			NotAfter:           notAfter,
			KeyUsage:           l.ku,
			ExtKeyUsage:        l.eku,
			UnknownExtKeyUsage: l.other,
		}
		cert, err := issue(rnd, tmpl, caCert, k.Public(), caKey)
		if err != nil {
			return nil, fmt.Errorf("store: make %s certificate: %w", l.name, err)
		}
		is.keys, is.certs = append(is.keys, k), append(is.certs, cert)
	}
	return is, nil
}

// caFiles are the CA's files in a card directory: ca.pem and ca.der for
// importing into a guest, and its key (0600) for issuing more.
func (is *issuedCard) caFiles() ([]file, error) {
	kp, err := marshalKeyPEM(is.caKey)
	if err != nil {
		return nil, fmt.Errorf("store: encode CA key: %w", err)
	}
	return []file{
		{"ca.pem", certPEM(is.caCert), publicMode},
		{"ca.der", is.caCert.Raw, publicMode},
		{"ca-key.pem", kp, secretMode},
	}, nil
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
