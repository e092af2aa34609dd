package store

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// PIVOptions are the settings of CreatePIV and ImportPIV. The zero value
// (with Personalize set) makes a "John Doe" card with RSA-2048 keys, a
// generated PIN and PUK, 3 tries each, and a random 3DES management key.
type PIVOptions struct {
	// CN is the holder's common name; default "John Doe" (CreatePIV) or
	// the first certificate's CN (ImportPIV).
	CN string
	// KeyType is the algorithm of the four keys CreatePIV makes:
	// "rsa2048" (default), "rsa3072", "p256" or "p384".
	KeyType string
	// PIN and PUK: 4 to 8 printable ASCII characters (CheckPIN). Empty
	// generates 8 random digits, returned by GeneratedSecrets.
	PIN, PUK string
	// MaxPINTries, MaxPUKTries: wrong tries before blocking; default 3,
	// at most 15.
	MaxPINTries, MaxPUKTries int
	// MgmAlg and MgmKey are the card management key (9B). A nil MgmKey
	// generates a random key of MgmAlg; a zero MgmAlg means 3DES, the
	// only algorithm Debian 12's yubico-piv-tool 2.2.0 authenticates
	// with, so a new card can be managed with it out of the box.
	MgmAlg byte
	MgmKey []byte
	// CA is ImportPIV's optional CA certificate (PEM or DER).
	CA []byte
	// Validity of CreatePIV's certificates; default 10 years.
	Validity time.Duration
	// Rand is the source for serials, secrets and salts; nil means
	// crypto/rand.
	Rand io.Reader
	// Now returns the current time; nil means time.Now.
	Now func() time.Time
	// Personalize writes the card's data objects, given the new card
	// (before it is moved into place) and its certificates by key
	// reference. cmd/vscard passes a function calling piv.Personalize;
	// this package cannot, as it does not import card/piv. Required.
	Personalize func(st *PIVCard, certs map[byte]*x509.Certificate) error

	// iterations overrides the PIN hash cost, for fast tests.
	iterations int
}

// PIVKeyTypes returns the accepted PIVOptions.KeyType values, default
// first.
func PIVKeyTypes() []string { return []string{"rsa2048", "rsa3072", "p256", "p384"} }

// PIVSlot is one key reference's input for ImportPIV: PEM (or DER)
// certificate data and PEM private keys. The slot gets the first
// certificate whose key is among Keys; the other certificates (a chain)
// are ignored, and a key matching no certificate is an error.
type PIVSlot struct {
	Ref   byte
	Certs [][]byte
	Keys  []crypto.Signer
	// KeyPEM holds PEM private keys (PKCS#1, PKCS#8, SEC1), added to Keys.
	KeyPEM [][]byte
}

// OIDs of the certificates CreatePIV makes.
var (
	// id-PIV-cardAuth (SP 800-73-4 / FIPS 201 card authentication EKU).
	oidPIVCardAuth = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 6, 8}
)

// CreatePIV makes a new PIV card in dir, which must not exist yet: a CA
// "CN=Fake PIV CA" and four certificates it issues, each with its own key
// of opts.KeyType: 9A PIV authentication "CN=<CN>" (client auth, smart
// card logon), 9C digital signature "CN=<CN> (signature)", 9D key
// management "CN=<CN> (key management)" and 9E card authentication
// "CN=<CN> (card authentication)". The card is built in a temporary
// directory and renamed into place once personalized.
func CreatePIV(dir string, opts PIVOptions) (*PIVCard, error) {
	gen, err := pivKeyGen(opts.KeyType)
	if err != nil {
		return nil, err
	}
	if opts.Personalize == nil {
		return nil, errors.New("store: PIVOptions.Personalize is required")
	}
	if err := checkNew(dir); err != nil {
		return nil, err
	}
	rnd := randReader(opts.Rand)
	sec, err := choosePIVSecrets(&opts, rnd)
	if err != nil {
		return nil, err
	}
	cn := opts.CN
	if cn == "" {
		cn = defaultCN
	}
	// Key usages follow SP 800-73-4 Part 1 §3.2 and the PIV certificate
	// profile: the key management key encrypts (RSA) or agrees (ECDH).
	kmUsage := x509.KeyUsageKeyAgreement
	authUsage := x509.KeyUsageDigitalSignature
	if strings.HasPrefix(opts.KeyType, "rsa") || opts.KeyType == "" {
		kmUsage = x509.KeyUsageKeyEncipherment
		authUsage |= x509.KeyUsageKeyEncipherment
	}
	refs := []byte{0x9A, 0x9C, 0x9D, 0x9E}
	leaves := []leafSpec{
		{"9A", cn, authUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, []asn1.ObjectIdentifier{oidSmartcardLogon}},
		{"9C", cn + " (signature)", x509.KeyUsageDigitalSignature | x509.KeyUsageContentCommitment, []x509.ExtKeyUsage{x509.ExtKeyUsageEmailProtection}, nil},
		{"9D", cn + " (key management)", kmUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageEmailProtection}, nil},
		{"9E", cn + " (card authentication)", x509.KeyUsageDigitalSignature, nil, []asn1.ObjectIdentifier{oidPIVCardAuth}},
	}
	is, err := issueCard(rnd, gen, "Fake PIV CA", opts.Validity, opts.Now, leaves)
	if err != nil {
		return nil, err
	}
	keys := map[byte]crypto.Signer{}
	certs := map[byte]*x509.Certificate{}
	for i, ref := range refs {
		keys[ref], certs[ref] = is.keys[i], is.certs[i]
	}
	ca, err := is.caFiles()
	if err != nil {
		return nil, err
	}
	m := &pivManifest{
		Version: formatVersion, Type: TypePIV, CN: cn, Created: is.created,
		CA: &manifestCA{Cert: "ca.pem", DER: "ca.der", Key: "ca-key.pem"},
	}
	return writePIV(dir, m, ca, keys, certs, sec, &opts, rnd)
}

// ImportPIV makes a new PIV card in dir, which must not exist yet, from
// existing certificates and keys, one PIVSlot per key reference.
func ImportPIV(dir string, slots []PIVSlot, opts PIVOptions) (*PIVCard, error) {
	if opts.Personalize == nil {
		return nil, errors.New("store: PIVOptions.Personalize is required")
	}
	if len(slots) == 0 {
		return nil, errors.New("store: no slots given")
	}
	if err := checkNew(dir); err != nil {
		return nil, err
	}
	rnd := randReader(opts.Rand)
	keys := map[byte]crypto.Signer{}
	certs := map[byte]*x509.Certificate{}
	var first *x509.Certificate
	for _, s := range slots {
		if !validKeyRef(s.Ref) {
			return nil, fmt.Errorf("store: slot %02X: not a PIV key reference (want 9a, 9c, 9d, 9e or 82-95)", s.Ref)
		}
		if _, dup := certs[s.Ref]; dup {
			return nil, fmt.Errorf("store: slot %02X given twice", s.Ref)
		}
		cert, key, err := pivSlotInput(s)
		if err != nil {
			return nil, fmt.Errorf("store: slot %02X: %w", s.Ref, err)
		}
		keys[s.Ref], certs[s.Ref] = key, cert
		if first == nil {
			first = cert
		}
	}
	sec, err := choosePIVSecrets(&opts, rnd)
	if err != nil {
		return nil, err
	}
	cn := opts.CN
	if cn == "" {
		cn = first.Subject.CommonName
	}
	m := &pivManifest{Version: formatVersion, Type: TypePIV, CN: cn, Created: time.Now().UTC().Truncate(time.Second)}
	if opts.Now != nil {
		m.Created = opts.Now().UTC().Truncate(time.Second)
	}
	var ca []file
	if len(opts.CA) > 0 {
		cas, err := parseCertPEM(opts.CA)
		if err != nil {
			return nil, fmt.Errorf("store: CA certificate: %w", err)
		}
		if len(cas) != 1 {
			return nil, fmt.Errorf("store: CA input holds %d certificates; give exactly one", len(cas))
		}
		ca = []file{{"ca.pem", certPEM(cas[0]), publicMode}, {"ca.der", cas[0].Raw, publicMode}}
		m.CA = &manifestCA{Cert: "ca.pem", DER: "ca.der"}
	}
	return writePIV(dir, m, ca, keys, certs, sec, &opts, rnd)
}

// pivSlotInput picks a slot's certificate and the key that matches it.
func pivSlotInput(s PIVSlot) (*x509.Certificate, crypto.Signer, error) {
	var cs []*x509.Certificate
	for i, b := range s.Certs {
		c, err := parseCertPEM(b)
		if err != nil {
			return nil, nil, fmt.Errorf("certificate input %d: %w", i+1, err)
		}
		cs = append(cs, c...)
	}
	if len(cs) == 0 {
		return nil, nil, errors.New("no certificate given")
	}
	keys := slices.Clone(s.Keys)
	for i, b := range s.KeyPEM {
		ks, err := parseKeyPEM(b)
		if err != nil {
			return nil, nil, fmt.Errorf("key input %d: %w", i+1, err)
		}
		keys = append(keys, ks...)
	}
	if len(keys) == 0 {
		return nil, nil, errors.New("no private key given")
	}
	for _, c := range cs {
		for _, k := range keys {
			if !matches(c, k) {
				continue
			}
			for _, other := range keys {
				if !matches(c, other) {
					return nil, nil, fmt.Errorf("a %s key matches no certificate of the slot; check the files", KeyDescription(other.Public()))
				}
			}
			k, err := pivSigner(k)
			if err != nil {
				return nil, nil, err
			}
			if err := checkPIVKey(k); err != nil {
				return nil, nil, err
			}
			return c, k, nil
		}
	}
	return nil, nil, fmt.Errorf("certificate %s: %w its public key", cs[0].Subject, errNoKey)
}

type pivSecrets struct {
	pinP, pukP     manifestPIN
	mgmAlg         byte
	mgmKey         []byte
	genPIN, genPUK string
	genMgm         []byte
}

func choosePIVSecrets(o *PIVOptions, rnd io.Reader) (*pivSecrets, error) {
	var s pivSecrets
	pinTries, err := checkMaxTries(o.MaxPINTries)
	if err != nil {
		return nil, err
	}
	pukTries, err := checkMaxTries(o.MaxPUKTries)
	if err != nil {
		return nil, fmt.Errorf("%w (PUK)", err)
	}
	pinStr, genPIN, err := choosePIN(o.PIN, rnd)
	if err != nil {
		return nil, err
	}
	pukStr, genPUK, err := choosePIN(o.PUK, rnd)
	if err != nil {
		return nil, fmt.Errorf("%w (PUK)", err)
	}
	if genPIN {
		s.genPIN = pinStr
	}
	if genPUK {
		s.genPUK = pukStr
	}
	if o.MgmKey == nil {
		alg := o.MgmAlg
		if alg == 0 {
			alg = MgmAlgTDES
		}
		key, err := newMgmKey(alg, rnd)
		if err != nil {
			return nil, fmt.Errorf("store: generate management key: %w", err)
		}
		s.mgmAlg, s.mgmKey, s.genMgm = alg, key, key
	} else {
		if err := checkMgmKey(o.MgmAlg, o.MgmKey); err != nil {
			return nil, fmt.Errorf("store: %w", err)
		}
		s.mgmAlg, s.mgmKey = o.MgmAlg, o.MgmKey
	}
	if s.pinP, err = newPINParams(pinStr, o.iterations, pinTries, rnd); err != nil {
		return nil, err
	}
	if s.pukP, err = newPINParams(pukStr, o.iterations, pukTries, rnd); err != nil {
		return nil, err
	}
	return &s, nil
}

// writePIV builds the card in a temporary directory: manifest, PIN, PUK,
// management key and CA files, then the keys through SetKey and the
// objects through opts.Personalize, and renames it to dir.
func writePIV(dir string, m *pivManifest, extra []file, keys map[byte]crypto.Signer, certs map[byte]*x509.Certificate, sec *pivSecrets, opts *PIVOptions, rnd io.Reader) (*PIVCard, error) {
	var err error
	if m.ID, err = randomID(rnd); err != nil {
		return nil, err
	}
	mb, err := encodeJSON(m)
	if err != nil {
		return nil, fmt.Errorf("store: encode manifest: %w", err)
	}
	pinB, err := encodeJSON(state{Version: formatVersion, TriesLeft: sec.pinP.MaxTries, PIN: &sec.pinP})
	if err != nil {
		return nil, fmt.Errorf("store: encode PIN: %w", err)
	}
	pukB, err := encodeJSON(state{Version: formatVersion, TriesLeft: sec.pukP.MaxTries, PIN: &sec.pukP})
	if err != nil {
		return nil, fmt.Errorf("store: encode PUK: %w", err)
	}
	mgmB, err := encodeMgm(sec.mgmAlg, sec.mgmKey)
	if err != nil {
		return nil, err
	}
	files := append(extra,
		file{ManifestFile, mb, secretMode},
		file{PINFile, pinB, secretMode},
		file{PUKFile, pukB, secretMode},
		file{MgmFile, mgmB, secretMode})
	err = buildDir(dir, func(tmp string) error {
		for _, f := range files {
			if err := writeNew(tmp, f.name, f.data, f.mode); err != nil {
				return fmt.Errorf("store: write %s: %w", f.name, err)
			}
		}
		c, err := OpenPIV(tmp, PIVOpenOptions{})
		if err != nil {
			return err
		}
		for _, ref := range PIVKeyRefs() {
			if k, ok := keys[ref]; ok {
				if err := c.SetKey(ref, k); err != nil {
					return err
				}
			}
		}
		if err := opts.Personalize(c, certs); err != nil {
			return fmt.Errorf("store: personalize card: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	c, err := OpenPIV(dir, PIVOpenOptions{})
	if err != nil {
		return nil, fmt.Errorf("store: card %s was written but does not load: %w", filepath.Clean(dir), err)
	}
	c.genPIN, c.genPUK, c.genMgm = sec.genPIN, sec.genPUK, sec.genMgm
	return c, nil
}

// pivKeyGen returns the key generator for a PIVOptions.KeyType.
func pivKeyGen(t string) (func(io.Reader) (crypto.Signer, error), error) {
	rsaGen := func(bits int) func(io.Reader) (crypto.Signer, error) {
		return func(r io.Reader) (crypto.Signer, error) { return rsa.GenerateKey(r, bits) }
	}
	ecGen := func(c elliptic.Curve) func(io.Reader) (crypto.Signer, error) {
		return func(r io.Reader) (crypto.Signer, error) { return ecdsa.GenerateKey(c, r) }
	}
	switch t {
	case "", "rsa2048":
		return rsaGen(2048), nil
	case "rsa3072":
		return rsaGen(3072), nil
	case "p256":
		return ecGen(elliptic.P256()), nil
	case "p384":
		return ecGen(elliptic.P384()), nil
	}
	return nil, fmt.Errorf("store: unknown PIV key type %q; use one of %v", t, PIVKeyTypes())
}

// newMgmKey returns a random management key for alg. A 3DES key whose
// thirds repeat (ignoring the parity bits) would be single DES or
// two-key 3DES, so such a draw is discarded; with 24 random bytes that
// practically never happens, but a weak key must never be printed.
func newMgmKey(alg byte, rnd io.Reader) ([]byte, error) {
	n, ok := MgmKeyLen(alg)
	if !ok {
		return nil, fmt.Errorf("unknown management key algorithm %02X", alg)
	}
	for tries := 0; tries < 8; tries++ {
		key := make([]byte, n)
		if _, err := io.ReadFull(rnd, key); err != nil {
			return nil, err
		}
		if alg != MgmAlgTDES || distinctDESKeys(key) {
			return key, nil
		}
	}
	return nil, errors.New("random source keeps giving a weak 3DES key")
}

// distinctDESKeys reports whether the three 8-byte DES keys of a 3DES key
// differ pairwise, parity bits aside.
func distinctDESKeys(k []byte) bool {
	eq := func(a, b []byte) bool {
		for i := range a {
			if a[i]&0xFE != b[i]&0xFE {
				return false
			}
		}
		return true
	}
	return !eq(k[0:8], k[8:16]) && !eq(k[8:16], k[16:24]) && !eq(k[0:8], k[16:24])
}
