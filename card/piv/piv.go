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
// on (GET VERSION, GET SERIAL, SET MANAGEMENT KEY, IMPORT KEY), reporting
// firmware 5.2.7 unless Options.Version says otherwise, so the tool stays
// on the code paths the card implements. PINs and keys are never logged.
package piv

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/tlv"
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
	// major, minor, patch. Zero means DefaultVersion().
	Version [3]byte
	// Serial is what GET SERIAL (INS F8) reports. Zero means a number
	// derived from the CHUID's GUID, so every card differs.
	Serial uint32
	// Rand is the source for key generation and management-key
	// challenges. Nil means crypto/rand.
	Rand io.Reader
}

// DefaultVersion returns the YubiKey firmware version the card reports,
// 5.2.7. From 5.0 on, yubico-piv-tool reads the serial with GET SERIAL on
// the PIV application instead of selecting Yubico's OTP applet, and treats
// the card as a YubiKey 5, whose command set (ECC P-384, PIN policies) is
// the one this card implements. Below 5.3, newer Yubico tools do not ask
// for GET METADATA (INS F7), which the card does not implement.
func DefaultVersion() [3]byte { return [3]byte{5, 2, 7} }

// atr is the card's answer-to-reset: TS 3B; T0 8A (TD1 follows, 10
// historical bytes); TD1 80 (T=0, TD2 follows); TD2 01 (T=1); historical
// bytes "vscard PIV"; TCK. It offers T=0 because QEMU 7.2's usb-ccid
// speaks only T=0 (peers.md), and T=1 because yubico-piv-tool connects
// with SCARD_PROTOCOL_T1 only. It is not the CAC ATR, and no OpenSC
// driver ahead of PIV-II claims it, so OpenSC's PIV driver finds the
// application by SELECT.
var atr = atrWithTCK([]byte{0x3B, 0x8A, 0x80, 0x01, 'v', 's', 'c', 'a', 'r', 'd', ' ', 'P', 'I', 'V'})

func atrWithTCK(b []byte) []byte {
	var x byte
	for _, c := range b[1:] {
		x ^= c
	}
	return append(b, x)
}

// Card is a PIV card. It implements card.Card.
type Card struct {
	eng     *card.Engine
	st      Store
	log     *slog.Logger
	rand    io.Reader
	version [3]byte
	serial  uint32
	app     *application

	// Volatile state, guarded by the engine's lock (every access is from
	// the applet handler or OnPower, which the engine serialises).

	// pinVerified is the PIN's security status for the session (9A, 9D,
	// retired keys, PIN-protected objects).
	pinVerified bool
	// pinFresh is a verification not yet used by a 9C operation: the
	// digital signature key needs the PIN immediately before every use
	// (SP 800-73-4 Part 1 §3.2.2, PIN Always).
	pinFresh bool
	// mgmAuthed is the card management key's security status.
	mgmAuthed bool
	// pending is a management-key witness or challenge awaiting the
	// host's answer (SP 800-73-4 Part 2 appendix A).
	pending pendingAuth
	// chain is the data of a command being sent with CLA 10 chaining.
	chain    []byte
	chainHdr [3]byte // INS P1 P2 of the chained command
	chaining bool
}

type pendingAuth struct {
	kind  byte // 0x80 witness, 0x81 challenge, 0 none
	alg   byte
	value []byte
}

var _ card.Card = (*Card)(nil)

// New returns a PIV card serving st.
func New(st Store, opts Options) (*Card, error) {
	if st == nil {
		return nil, errors.New("piv: nil store")
	}
	c := &Card{st: st, log: opts.Logger, rand: opts.Rand, version: opts.Version, serial: opts.Serial}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.rand == nil {
		c.rand = rand.Reader
	}
	if c.version == [3]byte{} {
		c.version = DefaultVersion()
	}
	if c.serial == 0 {
		c.serial = serialFrom(st)
	}
	c.app = &application{c: c}
	c.eng = card.NewEngine(card.Config{
		ATR:      atr,
		Applets:  []card.Applet{c.app},
		MatchAID: matchAID,
		// The PIV application is the card's default application:
		// OpenSC reads Discovery and sends chained commands without
		// selecting it, and it stays current when clients probe other
		// AIDs first.
		Default: c.app,
		OnPower: c.onPower,
		Logger:  c.log,
		// yubico-piv-tool sends SELECT (and other data-returning
		// commands) without Le, as to a T=1 YubiKey, and fails on
		// 61 xx; OpenSC and T=0 hosts take data with 90 00 as well.
		AbsentLe256: func(apdu.Command) bool { return true },
	})
	return c, nil
}

// serialFrom derives a serial number from the CHUID (whose GUID is random
// per card), below 2^31 so tools printing it as a signed int agree.
func serialFrom(st Store) uint32 {
	v, err := st.Object(TagCHUID)
	if err != nil {
		return 1
	}
	sum := sha256.Sum256(v)
	s := binary.BigEndian.Uint32(sum[:4]) & 0x7FFFFFFF
	if s == 0 {
		s = 1
	}
	return s
}

// matchAID accepts the PIV AID and every right-truncation of it down to
// the 5-byte RID: OpenSC selects with 9 bytes, yubico-piv-tool and piv-go
// with the RID alone (cac.md §11).
func matchAID(_ card.Applet, sel []byte) bool {
	return len(sel) >= 5 && bytes.HasPrefix(aid, sel)
}

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

// onPower drops every security status and buffer: a power event ends the
// session.
func (c *Card) onPower() {
	c.pinVerified, c.pinFresh, c.mgmAuthed = false, false, false
	c.pending = pendingAuth{}
	c.dropChain()
}

func (c *Card) dropChain() {
	c.chain = c.chain[:0]
	c.chaining = false
}

// application is the PIV card application as an engine applet.
type application struct{ c *Card }

// AID implements card.Applet.
func (a *application) AID() []byte { return aid }

// Select implements card.Applet: it answers the Application Property
// Template (SP 800-73-4 Part 1 table 3; cac.md §11).
func (a *application) Select(int) []byte {
	a.c.dropChain()
	a.c.pending = pendingAuth{}
	return apt
}

// apt is the Application Property Template: the PIX (4F), the coexistent
// tag allocation authority (79 { 4F RID }), a label (50) and the
// cryptographic algorithms the card supports (AC { 80 alg ... 06 00 }).
var apt = func() []byte {
	var in []byte
	in = tlv.AppendBER(in, 0x4F, aid[5:])
	in = tlv.AppendBER(in, 0x79, tlv.AppendBER(nil, 0x4F, aid[:5]))
	in = tlv.AppendBER(in, 0x50, []byte("vscard PIV"))
	var algs []byte
	for _, alg := range []byte{AlgTDES, AlgAES128, AlgAES192, AlgAES256, AlgRSA1024, AlgRSA2048, AlgRSA3072, AlgECCP256, AlgECCP384} {
		algs = tlv.AppendBER(algs, 0x80, []byte{alg})
	}
	algs = tlv.AppendBER(algs, 0x06, []byte{0x00})
	in = tlv.AppendBER(in, 0xAC, algs)
	return tlv.AppendBER(nil, 0x61, in)
}()
