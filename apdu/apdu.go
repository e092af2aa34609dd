// Package apdu parses and builds ISO/IEC 7816-4 application protocol data
// units: command APDUs in the four cases, short and extended, and response
// APDUs with their status words.
//
// Parsing follows the rules libcacard applies (see shared reference cac.md
// §2.1), which are the ISO rules with one convention made explicit: an absent
// Le is reported as Ne = 0, not as "maximum". Cards that answer data-returning
// commands with 61xx when Ne is 0 depend on this, because T=0 hosts (OpenSC,
// CoolKey, Windows) drop Le from case-4 commands.
package apdu

import (
	"encoding/hex"
	"errors"
	"fmt"
)

// ErrMalformed is returned (wrapped) for a command APDU whose length does not
// match any ISO 7816-4 case. Cards answer it with SWWrongLength (67 00).
var ErrMalformed = errors.New("apdu: malformed command")

// Case is the ISO 7816-4 command case.
type Case uint8

// The four command cases.
const (
	Case1 Case = 1 // no data, no Le
	Case2 Case = 2 // Le only
	Case3 Case = 3 // data only
	Case4 Case = 4 // data and Le
)

// MaxShortNe and MaxExtendedNe are the largest response lengths a short or
// extended Le can ask for.
const (
	MaxShortNe    = 256
	MaxExtendedNe = 65536
)

// Command is a parsed command APDU.
type Command struct {
	CLA, INS, P1, P2 byte
	// Data is the command body (Lc bytes). It aliases the parsed input.
	Data []byte
	// Ne is the expected response length: 0 when Le is absent, 256 for a
	// short Le of 00, 65536 for an extended Le of 0000.
	Ne int
	// HasLe reports whether the command carried an Le field at all.
	HasLe bool
	// Extended reports whether Lc/Le used the extended (3- or 2-byte) form.
	Extended bool
	Case     Case
}

// Parse decodes a command APDU. The returned Command's Data aliases b.
// A length that matches no case gives an error wrapping ErrMalformed.
func Parse(b []byte) (Command, error) {
	if len(b) < 4 {
		return Command{}, fmt.Errorf("%w: %d bytes, need at least 4", ErrMalformed, len(b))
	}
	c := Command{CLA: b[0], INS: b[1], P1: b[2], P2: b[3], Case: Case1}
	body := b[4:]
	switch {
	case len(body) == 0:
		return c, nil
	case len(body) == 1:
		c.Case, c.HasLe = Case2, true
		c.Ne = shortNe(body[0])
		return c, nil
	case body[0] != 0:
		// Short form: P3 is Lc.
		lc := int(body[0])
		switch len(body) {
		case 1 + lc:
			c.Case, c.Data = Case3, body[1:1+lc]
		case 2 + lc:
			c.Case, c.Data, c.HasLe = Case4, body[1:1+lc], true
			c.Ne = shortNe(body[1+lc])
		default:
			return Command{}, fmt.Errorf("%w: short Lc %d with %d body bytes", ErrMalformed, lc, len(body))
		}
		return c, nil
	}
	// Extended form: P3 is 00 and the APDU is longer than 5 bytes.
	c.Extended = true
	if len(body) == 3 {
		c.Case, c.HasLe = Case2, true
		c.Ne = extendedNe(body[1], body[2])
		return c, nil
	}
	if len(body) < 3 {
		return Command{}, fmt.Errorf("%w: truncated extended length", ErrMalformed)
	}
	lc := int(body[1])<<8 | int(body[2])
	if lc == 0 {
		return Command{}, fmt.Errorf("%w: extended Lc of 0", ErrMalformed)
	}
	switch len(body) {
	case 3 + lc:
		c.Case, c.Data = Case3, body[3:3+lc]
	case 5 + lc:
		c.Case, c.Data, c.HasLe = Case4, body[3:3+lc], true
		c.Ne = extendedNe(body[3+lc], body[4+lc])
	default:
		return Command{}, fmt.Errorf("%w: extended Lc %d with %d body bytes", ErrMalformed, lc, len(body))
	}
	return c, nil
}

func shortNe(le byte) int {
	if le == 0 {
		return MaxShortNe
	}
	return int(le)
}

func extendedNe(hi, lo byte) int {
	n := int(hi)<<8 | int(lo)
	if n == 0 {
		return MaxExtendedNe
	}
	return n
}

// Bytes encodes the command. It picks the extended form when the data or Ne
// do not fit the short form, or when c.Extended is set. Ne = 0 with HasLe
// false omits Le.
func (c Command) Bytes() []byte {
	ext := c.Extended || len(c.Data) > 255 || c.Ne > MaxShortNe
	hasLe := c.HasLe || c.Ne > 0
	out := make([]byte, 0, 4+3+len(c.Data)+2)
	out = append(out, c.CLA, c.INS, c.P1, c.P2)
	if len(c.Data) > 0 {
		if ext {
			out = append(out, 0, byte(len(c.Data)>>8), byte(len(c.Data)))
		} else {
			out = append(out, byte(len(c.Data)))
		}
		out = append(out, c.Data...)
	}
	if hasLe {
		switch {
		case ext && len(c.Data) == 0:
			out = append(out, 0, byte(c.Ne>>8), byte(c.Ne))
		case ext:
			out = append(out, byte(c.Ne>>8), byte(c.Ne))
		default:
			out = append(out, byte(c.Ne)) // 256 encodes as 00
		}
	}
	return out
}

// String renders the command as upper-case hex, for traces.
func (c Command) String() string { return fmt.Sprintf("%X", c.Bytes()) }

// ParseHex decodes a hex string (spaces and colons allowed) into bytes.
func ParseHex(s string) ([]byte, error) {
	clean := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case ' ', ':', '\t', '\n', '\r':
			continue
		}
		clean = append(clean, s[i])
	}
	out := make([]byte, hex.DecodedLen(len(clean)))
	if _, err := hex.Decode(out, clean); err != nil {
		return nil, fmt.Errorf("apdu: hex: %w", err)
	}
	return out, nil
}
