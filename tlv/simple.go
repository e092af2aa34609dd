// Package tlv encodes and decodes the two tag-length-value grammars smart
// cards use: SimpleTLV (ISO 7816-4 §5.2.1, the CAC/GSC-IS buffers) and
// BER-TLV (ISO 7816-4 §5.2.2 / X.690, PIV and most ISO objects).
//
// SimpleTLV has a one-byte tag (01 to FE) and a length of one byte for 0 to
// 254, or FF followed by a little-endian 16-bit length. The little-endian
// form is what GSC-IS and libcacard use (shared reference cac.md §5.1), not
// the big-endian form of ISO 7816-4. A length of 255 therefore takes the
// three-byte form.
//
// Decoders never allocate more than their input and never panic; every
// truncation or overflow is an error wrapping ErrMalformed.
package tlv

import (
	"errors"
	"fmt"
)

// ErrMalformed is wrapped by every decoding error.
var ErrMalformed = errors.New("tlv: malformed")

// MaxSimpleLen is the longest value a SimpleTLV length can express.
const MaxSimpleLen = 0xFFFE

// Simple is one SimpleTLV element.
type Simple struct {
	Tag   byte
	Value []byte
}

// AppendSimpleHeader appends the tag and length of a SimpleTLV element with
// a value of n bytes. It returns an error for tags 00/FF and n > 0xFFFE.
func AppendSimpleHeader(dst []byte, tag byte, n int) ([]byte, error) {
	if tag == 0x00 || tag == 0xFF {
		return dst, fmt.Errorf("tlv: SimpleTLV tag %02X is reserved", tag)
	}
	if n < 0 || n > MaxSimpleLen {
		return dst, fmt.Errorf("tlv: SimpleTLV length %d out of range", n)
	}
	if n < 0xFF {
		return append(dst, tag, byte(n)), nil
	}
	return append(dst, tag, 0xFF, byte(n), byte(n>>8)), nil
}

// AppendSimple appends a whole SimpleTLV element.
func AppendSimple(dst []byte, tag byte, value []byte) ([]byte, error) {
	dst, err := AppendSimpleHeader(dst, tag, len(value))
	if err != nil {
		return dst, err
	}
	return append(dst, value...), nil
}

// EncodeSimple encodes elements in order, headers and values interleaved.
func EncodeSimple(elems ...Simple) ([]byte, error) {
	var out []byte
	var err error
	for _, e := range elems {
		if out, err = AppendSimple(out, e.Tag, e.Value); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// SplitSimple encodes elements as a CAC T-buffer (tags and lengths only) and
// V-buffer (values only), the layout of GSC-IS "TV" objects.
func SplitSimple(elems ...Simple) (t, v []byte, err error) {
	for _, e := range elems {
		if t, err = AppendSimpleHeader(t, e.Tag, len(e.Value)); err != nil {
			return nil, nil, err
		}
		v = append(v, e.Value...)
	}
	return t, v, nil
}

// readSimpleHeader reads one tag and length at b[0:].
func readSimpleHeader(b []byte) (tag byte, n, hdr int, err error) {
	if len(b) < 2 {
		return 0, 0, 0, fmt.Errorf("%w: SimpleTLV header truncated", ErrMalformed)
	}
	tag = b[0]
	if tag == 0x00 || tag == 0xFF {
		return 0, 0, 0, fmt.Errorf("%w: SimpleTLV tag %02X", ErrMalformed, tag)
	}
	if b[1] != 0xFF {
		return tag, int(b[1]), 2, nil
	}
	if len(b) < 4 {
		return 0, 0, 0, fmt.Errorf("%w: SimpleTLV long length truncated", ErrMalformed)
	}
	return tag, int(b[2]) | int(b[3])<<8, 4, nil
}

// ParseSimple decodes a concatenation of SimpleTLV elements. Values alias b.
func ParseSimple(b []byte) ([]Simple, error) {
	var out []Simple
	for len(b) > 0 {
		tag, n, hdr, err := readSimpleHeader(b)
		if err != nil {
			return nil, err
		}
		if n > len(b)-hdr {
			return nil, fmt.Errorf("%w: SimpleTLV tag %02X length %d exceeds %d remaining", ErrMalformed, tag, n, len(b)-hdr)
		}
		out = append(out, Simple{Tag: tag, Value: b[hdr : hdr+n]})
		b = b[hdr+n:]
	}
	return out, nil
}

// JoinSimple decodes a T-buffer and V-buffer pair (as read from a CAC
// applet, without their 2-byte length prefixes) back into elements.
func JoinSimple(t, v []byte) ([]Simple, error) {
	var out []Simple
	for len(t) > 0 {
		tag, n, hdr, err := readSimpleHeader(t)
		if err != nil {
			return nil, err
		}
		if n > len(v) {
			return nil, fmt.Errorf("%w: T-buffer tag %02X wants %d value bytes, V-buffer has %d", ErrMalformed, tag, n, len(v))
		}
		out = append(out, Simple{Tag: tag, Value: v[:n]})
		t, v = t[hdr:], v[n:]
	}
	if len(v) != 0 {
		return nil, fmt.Errorf("%w: %d V-buffer bytes left over", ErrMalformed, len(v))
	}
	return out, nil
}
