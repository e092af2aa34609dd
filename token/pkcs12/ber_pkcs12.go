package pkcs12

import (
	"crypto"
	"crypto/hmac"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"hash"
)

// Object identifiers of RFC 7292 and the algorithms NSS uses.
var (
	oidData          = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 1}
	oidEncryptedData = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 6}
	oidKeyBag        = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 12, 10, 1, 1}
	oidShroudedBag   = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 12, 10, 1, 2}
	oidCertBag       = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 12, 10, 1, 3}
	oidX509Cert      = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 9, 22, 1}

	oidSHA1   = asn1.ObjectIdentifier{1, 3, 14, 3, 2, 26}
	oidSHA256 = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 1}
	oidSHA384 = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 2}
	oidSHA512 = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 3}
)

// maxIterations bounds the KDF work a file can ask for. NSS 3.87 writes
// 600000 (peers.md §7.1); ten times that still finishes in seconds.
const maxIterations = 10_000_000

type pfxPDU struct {
	Version  int
	AuthSafe contentInfo
	MacData  macData `asn1:"optional"`
}

type contentInfo struct {
	ContentType asn1.ObjectIdentifier
	Content     asn1.RawValue `asn1:"optional"` // [0] EXPLICIT
}

type macData struct {
	Mac        digestInfo
	MacSalt    []byte
	Iterations int `asn1:"optional,default:1"`
}

type digestInfo struct {
	Algorithm pkix.AlgorithmIdentifier
	Digest    []byte
}

type encryptedData struct {
	Version              int
	EncryptedContentInfo encryptedContentInfo
}

type encryptedContentInfo struct {
	ContentType                asn1.ObjectIdentifier
	ContentEncryptionAlgorithm pkix.AlgorithmIdentifier
	EncryptedContent           asn1.RawValue `asn1:"optional"` // [0] IMPLICIT OCTET STRING
}

type safeBag struct {
	ID         asn1.ObjectIdentifier
	Value      asn1.RawValue `asn1:"tag:0,explicit"`
	Attributes asn1.RawValue `asn1:"optional"`
}

type certBag struct {
	ID   asn1.ObjectIdentifier
	Data []byte `asn1:"tag:0,explicit"`
}

type encryptedPrivateKeyInfo struct {
	Algorithm     pkix.AlgorithmIdentifier
	EncryptedData []byte
}

// unmarshalDER parses DER into out and rejects trailing data.
func unmarshalDER(in []byte, out any) error {
	rest, err := asn1.Unmarshal(in, out)
	if err != nil {
		return err
	}
	if len(rest) != 0 {
		return errors.New("trailing data")
	}
	return nil
}

// explicit0 returns the element inside a [0] EXPLICIT wrapper.
func explicit0(v asn1.RawValue) ([]byte, error) {
	if v.Class != asn1.ClassContextSpecific || v.Tag != 0 || !v.IsCompound {
		return nil, errors.New("missing [0] content")
	}
	return v.Bytes, nil
}

// octets returns the value of a DER OCTET STRING.
func octets(der []byte) ([]byte, error) {
	var b []byte
	if err := unmarshalDER(der, &b); err != nil {
		return nil, err
	}
	return b, nil
}

// decodeBER reads a file whose outer layer was BER; der is that layer
// normalized by BERToDER. The inner layers are still as the writer made
// them, so each is normalized before it is parsed.
func decodeBER(der []byte, password string, maxIter int) (*Bundle, error) {
	var pfx pfxPDU
	if err := unmarshalDER(der, &pfx); err != nil {
		return nil, fmt.Errorf("pkcs12: read PFX: %w", err)
	}
	if pfx.Version != 3 {
		return nil, fmt.Errorf("pkcs12: PFX version %d, want 3", pfx.Version)
	}
	if !pfx.AuthSafe.ContentType.Equal(oidData) {
		return nil, fmt.Errorf("pkcs12: public-key protected PFX (content type %v) is not supported", pfx.AuthSafe.ContentType)
	}
	inner, err := explicit0(pfx.AuthSafe.Content)
	if err != nil {
		return nil, fmt.Errorf("pkcs12: authSafe: %w", err)
	}
	authSafe, err := octets(inner)
	if err != nil {
		return nil, fmt.Errorf("pkcs12: authSafe: %w", err)
	}
	// The MAC covers the AuthenticatedSafe exactly as written, BER and
	// all (RFC 7292 §4), so it is checked before that is normalized.
	if len(pfx.MacData.Mac.Algorithm.Algorithm) == 0 {
		return nil, errors.New("pkcs12: file has no MAC (no password integrity); not supported")
	}
	if err := verifyMAC(&pfx.MacData, authSafe, password, maxIter); err != nil {
		return nil, err
	}
	authSafe, err = BERToDER(authSafe)
	if err != nil {
		return nil, fmt.Errorf("pkcs12: authenticated safe: %w", err)
	}
	var cis []contentInfo
	if err := unmarshalDER(authSafe, &cis); err != nil {
		return nil, fmt.Errorf("pkcs12: authenticated safe: %w", err)
	}
	b := new(Bundle)
	for i, ci := range cis {
		inner, err := explicit0(ci.Content)
		if err != nil {
			return nil, fmt.Errorf("pkcs12: content %d: %w", i+1, err)
		}
		var safe []byte
		switch {
		case ci.ContentType.Equal(oidData):
			if safe, err = octets(inner); err != nil {
				return nil, fmt.Errorf("pkcs12: content %d: %w", i+1, err)
			}
		case ci.ContentType.Equal(oidEncryptedData):
			var ed encryptedData
			if err := unmarshalDER(inner, &ed); err != nil {
				return nil, fmt.Errorf("pkcs12: content %d: %w", i+1, err)
			}
			ct, err := implicitOctets(ed.EncryptedContentInfo.EncryptedContent)
			if err != nil {
				return nil, fmt.Errorf("pkcs12: content %d: %w", i+1, err)
			}
			if safe, err = decrypt(ed.EncryptedContentInfo.ContentEncryptionAlgorithm, password, ct, maxIter); err != nil {
				return nil, fmt.Errorf("pkcs12: content %d: %w", i+1, err)
			}
		default:
			return nil, fmt.Errorf("pkcs12: content %d: type %v not supported", i+1, ci.ContentType)
		}
		if err := b.addSafeContents(safe, password, maxIter); err != nil {
			return nil, fmt.Errorf("pkcs12: content %d: %w", i+1, err)
		}
	}
	return b, nil
}

// implicitOctets reads encryptedContent [0] IMPLICIT OCTET STRING. NSS
// sends it constructed, as OCTET STRING segments, which BERToDER cannot
// join because an implicit tag hides the type; primitive is DER's form.
func implicitOctets(v asn1.RawValue) ([]byte, error) {
	if v.Class != asn1.ClassContextSpecific || v.Tag != 0 {
		return nil, errors.New("missing encrypted content")
	}
	if !v.IsCompound {
		return v.Bytes, nil
	}
	var out []byte
	rest := v.Bytes
	for len(rest) > 0 {
		var seg []byte
		var err error
		if rest, err = asn1.Unmarshal(rest, &seg); err != nil {
			return nil, fmt.Errorf("encrypted content segment: %w", err)
		}
		out = append(out, seg...)
	}
	return out, nil
}

func (b *Bundle) addSafeContents(ber []byte, password string, maxIter int) error {
	der, err := BERToDER(ber)
	if err != nil {
		return fmt.Errorf("safe contents: %w", err)
	}
	var bags []safeBag
	if err := unmarshalDER(der, &bags); err != nil {
		return fmt.Errorf("safe contents: %w", err)
	}
	for i, bag := range bags {
		switch {
		case bag.ID.Equal(oidCertBag):
			var cb certBag
			if err := unmarshalDER(bag.Value.Bytes, &cb); err != nil {
				return fmt.Errorf("bag %d: certificate bag: %w", i+1, err)
			}
			if !cb.ID.Equal(oidX509Cert) {
				continue // SDSI certificates: nothing a card can use
			}
			c, err := x509.ParseCertificate(cb.Data)
			if err != nil {
				return fmt.Errorf("bag %d: %w", i+1, err)
			}
			b.Certs = append(b.Certs, c)
		case bag.ID.Equal(oidKeyBag):
			k, err := parseKey(bag.Value.Bytes)
			if err != nil {
				return fmt.Errorf("bag %d: %w", i+1, err)
			}
			b.Keys = append(b.Keys, k)
		case bag.ID.Equal(oidShroudedBag):
			var epki encryptedPrivateKeyInfo
			if err := unmarshalDER(bag.Value.Bytes, &epki); err != nil {
				return fmt.Errorf("bag %d: shrouded key: %w", i+1, err)
			}
			plain, err := decrypt(epki.Algorithm, password, epki.EncryptedData, maxIter)
			if err != nil {
				return fmt.Errorf("bag %d: shrouded key: %w", i+1, err)
			}
			k, err := parseKey(plain)
			if err != nil {
				return fmt.Errorf("bag %d: %w", i+1, err)
			}
			b.Keys = append(b.Keys, k)
		}
		// CRL and secret bags carry nothing for a card; skipped.
	}
	return nil
}

func parseKey(ber []byte) (crypto.PrivateKey, error) {
	der, err := BERToDER(ber)
	if err != nil {
		return nil, fmt.Errorf("private key: %w", err)
	}
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("private key: %w", err)
	}
	return k, nil
}

func macHash(oid asn1.ObjectIdentifier) func() hash.Hash {
	switch {
	case oid.Equal(oidSHA1):
		return sha1.New
	case oid.Equal(oidSHA256):
		return sha256.New
	case oid.Equal(oidSHA384):
		return sha512.New384
	case oid.Equal(oidSHA512):
		return sha512.New
	}
	return nil
}

// verifyMAC checks the PKCS#12 MAC (RFC 7292 appendix B: HMAC keyed by
// the PKCS#12 KDF with ID 3).
func verifyMAC(md *macData, content []byte, password string, maxIter int) error {
	h := macHash(md.Mac.Algorithm.Algorithm)
	if h == nil {
		return fmt.Errorf("pkcs12: MAC algorithm %v not supported", md.Mac.Algorithm.Algorithm)
	}
	if md.Iterations < 1 || md.Iterations > maxIter {
		return fmt.Errorf("pkcs12: MAC iteration count %d out of range", md.Iterations)
	}
	pw, err := bmpPassword(password)
	if err != nil {
		return err
	}
	candidates := [][]byte{pw}
	if password == "" {
		// Writers disagree on the empty password: BMPString "\0\0" or
		// no bytes at all (RFC 7292 appendix B.1 allows both readings).
		candidates = append(candidates, nil)
	}
	for _, p := range candidates {
		key := kdf(h, p, md.MacSalt, md.Iterations, 3, h().Size())
		m := hmac.New(h, key)
		m.Write(content)
		if hmac.Equal(m.Sum(nil), md.Mac.Digest) {
			return nil
		}
	}
	return ErrWrongPassword
}
