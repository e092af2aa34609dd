package apdu

import (
	"errors"
	"fmt"
)

// SW is a two-byte status word, SW1 in the high byte.
type SW uint16

// Status words used by vscard's cards. Names follow ISO 7816-4 wording.
const (
	SWOK                      SW = 0x9000
	SWBytesRemaining          SW = 0x6100 // low byte: remaining count, 00 = 256 or more
	SWVerifyFailed            SW = 0x63C0 // low nibble: tries left
	SWMemoryFailure           SW = 0x6581
	SWExecutionError          SW = 0x6500
	SWWrongLength             SW = 0x6700
	SWSecureMessaging         SW = 0x6882
	SWCommandNotAllowed       SW = 0x6900
	SWSecurityNotSatisfied    SW = 0x6982
	SWAuthBlocked             SW = 0x6983
	SWDataInvalid             SW = 0x6984
	SWConditionsNotSatisfied  SW = 0x6985
	SWWrongData               SW = 0x6A80
	SWFuncNotSupported        SW = 0x6A81
	SWFileNotFound            SW = 0x6A82
	SWIncorrectP1P2           SW = 0x6A86
	SWReferencedDataNotFound  SW = 0x6A88
	SWWrongP1P2               SW = 0x6B00
	SWWrongLe                 SW = 0x6C00 // low byte: exact length
	SWINSNotSupported         SW = 0x6D00
	SWCLANotSupported         SW = 0x6E00
	SWUnknown                 SW = 0x6F00
	SWWrongParametersP1P2Bits SW = 0x6A00
)

// SW1 and SW2 return the two bytes.
func (s SW) SW1() byte { return byte(s >> 8) }
func (s SW) SW2() byte { return byte(s) }

// String renders "90 00" style hex.
func (s SW) String() string { return fmt.Sprintf("%02X %02X", s.SW1(), s.SW2()) }

// WithLen builds SW1|len for the 61xx / 6Cxx families; n of 256 or more
// encodes as 00, as ISO 7816-4 and libcacard do.
func (s SW) WithLen(n int) SW {
	if n >= 256 || n < 0 {
		n = 0
	}
	return s&0xFF00 | SW(n)
}

// Response is a response APDU.
type Response struct {
	Data []byte
	SW   SW
}

// Status is shorthand for a response carrying only a status word.
func Status(sw SW) Response { return Response{SW: sw} }

// OK returns data with 90 00.
func OK(data []byte) Response { return Response{Data: data, SW: SWOK} }

// Bytes encodes data followed by SW1 SW2.
func (r Response) Bytes() []byte {
	out := make([]byte, len(r.Data)+2)
	copy(out, r.Data)
	out[len(r.Data)] = r.SW.SW1()
	out[len(r.Data)+1] = r.SW.SW2()
	return out
}

// AppendBytes appends the encoded response to dst.
func (r Response) AppendBytes(dst []byte) []byte {
	dst = append(dst, r.Data...)
	return append(dst, r.SW.SW1(), r.SW.SW2())
}

// ParseResponse splits a response APDU into data and status word.
func ParseResponse(b []byte) (Response, error) {
	if len(b) < 2 {
		return Response{}, errors.New("apdu: response shorter than 2 bytes")
	}
	n := len(b) - 2
	return Response{Data: b[:n], SW: SW(b[n])<<8 | SW(b[n+1])}, nil
}
