package e2e

import (
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"fmt"
	"regexp"
	"strings"
)

// Parsers for pkcs11-tool 0.23's human-readable output. They are kept loose
// on whitespace but strict on the fields the tests assert.

// slot is one "Slot N (0xID): READER" block of `pkcs11-tool -L`.
type slot struct {
	id     string // "0x0": what --slot takes
	reader string
	empty  bool
	fields map[string]string // "token label" -> "CAC II", ...
}

var slotRe = regexp.MustCompile(`^Slot \d+ \((0x[0-9a-fA-F]+)\): (.*\S)\s*$`)

func parseSlots(out string) []slot {
	var slots []slot
	for _, line := range strings.Split(out, "\n") {
		if m := slotRe.FindStringSubmatch(line); m != nil {
			slots = append(slots, slot{id: m[1], reader: m[2], fields: map[string]string{}})
			continue
		}
		if len(slots) == 0 || !strings.HasPrefix(line, "  ") {
			continue
		}
		cur := &slots[len(slots)-1]
		l := strings.TrimSpace(line)
		if l == "(empty)" {
			cur.empty = true
			continue
		}
		if k, v, ok := strings.Cut(l, ":"); ok {
			cur.fields[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return slots
}

// tokens returns the slots that hold a token.
func tokens(slots []slot) []slot {
	var out []slot
	for _, s := range slots {
		if !s.empty && s.fields["token label"] != "" {
			out = append(out, s)
		}
	}
	return out
}

// object is one object of `pkcs11-tool -O`.
type object struct {
	kind  string // "Certificate", "Public Key", "Private Key", "Data"
	label string
	id    string // lower-case hex, as printed ("0001")
	head  string // the header line, e.g. "Public Key Object; RSA 2048 bits"
}

func (o object) String() string { return fmt.Sprintf("%s %q id=%s", o.kind, o.label, o.id) }

func parseObjects(out string) []object {
	var objs []object
	for _, line := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(line, "Certificate Object"):
			objs = append(objs, object{kind: "Certificate", head: line})
		case strings.HasPrefix(line, "Public Key Object"):
			objs = append(objs, object{kind: "Public Key", head: line})
		case strings.HasPrefix(line, "Private Key Object"):
			objs = append(objs, object{kind: "Private Key", head: line})
		case strings.HasPrefix(line, "Data object"):
			objs = append(objs, object{kind: "Data", head: line})
		case strings.HasPrefix(line, " ") && len(objs) > 0:
			k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
			if !ok {
				continue
			}
			cur := &objs[len(objs)-1]
			v = strings.TrimSpace(v)
			switch strings.TrimSpace(k) {
			case "label":
				cur.label = strings.Trim(v, "'")
			case "ID":
				cur.id = strings.ToLower(v)
			}
		}
	}
	return objs
}

func ofKind(objs []object, kind string) []object {
	var out []object
	for _, o := range objs {
		if o.kind == kind {
			out = append(out, o)
		}
	}
	return out
}

// cacLabels are the labels OpenSC's pkcs15-cac gives the three PKI applets'
// objects, in applet order (cac.md §8.3), with their IDs.
var cacLabels = []struct{ id, label string }{
	{"0001", "CAC ID Certificate"},
	{"0002", "CAC Email Signature Certificate"},
	{"0003", "CAC Email Encryption Certificate"},
}

// verifyPKCS1SHA256 checks an RSASSA-PKCS1-v1_5 SHA-256 signature with the
// certificate's key, independently of openssl.
func verifyPKCS1SHA256(certDER, data, sig []byte) error {
	cert, err := x509.ParseCertificate(certDER)
	if err != nil {
		return fmt.Errorf("parse certificate: %w", err)
	}
	pub, ok := cert.PublicKey.(*rsa.PublicKey)
	if !ok {
		return fmt.Errorf("certificate key is %T, want RSA", cert.PublicKey)
	}
	h := sha256.Sum256(data)
	return rsa.VerifyPKCS1v15(pub, crypto.SHA256, h[:], sig)
}

// sha256DigestInfo is the DER prefix of DigestInfo{sha256, OCTET STRING(32)}
// (RFC 8017 §9.2 note 1): signing prefix||hash with CKM_RSA_PKCS equals a
// SHA256-RSA-PKCS signature of the data.
var sha256DigestInfo = []byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}
