package piv

import (
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/vscard/vscard/tlv"
)

// Data object tags (SP 800-73-4 Part 1 table 3, cac.md §11).
const (
	TagCCC          uint32 = 0x5FC107
	TagCHUID        uint32 = 0x5FC102
	TagSecurity     uint32 = 0x5FC106
	TagPrinted      uint32 = 0x5FC109
	TagKeyHistory   uint32 = 0x5FC10C
	TagFingerprints uint32 = 0x5FC103
	TagFacialImage  uint32 = 0x5FC108
	TagIris         uint32 = 0x5FC121
	TagDiscovery    uint32 = 0x7E
	TagBITGroup     uint32 = 0x7F61
)

// aid is the PIV application identifier: RID A0 00 00 03 08, PIX
// 00 00 10 00 01 00 (SP 800-73-4 Part 1 §2.2).
var aid = []byte{0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00}

// CertTag returns the data object tag holding the certificate of key
// reference ref: 9A→5FC105, 9C→5FC10A, 9D→5FC10B, 9E→5FC101 and the
// retired key references 82..95→5FC10D..5FC120.
func CertTag(ref byte) (uint32, bool) {
	switch ref {
	case KeyAuthentication:
		return 0x5FC105, true
	case KeySignature:
		return 0x5FC10A, true
	case KeyManagement:
		return 0x5FC10B, true
	case KeyCardAuthentication:
		return 0x5FC101, true
	}
	if ref >= 0x82 && ref <= 0x95 {
		return 0x5FC10D + uint32(ref-0x82), true
	}
	return 0, false
}

// CertObject encodes a certificate as the content of its 53 template:
// 70 DER, 71 00 (CertInfo: not compressed), FE 00 (error detection code).
func CertObject(der []byte) []byte {
	out := make([]byte, 0, len(der)+16)
	out = tlv.AppendBER(out, 0x70, der)
	out = tlv.AppendBER(out, 0x71, []byte{0x00})
	return tlv.AppendBER(out, 0xFE, nil)
}

// Personalization is what a new card gets: a CHUID with a random GUID and
// a FASC-N unique per card, CCC, Discovery, Key History, Printed
// Information and the certificate objects.
type Personalization struct {
	Certs  map[byte]*x509.Certificate // by key reference
	Expiry time.Time                  // CHUID expiration date; zero = 10 years from now
	Rand   io.Reader                  // nil = crypto/rand
}

// Personalize writes the card's data objects to st (keys are stored by the
// caller with st.SetKey).
func Personalize(st Store, p Personalization) error {
	rnd := p.Rand
	if rnd == nil {
		rnd = rand.Reader
	}
	expiry := p.Expiry
	if expiry.IsZero() {
		expiry = time.Now().AddDate(10, 0, 0)
	}
	var r [16 + 14 + 6]byte
	if _, err := io.ReadFull(rnd, r[:]); err != nil {
		return fmt.Errorf("piv: personalize: random: %w", err)
	}
	guid, cardID, cred := r[:16], r[16:30], r[30:36]

	retired := 0
	for ref, cert := range p.Certs {
		tag, ok := CertTag(ref)
		if !ok {
			return fmt.Errorf("piv: personalize: key reference %02X has no certificate object", ref)
		}
		if cert == nil {
			continue
		}
		if ref >= 0x82 && ref <= 0x95 {
			retired++
		}
		if err := st.PutObject(tag, CertObject(cert.Raw)); err != nil {
			return fmt.Errorf("piv: personalize: certificate %02X: %w", ref, err)
		}
	}
	objs := []struct {
		tag   uint32
		value []byte
	}{
		{TagCHUID, chuid(fascn(cred), guid, expiry)},
		{TagCCC, ccc(cardID)},
		{TagDiscovery, discovery()},
		{TagKeyHistory, keyHistory(retired)},
		{TagPrinted, printed(expiry)},
	}
	for _, o := range objs {
		if err := st.PutObject(o.tag, o.value); err != nil {
			return fmt.Errorf("piv: personalize: object %X: %w", o.tag, err)
		}
	}
	return nil
}

// chuid builds the Card Holder Unique Identifier (SP 800-73-4 Part 1
// table 9): FASC-N, GUID, expiration date, an empty issuer signature (no
// issuer signs a virtual card; OpenSC and Yubico's tools read but do not
// check it) and the error detection code.
func chuid(fascn, guid []byte, expiry time.Time) []byte {
	var out []byte
	out = tlv.AppendBER(out, 0x30, fascn)
	out = tlv.AppendBER(out, 0x34, guid)
	out = tlv.AppendBER(out, 0x35, []byte(expiry.UTC().Format("20060102")))
	out = tlv.AppendBER(out, 0x3E, nil)
	return tlv.AppendBER(out, 0xFE, nil)
}

// fascn encodes a FASC-N (TIG SCEPACS, 25 bytes): 40 characters of
// 4-bit BCD, least significant bit first, each followed by an odd parity
// bit, packed most significant bit first. Agency and system codes are
// 9999/9999 (test credentials); the credential number comes from cred so
// that every card differs.
func fascn(cred []byte) []byte {
	const ss, fs, es = 0xB, 0xD, 0xF
	var credNum [6]byte
	for i := range credNum {
		credNum[i] = cred[i%len(cred)] % 10
	}
	chars := []byte{ss, 9, 9, 9, 9, fs, 9, 9, 9, 9, fs}
	chars = append(chars, credNum[:]...)
	chars = append(chars, fs, 1, fs, 1, fs)             // credential series, individual credential issue
	chars = append(chars, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0) // person identifier
	chars = append(chars, 1, 9, 9, 9, 9, 1, es)         // organizational category/identifier, association
	var lrc byte
	for _, c := range chars {
		lrc ^= c
	}
	chars = append(chars, lrc&0xF)

	out := make([]byte, 25)
	bit := 0
	put := func(b byte) {
		if b != 0 {
			out[bit/8] |= 0x80 >> (bit % 8)
		}
		bit++
	}
	for _, c := range chars {
		ones := 0
		for i := 0; i < 4; i++ {
			b := c >> i & 1
			ones += int(b)
			put(b)
		}
		put(byte(1 - ones%2))
	}
	return out
}

// ccc builds a Card Capability Container (SP 800-73-4 Part 1 table 8,
// cac.md §5.4): card identifier F0 with the GSC-RID A0 00 00 01 16, FF
// (manufacturer), 02 (card type: Java) and 14 per-card bytes; versions;
// empty registered data model and access control rules. The RID is not
// the CAC one (A0 00 00 00 79), so OpenSC does not type the card as a
// dual CAC (cac.md §11).
func ccc(cardID []byte) []byte {
	id := append([]byte{0xA0, 0x00, 0x00, 0x01, 0x16, 0xFF, 0x02}, cardID...)
	var out []byte
	out = tlv.AppendBER(out, 0xF0, id)
	out = tlv.AppendBER(out, 0xF1, []byte{0x21})
	out = tlv.AppendBER(out, 0xF2, []byte{0x21})
	out = tlv.AppendBER(out, 0xF3, nil)
	out = tlv.AppendBER(out, 0xF4, []byte{0x00})
	out = tlv.AppendBER(out, 0xF5, []byte{0x10})
	out = tlv.AppendBER(out, 0xF6, nil)
	out = tlv.AppendBER(out, 0xF7, nil)
	out = tlv.AppendBER(out, 0xFA, nil)
	out = tlv.AppendBER(out, 0xFB, nil)
	out = tlv.AppendBER(out, 0xFC, nil)
	out = tlv.AppendBER(out, 0xFD, nil)
	return tlv.AppendBER(out, 0xFE, nil)
}

// discovery is the Discovery object's content (SP 800-73-4 Part 1 table
// 18): the PIV AID and the PIN usage policy 40 00 (only the PIV
// application PIN satisfies access rules; no global PIN).
func discovery() []byte {
	var out []byte
	out = tlv.AppendBER(out, 0x4F, aid)
	return tlv.AppendBER(out, 0x5F2F, []byte{0x40, 0x00})
}

// keyHistory is the Key History object (SP 800-73-4 Part 1 table 19):
// retired keys with their certificates on the card, none off card.
func keyHistory(onCard int) []byte {
	var out []byte
	out = tlv.AppendBER(out, 0xC1, []byte{byte(onCard)})
	out = tlv.AppendBER(out, 0xC2, []byte{0x00})
	return tlv.AppendBER(out, 0xFE, nil)
}

// printed is the Printed Information object (SP 800-73-4 Part 1 table
// 12): name, affiliation, expiration date (YYYYMMMDD), card serial,
// issuer.
func printed(expiry time.Time) []byte {
	var out []byte
	out = tlv.AppendBER(out, 0x01, []byte("vscard virtual PIV"))
	out = tlv.AppendBER(out, 0x02, []byte("vscard"))
	out = tlv.AppendBER(out, 0x04, []byte(strings.ToUpper(expiry.UTC().Format("2006Jan02"))))
	out = tlv.AppendBER(out, 0x05, []byte("vscard"))
	out = tlv.AppendBER(out, 0x06, []byte("vscard"))
	return tlv.AppendBER(out, 0xFE, nil)
}
