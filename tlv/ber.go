package tlv

import "fmt"

// BER is one BER-TLV element. Tag holds the tag bytes as a big-endian
// number (5F C1 05 is 0x5FC105), which is how PIV and ISO 7816 tables name
// tags. Constructed elements keep their encoded contents in Value; call
// ParseBER on Value to descend.
type BER struct {
	Tag   uint32
	Value []byte
}

// Constructed reports whether the tag's constructed bit (b6 of the first
// byte) is set.
func (e BER) Constructed() bool { return firstTagByte(e.Tag)&0x20 != 0 }

func firstTagByte(tag uint32) byte {
	for tag > 0xFF {
		tag >>= 8
	}
	return byte(tag)
}

// maxBERLen bounds lengths the decoder accepts; no smart-card object comes
// close, and it keeps a 4-byte length from meaning anything surprising.
const maxBERLen = 1 << 24

// AppendBERTag appends a tag given as a big-endian number.
func AppendBERTag(dst []byte, tag uint32) []byte {
	switch {
	case tag > 0xFFFFFF:
		return append(dst, byte(tag>>24), byte(tag>>16), byte(tag>>8), byte(tag))
	case tag > 0xFFFF:
		return append(dst, byte(tag>>16), byte(tag>>8), byte(tag))
	case tag > 0xFF:
		return append(dst, byte(tag>>8), byte(tag))
	}
	return append(dst, byte(tag))
}

// AppendBERLen appends a definite length in the shortest form.
func AppendBERLen(dst []byte, n int) []byte {
	switch {
	case n < 0x80:
		return append(dst, byte(n))
	case n <= 0xFF:
		return append(dst, 0x81, byte(n))
	case n <= 0xFFFF:
		return append(dst, 0x82, byte(n>>8), byte(n))
	}
	return append(dst, 0x83, byte(n>>16), byte(n>>8), byte(n))
}

// AppendBER appends tag, length and value.
func AppendBER(dst []byte, tag uint32, value []byte) []byte {
	dst = AppendBERTag(dst, tag)
	dst = AppendBERLen(dst, len(value))
	return append(dst, value...)
}

// EncodeBER encodes elements in order.
func EncodeBER(elems ...BER) []byte {
	var out []byte
	for _, e := range elems {
		out = AppendBER(out, e.Tag, e.Value)
	}
	return out
}

// ReadBER decodes the first element of b and returns it with the rest of b.
// Value aliases b.
func ReadBER(b []byte) (BER, []byte, error) {
	if len(b) == 0 {
		return BER{}, nil, fmt.Errorf("%w: BER-TLV empty", ErrMalformed)
	}
	tag := uint32(b[0])
	i := 1
	if b[0]&0x1F == 0x1F {
		for {
			if i >= len(b) {
				return BER{}, nil, fmt.Errorf("%w: BER-TLV tag truncated", ErrMalformed)
			}
			if i >= 4 {
				return BER{}, nil, fmt.Errorf("%w: BER-TLV tag longer than 4 bytes", ErrMalformed)
			}
			tag = tag<<8 | uint32(b[i])
			i++
			if b[i-1]&0x80 == 0 {
				break
			}
		}
	}
	if i >= len(b) {
		return BER{}, nil, fmt.Errorf("%w: BER-TLV length missing for tag %X", ErrMalformed, tag)
	}
	l := b[i]
	i++
	var n int
	switch {
	case l < 0x80:
		n = int(l)
	case l == 0x80:
		return BER{}, nil, fmt.Errorf("%w: BER-TLV indefinite length for tag %X", ErrMalformed, tag)
	case l <= 0x84:
		k := int(l & 0x7F)
		if len(b)-i < k {
			return BER{}, nil, fmt.Errorf("%w: BER-TLV length truncated for tag %X", ErrMalformed, tag)
		}
		for j := 0; j < k; j++ {
			n = n<<8 | int(b[i+j])
		}
		i += k
		if n > maxBERLen {
			return BER{}, nil, fmt.Errorf("%w: BER-TLV length %d too large", ErrMalformed, n)
		}
	default:
		return BER{}, nil, fmt.Errorf("%w: BER-TLV length byte %02X", ErrMalformed, l)
	}
	if n > len(b)-i {
		return BER{}, nil, fmt.Errorf("%w: BER-TLV tag %X length %d exceeds %d remaining", ErrMalformed, tag, n, len(b)-i)
	}
	return BER{Tag: tag, Value: b[i : i+n]}, b[i+n:], nil
}

// ParseBER decodes a concatenation of BER-TLV elements at one level.
func ParseBER(b []byte) ([]BER, error) {
	var out []BER
	for len(b) > 0 {
		e, rest, err := ReadBER(b)
		if err != nil {
			return nil, err
		}
		out = append(out, e)
		b = rest
	}
	return out, nil
}

// FindBER returns the value of the first element with the given tag at one
// level of b.
func FindBER(b []byte, tag uint32) ([]byte, bool) {
	elems, err := ParseBER(b)
	if err != nil {
		return nil, false
	}
	for _, e := range elems {
		if e.Tag == tag {
			return e.Value, true
		}
	}
	return nil, false
}
