package nss

import (
	"encoding/binary"
	"fmt"
)

// PKCS#11 attribute types used here; the sqlite column of attribute T is
// "a" + T in lower-case hex (peers.md §6.1).
const (
	ckaClass           = 0x0
	ckaLabel           = 0x3
	ckaValue           = 0x11
	ckaCertificateType = 0x80
	ckaKeyType         = 0x100
	ckaID              = 0x102
	ckaModulus         = 0x120
	ckaPublicExponent  = 0x122
	ckaPrivateExponent = 0x123
	ckaPrime1          = 0x124
	ckaPrime2          = 0x125
	ckaExponent1       = 0x126
	ckaExponent2       = 0x127
	ckaCoefficient     = 0x128
	ckaECParams        = 0x180
)

// Values of CKA_CLASS, CKA_KEY_TYPE and CKA_CERTIFICATE_TYPE.
const (
	ckoCertificate = 0x1
	ckoPrivateKey  = 0x3
	ckkRSA         = 0x0
	ckkEC          = 0x3
	ckcX509        = 0x0
)

// column returns the sqlite column name of attribute typ.
func column(typ uint32) string { return fmt.Sprintf("a%x", typ) }

// attrValue decodes a stored attribute. NSS writes an empty or absent
// value as the sentinel A5 00 5A rather than SQL NULL (peers.md §6.1);
// unset columns are NULL. ok is false for both.
func attrValue(v any) (b []byte, ok bool) {
	switch v := v.(type) {
	case []byte:
		b = v
	case string:
		// modernc returns TEXT-affinity values as string; NSS writes
		// blobs, but a database edited by hand may not.
		b = []byte(v)
	default:
		return nil, false
	}
	if len(b) == 3 && b[0] == 0xA5 && b[1] == 0x00 && b[2] == 0x5A {
		return nil, false
	}
	return b, true
}

// attrULONG decodes a CK_ULONG attribute: NSS stores it as 4 bytes,
// big-endian, whatever the platform (peers.md §6.1).
func attrULONG(v any) (uint32, bool, error) {
	b, ok := attrValue(v)
	if !ok {
		return 0, false, nil
	}
	if len(b) != 4 {
		return 0, false, fmt.Errorf("nss: CK_ULONG attribute of %d bytes, want 4", len(b))
	}
	return binary.BigEndian.Uint32(b), true, nil
}
