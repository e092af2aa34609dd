package nss

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"math/big"
	"slices"
	"strings"
	"sync"

	"github.com/vscard/vscard/token"
)

// ErrLocked is returned by a key's RawRSA, Sign and Decrypt, and by
// Token.PrivateKeys, before the database password has been verified.
// A card answers 69 85 (security status) in that state.
var ErrLocked = errors.New("nss: keys are locked: verify the database password first")

// MaxTries is the size of a Token PIN's in-memory retry counter. NSS has no
// retry counter; this one only slows down guessing through the card and is
// not persistent (see the package documentation).
const MaxTries = 15

// rsaSensitive are the encrypted RSA attributes (peers.md §6.2).
var rsaSensitive = []uint32{ckaPrivateExponent, ckaPrime1, ckaPrime2, ckaExponent1, ckaExponent2, ckaCoefficient}

// Token is a set of certificates and keys from an NSS database, chosen by
// nickname. It implements token.Token; it is safe for concurrent use and
// stays valid after the DB is closed.
type Token struct {
	salt, check []byte
	needsPW     bool
	creds       []token.Credential
	keys        []*keyEntry

	mu       sync.RWMutex
	unlocked bool
	tries    int
}

var _ token.Token = (*Token)(nil)

// keyEntry is a private key row: its public half and its encrypted
// attributes, and once unlocked the decrypted key.
type keyEntry struct {
	label string
	typ   uint32
	pub   crypto.PublicKey
	curve elliptic.Curve
	enc   map[uint32][]byte // encrypted sensitive attributes

	// lock is the owning Token's mutex; it guards rsa and ec.
	lock *sync.RWMutex
	rsa  *token.RSAKey // after unlock (RSA)
	ec   *ecdsa.PrivateKey
}

// Token returns a token with the certificates chosen by nickname, in the
// given order, each with its private key. An unknown nickname gives an
// error listing the nicknames present; a certificate without a private key
// is an error. When several certificates share a nickname (a renewal),
// the first in table order that has a private key is used.
// A nickname may carry NSS's "NSS Certificate DB:" token prefix, as
// libcacard accepts it.
//
// For an empty-password database the keys are decrypted now, PIN returns
// nil and a warning is logged once per DB.
func (db *DB) Token(nicknames []string) (*Token, error) {
	if len(nicknames) == 0 {
		return nil, fmt.Errorf("nss: %s: no certificate nicknames given (present: %s)", db.dir, quoteList(db.Nicknames()))
	}
	t := &Token{salt: db.salt, check: db.check, needsPW: db.needsPW, tries: MaxTries}
	for _, nick := range nicknames {
		cred, k, err := db.credential(nick)
		if err != nil {
			return nil, err
		}
		k.lock = &t.mu
		t.creds = append(t.creds, cred)
		t.keys = append(t.keys, k)
	}
	if !db.needsPW {
		if err := t.Unlock(nil); err != nil {
			return nil, fmt.Errorf("nss: %s: %w", db.dir, err)
		}
		db.warnOnce.Do(func() {
			db.log.Warn("nss: the database has an empty password: its private keys are effectively unprotected and the card accepts any PIN (set one with certutil -W -d sql:DIR)", "db", db.dir)
		})
	}
	return t, nil
}

// internalTokens are the names of NSS's software token, which
// PK11_FindCertFromNickname accepts as a "token:" prefix, so libcacard
// users may write "NSS Certificate DB:id-cert".
var internalTokens = []string{"NSS Certificate DB:", "NSS FIPS 140-2 Certificate DB:"}

// credential finds nick's certificate and private key.
func (db *DB) credential(nick string) (token.Credential, *keyEntry, error) {
	if !slices.ContainsFunc(db.certs, func(c certRow) bool { return c.label == nick }) {
		for _, p := range internalTokens {
			if rest, ok := strings.CutPrefix(nick, p); ok {
				nick = rest
				break
			}
		}
	}
	found := false
	var lastErr error
	for _, c := range db.certs {
		if c.label != nick {
			continue
		}
		found = true
		cert, err := x509.ParseCertificate(c.der)
		if err != nil {
			lastErr = fmt.Errorf("nss: %s: certificate %q: %w", db.dir, nick, err)
			continue
		}
		if len(c.id) == 0 {
			lastErr = fmt.Errorf("nss: %s: certificate %q has no CKA_ID, so no private key", db.dir, nick)
			continue
		}
		k, err := db.keyFor(nick, c.id, cert)
		if err != nil {
			lastErr = err
			continue
		}
		cred := token.Credential{Label: nick, Cert: cert}
		switch k.typ {
		case ckkRSA:
			cred.Key = &rsaKey{e: k}
		case ckkEC:
			cred.Key = &ecKey{e: k}
		}
		return cred, k, nil
	}
	if !found {
		return token.Credential{}, nil, fmt.Errorf("nss: %s: no certificate with nickname %q (present: %s)", db.dir, nick, quoteList(db.Nicknames()))
	}
	return token.Credential{}, nil, lastErr
}

// keyFor reads the private key whose CKA_ID is id and checks it belongs to
// cert.
func (db *DB) keyFor(nick string, id []byte, cert *x509.Certificate) (*keyEntry, error) {
	cols := []uint32{ckaClass, ckaKeyType, ckaModulus, ckaPublicExponent, ckaValue, ckaECParams}
	cols = append(cols, rsaSensitive...)
	names := make([]string, len(cols))
	for i, c := range cols {
		names[i] = column(c)
	}
	q := fmt.Sprintf(`SELECT %s FROM nssPrivate WHERE %s = ? ORDER BY rowid`, strings.Join(names, ", "), column(ckaID))
	rows, err := db.keyDB.QueryContext(context.Background(), q, id)
	if err != nil {
		return nil, fmt.Errorf("nss: %s: read key4.db: %w", db.dir, err)
	}
	defer rows.Close()
	for rows.Next() {
		vals := make([]any, len(cols))
		ptrs := make([]any, len(cols))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		if err := rows.Scan(ptrs...); err != nil {
			return nil, fmt.Errorf("nss: %s: read key4.db: %w", db.dir, err)
		}
		attr := make(map[uint32]any, len(cols))
		for i, c := range cols {
			attr[c] = vals[i]
		}
		if cls, ok, err := attrULONG(attr[ckaClass]); err != nil || !ok || cls != ckoPrivateKey {
			continue
		}
		k, err := newKeyEntry(nick, attr, cert)
		if err != nil {
			return nil, fmt.Errorf("nss: %s: private key of %q: %w", db.dir, nick, err)
		}
		return k, nil
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("nss: %s: read key4.db: %w", db.dir, err)
	}
	if len(db.modules) > 0 {
		return nil, fmt.Errorf("nss: %s: certificate %q has no private key in key4.db (keys in the PKCS#11 modules of pkcs11.txt, %s, are not supported)", db.dir, nick, quoteList(db.modules))
	}
	return nil, fmt.Errorf("nss: %s: certificate %q has no private key in key4.db", db.dir, nick)
}

// newKeyEntry builds a locked key from its row, checking its public half
// against the certificate.
func newKeyEntry(nick string, attr map[uint32]any, cert *x509.Certificate) (*keyEntry, error) {
	typ, ok, err := attrULONG(attr[ckaKeyType])
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, errors.New("no key type")
	}
	k := &keyEntry{label: nick, typ: typ, enc: map[uint32][]byte{}}
	switch typ {
	case ckkRSA:
		n, ok1 := attrValue(attr[ckaModulus])
		e, ok2 := attrValue(attr[ckaPublicExponent])
		if !ok1 || !ok2 {
			return nil, errors.New("RSA key without modulus or public exponent")
		}
		if len(e) > 4 {
			return nil, fmt.Errorf("RSA public exponent of %d bytes", len(e))
		}
		pub := &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(new(big.Int).SetBytes(e).Int64())}
		if cp, ok := cert.PublicKey.(*rsa.PublicKey); !ok || !cp.Equal(pub) {
			return nil, errors.New("key does not match the certificate")
		}
		k.pub = pub
		for _, a := range rsaSensitive {
			v, ok := attrValue(attr[a])
			if !ok {
				return nil, fmt.Errorf("RSA key without attribute %s", column(a))
			}
			k.enc[a] = bytes.Clone(v)
		}
	case ckkEC:
		params, ok := attrValue(attr[ckaECParams])
		if !ok {
			return nil, errors.New("EC key without parameters")
		}
		curve, err := curveOf(params)
		if err != nil {
			return nil, err
		}
		cp, ok := cert.PublicKey.(*ecdsa.PublicKey)
		if !ok || cp.Curve != curve {
			return nil, errors.New("key does not match the certificate")
		}
		// The public point is checked against d once decrypted.
		k.pub, k.curve = cp, curve
		v, ok := attrValue(attr[ckaValue])
		if !ok {
			return nil, errors.New("EC key without value")
		}
		k.enc[ckaValue] = bytes.Clone(v)
	default:
		return nil, fmt.Errorf("unsupported key type %#x", typ)
	}
	return k, nil
}

// curveOf decodes CKA_EC_PARAMS, a DER named-curve OID.
func curveOf(params []byte) (elliptic.Curve, error) {
	var oid asn1.ObjectIdentifier
	if err := unmarshalAll(params, &oid); err != nil {
		return nil, fmt.Errorf("EC parameters: %w", err)
	}
	switch {
	case oid.Equal(asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}):
		return elliptic.P256(), nil
	case oid.Equal(asn1.ObjectIdentifier{1, 3, 132, 0, 34}):
		return elliptic.P384(), nil
	case oid.Equal(asn1.ObjectIdentifier{1, 3, 132, 0, 35}):
		return elliptic.P521(), nil
	}
	return nil, fmt.Errorf("unsupported EC curve %v", oid)
}

// Credentials implements token.Token.
func (t *Token) Credentials() []token.Credential { return t.creds }

// PIN implements token.Token: nil for an empty-password database.
func (t *Token) PIN() token.PIN {
	if !t.needsPW {
		return nil
	}
	return (*tokenPIN)(t)
}

// Unlock checks password against the database's password-check entry and
// decrypts the keys. A wrong password gives an error wrapping
// token.ErrPINIncorrect. For an empty-password database any password
// unlocks, as with libcacard. Unlock does not touch the PIN retry counter.
func (t *Token) Unlock(password []byte) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.unlockLocked(password)
}

func (t *Token) unlockLocked(password []byte) error {
	if !t.needsPW {
		// The keys are under the empty password whatever is typed.
		password = nil
	}
	if t.unlocked && !t.needsPW {
		return nil
	}
	switch err := checkPassword(t.salt, t.check, password); {
	case errors.Is(err, errWrongPassword):
		return fmt.Errorf("nss: wrong database password: %w", token.ErrPINIncorrect)
	case err != nil:
		return err
	}
	if t.unlocked {
		return nil
	}
	for _, k := range t.keys {
		if err := k.decrypt(t.salt, password); err != nil {
			// Leave every key locked rather than half the token.
			for _, k := range t.keys {
				k.rsa, k.ec = nil, nil
			}
			return fmt.Errorf("nss: private key of %q: %w", k.label, err)
		}
	}
	t.unlocked = true
	return nil
}

// decrypt decrypts the sensitive attributes and builds the private key,
// checking it against the public half.
func (k *keyEntry) decrypt(salt, pw []byte) error {
	plain := make(map[uint32][]byte, len(k.enc))
	for a, v := range k.enc {
		pt, err := decryptPBE(v, salt, pw, maxIterations)
		if err != nil {
			return fmt.Errorf("attribute %s: %w", column(a), err)
		}
		plain[a] = pt
	}
	switch k.typ {
	case ckkRSA:
		pub := k.pub.(*rsa.PublicKey)
		num := func(a uint32) *big.Int { return new(big.Int).SetBytes(plain[a]) }
		priv := &rsa.PrivateKey{
			PublicKey: rsa.PublicKey{N: new(big.Int).Set(pub.N), E: pub.E},
			D:         num(ckaPrivateExponent),
			Primes:    []*big.Int{num(ckaPrime1), num(ckaPrime2)},
		}
		// Precompute first: Validate then only checks consistency
		// instead of redoing the whole key check, and NewRSAKey's own
		// Precompute is free (half the cost of loading a token).
		priv.Precompute()
		if err := priv.Validate(); err != nil {
			return fmt.Errorf("decrypted RSA key is invalid: %w", err)
		}
		k.rsa = token.NewRSAKey(priv)
	case ckkEC:
		d := plain[ckaValue]
		size := (k.curve.Params().BitSize + 7) / 8
		if len(d) > size {
			return fmt.Errorf("EC private value of %d bytes for a %d-byte curve", len(d), size)
		}
		// NSS may drop leading zero bytes; the raw form is fixed-size.
		raw := make([]byte, size)
		copy(raw[size-len(d):], d)
		priv, err := ecdsa.ParseRawPrivateKey(k.curve, raw)
		if err != nil {
			return fmt.Errorf("decrypted EC key is invalid: %w", err)
		}
		if !priv.PublicKey.Equal(k.pub) {
			return errors.New("decrypted EC key does not match the certificate")
		}
		k.ec = priv
	}
	return nil
}

// PrivateKeys returns the decrypted private keys in credential order:
// *rsa.PrivateKey or *ecdsa.PrivateKey. Before Unlock (or a right PIN) on
// a password database it returns ErrLocked.
func (t *Token) PrivateKeys() ([]crypto.PrivateKey, error) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	if !t.unlocked {
		return nil, ErrLocked
	}
	out := make([]crypto.PrivateKey, len(t.keys))
	for i, k := range t.keys {
		switch {
		case k.rsa != nil:
			out[i] = k.rsa.PrivateKey
		case k.ec != nil:
			out[i] = k.ec
		default:
			return nil, ErrLocked
		}
	}
	return out, nil
}

// tokenPIN is a Token's PIN: the database password with an in-memory
// retry counter.
type tokenPIN Token

// Verify implements token.PIN: a right password unlocks the keys and
// resets the counter; a wrong one decrements it.
func (p *tokenPIN) Verify(pin []byte) (int, error) {
	t := (*Token)(p)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.tries <= 0 {
		return 0, token.ErrPINBlocked
	}
	err := t.unlockLocked(pin)
	switch {
	case errors.Is(err, token.ErrPINIncorrect):
		t.tries--
		return t.tries, fmt.Errorf("%w (%d tries left until restart)", err, t.tries)
	case err != nil:
		return t.tries, err
	}
	t.tries = MaxTries
	return t.tries, nil
}

// TriesLeft implements token.PIN.
func (p *tokenPIN) TriesLeft() (left, max int) {
	t := (*Token)(p)
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.tries, MaxTries
}

// rsaKey is a Token's RSA key; it implements token.Key, token.RawRSA and
// crypto.Decrypter, and fails with ErrLocked until the token is unlocked.
type rsaKey struct {
	e *keyEntry
}

var _ interface {
	token.Key
	token.RawRSA
	crypto.Decrypter
} = (*rsaKey)(nil)

func (k *rsaKey) key() (*token.RSAKey, error) {
	// The decrypted key is set under the Token's lock and immutable
	// afterwards.
	k.e.lock.RLock()
	defer k.e.lock.RUnlock()
	if k.e.rsa == nil {
		return nil, ErrLocked
	}
	return k.e.rsa, nil
}

// Public implements crypto.Signer; it works while locked.
func (k *rsaKey) Public() crypto.PublicKey { return k.e.pub }

// RawRSA implements token.RawRSA.
func (k *rsaKey) RawRSA(ctx context.Context, block []byte) ([]byte, error) {
	key, err := k.key()
	if err != nil {
		return nil, err
	}
	return key.RawRSA(ctx, block)
}

// Sign implements crypto.Signer.
func (k *rsaKey) Sign(rnd io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	key, err := k.key()
	if err != nil {
		return nil, err
	}
	return key.Sign(rnd, digest, opts)
}

// Decrypt implements crypto.Decrypter.
func (k *rsaKey) Decrypt(rnd io.Reader, msg []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	key, err := k.key()
	if err != nil {
		return nil, err
	}
	return key.Decrypt(rnd, msg, opts)
}

// ecKey is a Token's EC key (for PIV; CAC cards refuse it).
type ecKey struct {
	e *keyEntry
}

// Public implements crypto.Signer; it works while locked.
func (k *ecKey) Public() crypto.PublicKey { return k.e.pub }

// Sign implements crypto.Signer.
func (k *ecKey) Sign(rnd io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	k.e.lock.RLock()
	priv := k.e.ec
	k.e.lock.RUnlock()
	if priv == nil {
		return nil, ErrLocked
	}
	return priv.Sign(rnd, digest, opts)
}
