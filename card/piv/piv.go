// Package piv is vscard's PIV personality: a virtual card with the NIST
// SP 800-73-4 PIV application (shared reference cac.md §11), managed with
// the usual PIV tools (OpenSC, yubico-piv-tool).
//
// # Model
//
// A Card is a card.Engine with one applet, the PIV application, selected
// by its AID or any right-truncated prefix of it down to the 5-byte RID
// (OpenSC sends 9 bytes, Yubico and piv-go send 5). Everything that
// survives a restart (data objects, private keys, PIN, PUK, card
// management key) lives in a Store; the Card keeps only volatile state:
// whether the PIN and the management key were verified this session, a
// pending management-key challenge, and a command-chaining buffer. Every
// state change is written through the Store before the card answers 90 00.
//
// Key references follow the PIN policy of their slot: 9A, 9D and the
// retired slots 82–95 need the PIN once per session, 9C needs it
// immediately before every use, and 9E never needs it. GENERATE
// ASYMMETRIC KEY PAIR and PUT DATA need the card management key (9B).
//
// The card also answers the Yubico vendor commands yubico-piv-tool relies
// on (GET VERSION, GET SERIAL, SET MANAGEMENT KEY), reporting
// Options.Version, so the tool stays on the code paths the card
// implements. PINs and keys are never logged.
package piv

import (
	"context"
	"errors"
	"log/slog"

	"github.com/vscard/vscard/card"
)

// Key references and algorithm identifiers (SP 800-73-4 Part 1 tables
// 4b and 5, cac.md §11; 16 is Yubico's RSA-4096).
const (
	KeyAuthentication     byte = 0x9A
	KeyManagementKey      byte = 0x9B // card management key
	KeySignature          byte = 0x9C
	KeyManagement         byte = 0x9D
	KeyCardAuthentication byte = 0x9E

	AlgTDES   byte = 0x03
	AlgAES128 byte = 0x08
	AlgAES192 byte = 0x0A
	AlgAES256 byte = 0x0C

	AlgRSA1024 byte = 0x06
	AlgRSA2048 byte = 0x07
	AlgRSA3072 byte = 0x05
	AlgRSA4096 byte = 0x16
	AlgECCP256 byte = 0x11
	AlgECCP384 byte = 0x14
)

// Options configure a Card.
type Options struct {
	// Logger receives debug traces (status words, never PINs, keys or
	// command data). Nil discards.
	Logger *slog.Logger
	// Version is the firmware version GET VERSION (INS FD) reports, as
	// major, minor, patch. Zero means DefaultVersion.
	Version [3]byte
	// Serial is what GET SERIAL (INS F8) reports. Zero means a value
	// derived from the CHUID's GUID.
	Serial uint32
}

// DefaultVersion is the Yubico firmware version the card reports.
var DefaultVersion = [3]byte{5, 4, 3}

// Card is a PIV card. It implements card.Card.
type Card struct {
	eng *card.Engine
	st  Store
	log *slog.Logger
}

var _ card.Card = (*Card)(nil)

// New returns a PIV card serving st.
func New(st Store, opts Options) (*Card, error) {
	if st == nil {
		return nil, errors.New("piv: nil store")
	}
	c := &Card{st: st, log: opts.Logger}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	c.eng = card.NewEngine(card.Config{ATR: atr, Logger: c.log})
	return c, nil
}

// atr is a placeholder until the real one is chosen.
var atr = []byte{0x3B, 0x00}

// ATR implements card.Card.
func (c *Card) ATR() []byte { return c.eng.ATR() }

// PowerOn implements card.Card.
func (c *Card) PowerOn() { c.eng.PowerOn() }

// PowerOff implements card.Card.
func (c *Card) PowerOff() { c.eng.PowerOff() }

// Reset implements card.Card.
func (c *Card) Reset() { c.eng.Reset() }

// Transmit implements card.Card.
func (c *Card) Transmit(ctx context.Context, cmd []byte) ([]byte, error) {
	return c.eng.Transmit(ctx, cmd)
}
