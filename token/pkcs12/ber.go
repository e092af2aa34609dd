package pkcs12

import (
	"errors"
	"fmt"
)

// Bounds of BERToDER. PKCS#12 files nest about a dozen levels deep; 64
// leaves room for odd encoders while keeping the recursion (and so the
// stack) small whatever the input.
const (
	maxDepth = 64
	// MaxInput is the largest encoding BERToDER accepts. A PKCS#12 file
	// with a few certificates is a few KiB; 16 MiB bounds a wrong file.
	MaxInput = 16 << 20
)

// ErrBER is wrapped by every BERToDER error.
var ErrBER = errors.New("pkcs12: malformed BER")

// BERToDER re-encodes one BER element (X.690 §8) as DER (X.690 §10): every
// indefinite length becomes a definite one, every length takes its
// shortest form, and universal string types sent in constructed form
// (NSS pk12util chunks OCTET STRINGs: peers.md §7.1) become one primitive
// string. Primitive contents are copied unchanged, so an OCTET STRING that
// itself holds BER (as PKCS#12's AuthenticatedSafe does) must be
// normalized separately; that keeps MACs over it checkable.
//
// What BERToDER does not do: sort SET OF elements, or fix primitive
// encodings such as non-minimal INTEGERs and BOOLEANs other than 0xFF.
// Neither is needed to read PKCS#12. Trailing data after the element is an
// error.
func BERToDER(ber []byte) ([]byte, error) {
	if len(ber) > MaxInput {
		return nil, fmt.Errorf("%w: %d bytes, more than %d", ErrBER, len(ber), MaxInput)
	}
	out, n, err := normalize(ber, 0)
	if err != nil {
		return nil, err
	}
	if n != len(ber) {
		return nil, fmt.Errorf("%w: %d bytes of trailing data", ErrBER, len(ber)-n)
	}
	return out, nil
}

// header is a decoded identifier and length.
type header struct {
	ident       []byte // identifier octets as given
	class       byte   // 0 universal, 1 application, 2 context, 3 private
	constructed bool
	tag         int
	length      int // -1: indefinite
	hdrLen      int
}

// Universal tag numbers that BERToDER handles specially (X.680 §8.4).
const (
	tagEOC       = 0
	tagBitString = 3
	tagOctetStr  = 4
)

// isStringType reports the universal types that DER forbids in
// constructed form (X.690 §10.2): the bit, octet and character strings.
func isStringType(tag int) bool {
	switch tag {
	case tagBitString, tagOctetStr, 12, 18, 19, 20, 21, 22, 25, 26, 27, 28, 30:
		return true
	}
	return false
}

func readHeader(b []byte) (header, error) {
	var h header
	if len(b) < 2 {
		return h, fmt.Errorf("%w: truncated header", ErrBER)
	}
	h.class = b[0] >> 6
	h.constructed = b[0]&0x20 != 0
	h.tag = int(b[0] & 0x1f)
	i := 1
	if h.tag == 0x1f {
		// High tag number form (X.690 §8.1.2.4): base-128, at most 4
		// bytes (tag numbers below 2^28), first byte not 0x80 (minimal).
		h.tag = 0
		for {
			if i >= len(b) {
				return h, fmt.Errorf("%w: truncated tag", ErrBER)
			}
			if i > 4 {
				return h, fmt.Errorf("%w: tag number too large", ErrBER)
			}
			c := b[i]
			if i == 1 && c == 0x80 {
				return h, fmt.Errorf("%w: non-minimal tag number", ErrBER)
			}
			h.tag = h.tag<<7 | int(c&0x7f)
			i++
			if c&0x80 == 0 {
				break
			}
		}
		if h.tag < 0x1f {
			return h, fmt.Errorf("%w: high-form tag number %d below 31", ErrBER, h.tag)
		}
	}
	h.ident = b[:i]
	if i >= len(b) {
		return h, fmt.Errorf("%w: truncated length", ErrBER)
	}
	l := b[i]
	i++
	switch {
	case l < 0x80:
		h.length = int(l)
	case l == 0x80:
		if !h.constructed {
			return h, fmt.Errorf("%w: indefinite length on a primitive element", ErrBER)
		}
		h.length = -1
	case l == 0xff:
		return h, fmt.Errorf("%w: reserved length byte 0xff", ErrBER)
	default:
		n := int(l & 0x7f)
		if n > 4 {
			return h, fmt.Errorf("%w: %d-byte length", ErrBER, n)
		}
		if i+n > len(b) {
			return h, fmt.Errorf("%w: truncated length", ErrBER)
		}
		v := 0
		for _, c := range b[i : i+n] {
			v = v<<8 | int(c)
		}
		i += n
		h.length = v
	}
	h.hdrLen = i
	if h.length > len(b)-i {
		return h, fmt.Errorf("%w: length %d exceeds the %d bytes left", ErrBER, h.length, len(b)-i)
	}
	return h, nil
}

// appendLength appends a DER (shortest form) length.
func appendLength(dst []byte, n int) []byte {
	if n < 0x80 {
		return append(dst, byte(n))
	}
	var tmp [4]byte
	k := 0
	for v := n; v > 0; v >>= 8 {
		k++
	}
	for j := k - 1; j >= 0; j-- {
		tmp[k-1-j] = byte(n >> (8 * j))
	}
	dst = append(dst, 0x80|byte(k))
	return append(dst, tmp[:k]...)
}

func appendElement(dst, ident []byte, constructed bool, body []byte) []byte {
	id := ident[0] &^ 0x20
	if constructed {
		id |= 0x20
	}
	dst = append(dst, id)
	dst = append(dst, ident[1:]...)
	dst = appendLength(dst, len(body))
	return append(dst, body...)
}

// normalize reads one element from b and returns its DER encoding and the
// number of bytes of b it used.
func normalize(b []byte, depth int) ([]byte, int, error) {
	if depth > maxDepth {
		return nil, 0, fmt.Errorf("%w: nested deeper than %d", ErrBER, maxDepth)
	}
	h, err := readHeader(b)
	if err != nil {
		return nil, 0, err
	}
	if h.class == 0 && h.tag == tagEOC {
		return nil, 0, fmt.Errorf("%w: unexpected end-of-contents", ErrBER)
	}
	if !h.constructed {
		end := h.hdrLen + h.length
		if h.class == 0 && h.tag == tagBitString && h.length == 0 {
			return nil, 0, fmt.Errorf("%w: empty BIT STRING", ErrBER)
		}
		return appendElement(nil, h.ident, false, b[h.hdrLen:end]), end, nil
	}
	children, used, err := readChildren(b[h.hdrLen:], h.length, depth)
	if err != nil {
		return nil, 0, err
	}
	used += h.hdrLen
	if h.class == 0 && isStringType(h.tag) {
		body, err := joinString(h.tag, children)
		if err != nil {
			return nil, 0, err
		}
		return appendElement(nil, h.ident, false, body), used, nil
	}
	var body []byte
	for _, c := range children {
		body = append(body, c...)
	}
	return appendElement(nil, h.ident, true, body), used, nil
}

// readChildren normalizes the elements of a constructed encoding: length
// bytes of them, or up to the end-of-contents octets when length is -1. It
// returns the DER children and the bytes used (including the EOC).
func readChildren(b []byte, length, depth int) ([][]byte, int, error) {
	var children [][]byte
	if length >= 0 {
		b = b[:length]
	}
	off := 0
	for {
		if length >= 0 && off == length {
			return children, off, nil
		}
		if length < 0 {
			if off+2 <= len(b) && b[off] == 0 && b[off+1] == 0 {
				return children, off + 2, nil
			}
			if off >= len(b) {
				return nil, 0, fmt.Errorf("%w: missing end-of-contents", ErrBER)
			}
		}
		c, n, err := normalize(b[off:], depth+1)
		if err != nil {
			return nil, 0, err
		}
		children = append(children, c)
		off += n
	}
}

// joinString turns the DER-normalized segments of a constructed string
// into the contents of one primitive string (X.690 §8.7.3, §8.6.4). Each
// segment must be a primitive string of the same type (readChildren already
// flattened nested constructed segments into primitive ones).
func joinString(tag int, segs [][]byte) ([]byte, error) {
	var body []byte
	for i, s := range segs {
		h, err := readHeader(s)
		if err != nil {
			return nil, err
		}
		if h.class != 0 || h.tag != tag || h.constructed {
			return nil, fmt.Errorf("%w: segment of a constructed string type %d has type %d", ErrBER, tag, h.tag)
		}
		v := s[h.hdrLen:]
		if tag == tagBitString {
			// Each segment starts with its count of unused bits; only
			// the last segment may have any (X.690 §8.6.4).
			if i < len(segs)-1 && v[0] != 0 {
				return nil, fmt.Errorf("%w: unused bits in a middle BIT STRING segment", ErrBER)
			}
			if i == 0 {
				body = append(body, 0)
			}
			body[0] = v[0]
			v = v[1:]
		}
		body = append(body, v...)
	}
	if tag == tagBitString && len(body) == 0 {
		// A constructed BIT STRING with no segments is 0 bits.
		body = []byte{0}
	}
	return body, nil
}
