// Package cac is vscard's Common Access Card personality: a virtual card
// that answers like libcacard 2.8's emulated CAC (GSC-IS 2.1 "CAC II"),
// the card QEMU, spice-gtk and virt_cacard present to guests. The byte
// level reference is the shared document cac.md; section numbers in
// comments refer to it.
//
// # Model
//
// A Card is a card.Engine with the libcacard applet set (§3): one PKI
// applet per credential (at most 10), the ACA, the CCC, the empty,
// placeholder and passthrough applets (all with empty buffers), the Access
// Control File, the GlobalPlatform card manager and the Microsoft
// plug-and-play applet. Applets expose SimpleTLV T/V buffers through READ
// BUFFER; PKI applets do a raw RSA private-key operation (SIGN/DECRYPT,
// INS 42) through token.RawRSA, so the host does all padding. The login
// state is card-wide and is dropped by every power event.
//
// # Modes
//
// With Options.Strict the card reproduces libcacard byte for byte,
// quirks included: a wrong PIN gives 69 85 with no retry counter visible,
// the VERIFY status query gives 6A 88 (or 63 C3 after the Microsoft
// applet's GET DATA), GET CHALLENGE is unsupported, and every card carries
// the same constant card identifier in its CCC.
//
// The default mode keeps everything else identical and fixes what hurts
// clients (DIFFERENCES.md in this directory lists each change and why):
//
//   - GET CHALLENGE (00 84 00 00 Le) returns Le random bytes (at most 256;
//     8 when Le is absent, through 61 08 and GET RESPONSE) on every applet
//     and with none selected, so OpenSC's C_GenerateRandom works.
//   - VERIFY uses the token's retry counter: 63 Cx for a wrong PIN (x =
//     tries left), 69 83 when blocked, and the status query (no data)
//     answers 90 00 when verified, else 63 Cx or 69 83. The PIN is not
//     cut at an embedded 00 byte (a C string artefact in libcacard).
//   - The 14-byte card ID in the CCC's F0 Card Identifier comes from
//     SHA-256 of the first certificate, so OpenSC, which derives the token
//     serial from it, never confuses two cards in its cache.
//   - Certificates are stored zlib-compressed (CertInfo 01), as on real
//     CAC cards, because Debian 12's CoolKey only reads compressed ones;
//     OpenSC inflates them itself.
//
// In both modes trailing FF bytes of a PIN are stripped before the
// comparison, and a token without a PIN accepts any PIN, as libcacard
// does. PINs are never logged.
package cac

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/token"
)

// MaxCredentials is the most PKI applets a card can have; libcacard's
// cac_card_init refuses more (§3).
const MaxCredentials = 10

// atr is the CAC ATR libcacard reports through vreader_power_on (§1.1).
var atr = []byte{0x3B, 0x7A, 0x18, 0x00, 0x00, 0x73, 0x66, 0x74, 0x65, 0x20, 0x63, 0x64, 0x31, 0x34, 0x34}

// Options configure a Card.
type Options struct {
	// Strict reproduces libcacard byte for byte, quirks included.
	Strict bool
	// Logger receives debug traces (status words, never PINs or data).
	// Nil discards.
	Logger *slog.Logger
	// Rand is the source for GET CHALLENGE; nil means crypto/rand.
	Rand io.Reader
}

// Card is a CAC card. It implements card.Card.
type Card struct {
	eng    *card.Engine
	tok    token.Token
	strict bool
	log    *slog.Logger
	rand   io.Reader

	pkis []*pkiApplet

	// loggedIn is the card-wide login state (§4.7); power events clear it.
	loggedIn bool
	// msftCompat is libcacard's Windows compatibility bit, set by the
	// Microsoft applet's GET DATA 7F 68 and kept for the card's lifetime,
	// across power cycles (§4.7, vectors s18).
	msftCompat bool
}

var _ card.Card = (*Card)(nil)

// New builds a card from tok's credentials, in token order. It fails for
// no credentials, more than MaxCredentials, or a credential that is not
// RSA or whose key cannot do token.RawRSA (§4.6: the card only does raw
// RSA).
func New(tok token.Token, opts Options) (*Card, error) {
	creds := tok.Credentials()
	if len(creds) == 0 {
		return nil, errors.New("cac: token has no credentials")
	}
	if len(creds) > MaxCredentials {
		return nil, fmt.Errorf("cac: token has %d credentials, a CAC card holds at most %d", len(creds), MaxCredentials)
	}
	c := &Card{tok: tok, strict: opts.Strict, log: opts.Logger, rand: opts.Rand}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.rand == nil {
		c.rand = rand.Reader
	}
	for i, cr := range creds {
		if cr.Cert == nil {
			return nil, fmt.Errorf("cac: credential %d (%q): no certificate", i, cr.Label)
		}
		pub, ok := cr.Cert.PublicKey.(*rsa.PublicKey)
		if !ok {
			return nil, fmt.Errorf("cac: credential %d (%q): certificate key is %T, CAC supports only RSA", i, cr.Label, cr.Cert.PublicKey)
		}
		raw, ok := cr.Key.(token.RawRSA)
		if !ok || cr.Key == nil {
			return nil, fmt.Errorf("cac: credential %d (%q): key %T cannot do raw RSA (token.RawRSA)", i, cr.Label, cr.Key)
		}
		if kp, ok := cr.Key.Public().(*rsa.PublicKey); !ok || !kp.Equal(pub) {
			return nil, fmt.Errorf("cac: credential %d (%q): key does not match certificate", i, cr.Label)
		}
		p, err := newPKIApplet(c, i, cr.Cert.Raw, pub.Size(), raw)
		if err != nil {
			return nil, fmt.Errorf("cac: credential %d (%q): %w", i, cr.Label, err)
		}
		c.pkis = append(c.pkis, p)
	}

	sum := sha256.Sum256(creds[0].Cert.Raw)
	applets := make([]card.Applet, 0, len(c.pkis)+16)
	for _, p := range c.pkis {
		applets = append(applets, p)
	}
	static, err := newStaticApplets(c, len(c.pkis), sum)
	if err != nil {
		return nil, fmt.Errorf("cac: %w", err)
	}
	applets = append(applets, static...)
	cfg := card.Config{
		ATR:     atr,
		Applets: applets,
		Generic: c.generic,
		OnPower: c.onPower,
		Logger:  c.log,
	}
	if !opts.Strict {
		cfg.AbsentLe256 = answerAtOnce
	}
	c.eng = card.NewEngine(cfg)
	return c, nil
}

// answerAtOnce picks the commands that default mode answers without Le
// with their data and 90 00 instead of libcacard's 61 xx. OpenSC sends
// READ BUFFER and SIGN/DECRYPT as case 4 and strips Le because the CAC
// ATR offers only T=0, then spends a GET RESPONSE round trip through
// pcscd on each: one per signature, one per 240-byte piece of a
// certificate. SELECT keeps its 61 0D: nobody follows it up (OpenSC reads
// nothing from the FCI), so it costs nothing (DIFFERENCES.md).
func answerAtOnce(cmd apdu.Command) bool {
	return cmd.INS == insSignDecrypt || cmd.INS == insReadBuffer
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

// onPower logs the token out (PK11_Logout in vreader_power_off/on, §2.5)
// and drops partial SIGN input.
func (c *Card) onPower() {
	c.loggedIn = false
	for _, p := range c.pkis {
		p.resetSign()
	}
}

// generic handles the commands libcacard's generic path knows besides
// SELECT and GET RESPONSE: VERIFY (§4.7), and in default mode GET
// CHALLENGE.
func (c *Card) generic(ctx context.Context, ch int, cmd apdu.Command) (apdu.Response, bool, error) {
	switch cmd.INS {
	case 0x20:
		return c.verify(cmd), true, nil
	case 0x84:
		if !c.strict {
			r, err := c.challenge(cmd)
			return r, true, err
		}
	}
	return apdu.Response{}, false, nil
}

// maxChallenge bounds one GET CHALLENGE answer: a short Le asks for at
// most 256 bytes, and nobody needs more per command.
const maxChallenge = 256

// defaultChallenge is the length used when Le is absent (case 1): the
// 8 bytes OpenSC asks for per call. Rule A turns it into 61 08.
const defaultChallenge = 8

// challenge answers GET CHALLENGE in default mode (DIFFERENCES.md):
// libcacard has none, which breaks OpenSC's C_GenerateRandom (§4.10,
// OpenSC #1294).
func (c *Card) challenge(cmd apdu.Command) (apdu.Response, error) {
	if cmd.P1 != 0 || cmd.P2 != 0 {
		return apdu.Status(apdu.SWIncorrectP1P2), nil
	}
	n := cmd.Ne
	if !cmd.HasLe {
		n = defaultChallenge
	}
	n = min(n, maxChallenge)
	buf := make([]byte, n)
	if _, err := io.ReadFull(c.rand, buf); err != nil {
		c.log.Warn("cac: GET CHALLENGE: random source failed", "err", err)
		return apdu.Status(apdu.SWExecutionError), nil
	}
	return apdu.OK(buf), nil
}

// mayUseKeys reports whether private-key operations are allowed: the
// token needs no PIN, or it was verified since the last power event.
func (c *Card) mayUseKeys() bool {
	return c.loggedIn || c.tok.PIN() == nil
}
