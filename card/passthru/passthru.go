// Package passthru forwards a physical smart card in a PC/SC reader to a
// vscard transport: its Card is a card.Card whose APDUs go verbatim to the
// real card through pcscd (package pcsc), so a QEMU guest can use the card
// the host holds (issue 5).
//
// # Sharing the card with the host
//
// The card is opened in shared mode unless Options.Exclusive is set, so
// host programs (OpenSC, browsers, ssh-agent) keep using it while the guest
// does. Each APDU exchange runs inside a PC/SC transaction, which makes the
// host programs and the guest take turns one exchange at a time. When the
// card answers 61 xx (more data: GET RESPONSE) or 6C xx (wrong Le: send
// again), the transaction is kept until the guest's next command, or until
// ChainHold passes without one, so that no other program's command lands
// between the two halves of a response chain.
//
// The guest never resets the physical card: PowerOn, PowerOff and Reset
// only drop what this package keeps (a held transaction, PIN try counts).
// If another program resets the card (SCARD_W_RESET_CARD), the handle is
// reconnected without a reset of its own and the command is retried once.
// A removed card or a vanished reader or pcscd makes Transmit fail, which
// the VSCard client reports to the guest as a card removal.
//
// # The last-PIN-try guard
//
// A guest that guesses PINs (a wrong PIN cached in a browser, a script run
// in a loop) would block the user's real card, and unblocking needs the
// card issuer. By default Card refuses to forward a VERIFY (INS 20) or
// CHANGE REFERENCE DATA (INS 24) with data that would use a PIN reference's
// last try. It learns the tries left from the card's 63 Cx answers; when
// another program may have changed them since (the card is shared), it
// first sends VERIFY without data (ISO 7816-4 §11.5.6: the card answers
// 63 Cx with the tries left, or 90 00 when already verified), which CAC,
// PIV and most ISO cards answer. A card that answers the query with
// anything else is never queried again for that reference: some cards take
// an empty VERIFY as a wrong PIN (vsmartcard's vicc answers 63 00 and
// counts it), and repeating the query would spend the very tries the guard
// is there to save. Such a card costs one try, once per insertion, and from
// then on is guarded only by its answers to the guest's own PIN commands.
// When one try is left, the guest gets 69 83
// (authentication method blocked) without the card seeing the command, and
// the log says why and that --allow-last-pin-try (Options.AllowLastPINTry)
// turns the guard off. PIN bytes are never logged.
//
// # Readers that come and go
//
// Watch reports PC/SC readers and cards as they appear and disappear
// (GetStatusChange with the PnP pseudo-reader, plus a periodic re-listing),
// and survives pcscd restarts: every reader is reported gone when the
// daemon goes, and back when it returns. Bridge turns those events into
// AddReader, Insert, Remove and RemoveReader calls on VSCard clients
// (vscard.Client), one client per reader, which is what
// "vscard connect --pcsc" and vscclient's passthru run.
package passthru

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/pcsc"
)

// Options configures a Card. The zero value (or nil) is shared mode with
// the guard on.
type Options struct {
	// Exclusive opens the card in exclusive mode: no other program can use
	// it while the Card is open, and no transactions are needed.
	Exclusive bool
	// AllowLastPINTry turns the last-PIN-try guard off.
	AllowLastPINTry bool
	// KeepATR forwards the card's ATR unchanged even when it offers only
	// T=1. By default such an ATR is shown as T=0 (T0ATR), because QEMU
	// 7.2's usb-ccid cannot do T=1 and the guest would refuse the card.
	KeepATR bool
	// ChainHold bounds how long a transaction is kept open after a 61 xx or
	// 6C xx answer while waiting for the guest's next command. Zero means
	// DefaultChainHold.
	ChainHold time.Duration
	// Logger receives warnings (guard refusals, card resets by other
	// programs) and debug events. Nil discards them.
	Logger *slog.Logger
}

// DefaultChainHold is long enough for a guest's GET RESPONSE to come back
// through QEMU (a few milliseconds), and short enough that a guest that
// never sends one cannot lock host programs out for long.
const DefaultChainHold = time.Second

// handle is what Card needs of a *pcsc.Card; tests substitute a fake.
type handle interface {
	Transmit(cmd []byte) ([]byte, error)
	BeginTransaction(ctx context.Context) error
	EndTransaction(d pcsc.Disposition) error
	Reconnect(mode pcsc.ShareMode, protocols pcsc.Protocol, init pcsc.Disposition) error
	Status() (pcsc.CardStatus, error)
	Disconnect(d pcsc.Disposition) error
}

// ErrClosed is returned by Transmit after Close.
var ErrClosed = errors.New("passthru: card closed")

// Card is a physical card in a PC/SC reader, as a card.Card. Its methods
// are safe for concurrent use; Transmit calls are serialised.
type Card struct {
	reader string
	o      Options
	log    *slog.Logger
	mode   pcsc.ShareMode
	// release, if set, runs after Disconnect in Close (Dial's context).
	release func()

	mu     sync.Mutex
	h      handle
	atr    []byte
	closed bool
	inTx   bool        // a transaction is open (shared mode only)
	hold   *time.Timer // ends a transaction kept for a response chain
	holdID uint64      // which hold the timer belongs to
	// tries is the last count of PIN tries left seen per reference (P2);
	// fresh marks counts nobody else can have changed since: learnt inside
	// the current transaction, or any time in exclusive mode.
	tries map[byte]int
	fresh map[byte]bool
	// query records, per reference, whether an empty VERIFY may be sent to
	// learn the tries left: true once the card answered 63 Cx for it, false
	// once a query got no count back. It describes the card, not its
	// state, so power events keep it.
	query map[byte]bool
}

// Open connects to the card in reader through pc. The Card uses pc for
// every exchange, so pc must outlive it; a pcsc.Context serialises its
// calls, so give each Card its own (or use Dial).
func Open(pc *pcsc.Context, reader string, opts *Options) (*Card, error) {
	mode := pcsc.ShareShared
	if opts != nil && opts.Exclusive {
		mode = pcsc.ShareExclusive
	}
	k, err := pc.Connect(reader, mode, pcsc.ProtocolAny)
	if err != nil {
		return nil, fmt.Errorf("passthru: connect to %q: %w", reader, err)
	}
	c, err := newCard(k, reader, mode, opts)
	if err != nil {
		k.Disconnect(pcsc.LeaveCard)
		return nil, err
	}
	return c, nil
}

// Dial establishes its own pcsc.Context (released by Close) and opens the
// card in reader with it.
func Dial(ctx context.Context, popts *pcsc.Options, reader string, opts *Options) (*Card, error) {
	pc, err := pcsc.EstablishContext(ctx, popts)
	if err != nil {
		return nil, fmt.Errorf("passthru: %w", err)
	}
	c, err := Open(pc, reader, opts)
	if err != nil {
		pc.Release()
		return nil, err
	}
	c.release = func() { pc.Release() }
	return c, nil
}

func newCard(h handle, reader string, mode pcsc.ShareMode, opts *Options) (*Card, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.ChainHold <= 0 {
		o.ChainHold = DefaultChainHold
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	st, err := h.Status()
	if err != nil {
		return nil, fmt.Errorf("passthru: status of %q: %w", reader, err)
	}
	if len(st.ATR) == 0 {
		return nil, fmt.Errorf("passthru: card in %q has no ATR", reader)
	}
	c := &Card{
		reader: reader, o: o, log: log.With("reader", reader), mode: mode, h: h,
		tries: make(map[byte]int), fresh: make(map[byte]bool), query: make(map[byte]bool),
	}
	c.setATR(st.ATR)
	return c, nil
}

// setATR records the card's ATR as the guest will see it. Called with mu
// held or before the Card is shared.
func (c *Card) setATR(real []byte) {
	atr := append([]byte(nil), real...)
	if !c.o.KeepATR {
		if t0, changed := T0ATR(atr); changed {
			if !bytes.Equal(t0, c.atr) {
				c.log.Info("the card offers only T=1, which QEMU's usb-ccid cannot do: the guest gets the same ATR announcing T=0 (APDUs are forwarded unchanged); --keep-atr turns this off",
					"atr", fmt.Sprintf("%X", real), "guest_atr", fmt.Sprintf("%X", t0))
			}
			atr = t0
		}
	}
	c.atr = atr
}

// Reader returns the PC/SC reader name.
func (c *Card) Reader() string { return c.reader }

// ATR returns the real card's ATR, as read when it was opened or last
// reconnected; a card that offers only T=1 is shown as T=0 unless
// Options.KeepATR is set (see T0ATR).
func (c *Card) ATR() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.atr
}

// PowerOn, PowerOff and Reset drop the held transaction and what the guard
// knows; they never touch the physical card, which host programs share.
func (c *Card) PowerOn()  { c.forget() }
func (c *Card) PowerOff() { c.forget() }
func (c *Card) Reset()    { c.forget() }

func (c *Card) forget() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.endTx()
	clear(c.tries)
	clear(c.fresh)
}

// Close ends any transaction and disconnects, leaving the card as it is.
func (c *Card) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.endTx()
	c.closed = true
	err := c.h.Disconnect(pcsc.LeaveCard)
	c.mu.Unlock()
	if c.release != nil {
		c.release()
	}
	if err != nil && !gone(err) {
		return fmt.Errorf("passthru: disconnect: %w", err)
	}
	return nil
}

// Transmit forwards cmd to the card inside a transaction and returns its
// answer. An error means the card can no longer be reached (removed,
// reader or pcscd gone); the caller treats the card as removed.
func (c *Card) Transmit(ctx context.Context, cmd []byte) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	c.stopHold()
	resp, err := c.exchange(ctx, cmd)
	if errors.Is(err, pcsc.ErrResetCard) {
		// Another program reset the card: our handle must be reconnected
		// before it works again (pcsc-lite answers SCARD_W_RESET_CARD once
		// per handle). The guest's selections and verified PINs are gone
		// with the reset; it sees that in the card's answers.
		c.log.Warn("another program reset the card; reconnecting and retrying the command")
		if rerr := c.reconnect(); rerr != nil {
			return nil, rerr
		}
		resp, err = c.exchange(ctx, cmd)
	}
	if err != nil {
		c.endTx()
		return nil, fmt.Errorf("passthru: %s: %w", c.reader, err)
	}
	if len(resp) >= 2 && (resp[len(resp)-2] == 0x61 || resp[len(resp)-2] == 0x6C) && c.inTx {
		// Keep the card for the guest's GET RESPONSE or re-sent command.
		c.startHold()
	} else {
		c.endTx()
	}
	return resp, nil
}

// reconnect re-opens the handle after a reset by another program, without
// resetting the card again, and re-reads the ATR. Called with mu held.
func (c *Card) reconnect() error {
	c.inTx = false // the reset ended any transaction
	clear(c.fresh)
	if err := c.h.Reconnect(c.mode, pcsc.ProtocolAny, pcsc.LeaveCard); err != nil {
		return fmt.Errorf("passthru: %s: reconnect after reset: %w", c.reader, err)
	}
	if st, err := c.h.Status(); err == nil && len(st.ATR) > 0 {
		c.setATR(st.ATR)
	}
	return nil
}

// exchange begins a transaction if none is held, then runs cmd through the
// guard. Called with mu held.
func (c *Card) exchange(ctx context.Context, cmd []byte) ([]byte, error) {
	if c.mode == pcsc.ShareShared && !c.inTx {
		if err := c.h.BeginTransaction(ctx); err != nil {
			return nil, fmt.Errorf("begin transaction: %w", err)
		}
		c.inTx = true
	}
	if c.o.AllowLastPINTry {
		return c.h.Transmit(cmd)
	}
	return c.guarded(cmd)
}

// PIN commands the guard watches (ISO 7816-4 §11.5.6, §11.5.7).
const (
	insVerify       = 0x20
	insChangeRefDat = 0x24
)

// swBlocked is what the guest gets for a refused command: "authentication
// method blocked", as the card would answer once blocked, so host software
// shows a blocked-PIN message rather than a wrong-PIN one.
var swBlocked = []byte{0x69, 0x83}

// guarded forwards cmd, refusing a PIN command that would use the last try
// and learning tries left from the answers. Called with mu held, inside
// the transaction.
func (c *Card) guarded(cmd []byte) ([]byte, error) {
	// Only PIN commands are parsed: every other APDU goes straight through,
	// with no work added on the forwarding path.
	if len(cmd) < 4 || (cmd[1] != insVerify && cmd[1] != insChangeRefDat) {
		return c.h.Transmit(cmd)
	}
	pc, err := apdu.Parse(cmd)
	if err != nil || pc.CLA == 0xFF || (pc.INS != insVerify && pc.INS != insChangeRefDat) {
		return c.h.Transmit(cmd)
	}
	ref := pc.P2
	if len(pc.Data) > 0 {
		if ok, known := c.query[ref]; !c.fresh[ref] && (ok || !known) {
			if err := c.probe(pc.CLA&^0x10, pc.INS, pc.P1, ref); err != nil {
				return nil, err
			}
		}
		if n, ok := c.tries[ref]; ok && n == 1 {
			what := "VERIFY"
			if pc.INS == insChangeRefDat {
				what = "CHANGE REFERENCE DATA"
			}
			c.log.Warn("refused the guest's "+what+": the card has one PIN try left, and a wrong PIN would block it; "+
				"the guest gets 69 83 (blocked). Verify the right PIN on the host to reset the counter, "+
				"or restart with --allow-last-pin-try to let the guest use the last try",
				"pin_reference", fmt.Sprintf("%02X", ref))
			return append([]byte(nil), swBlocked...), nil
		}
	}
	resp, err := c.h.Transmit(cmd)
	if err != nil {
		return nil, err
	}
	c.learn(pc, resp)
	return resp, nil
}

// probe sends VERIFY without data for reference ref to learn the tries
// left (CAC: cac.md §8.3; PIV SP 800-73-4 part 2 §3.2.1). For CHANGE
// REFERENCE DATA, P1 of the probe is 00: VERIFY only defines 00 and FF
// (PIV: reset the verified state), which must never be sent here.
func (c *Card) probe(cla, ins, p1, ref byte) error {
	if ins != insVerify || p1 != 0x00 {
		p1 = 0x00
	}
	resp, err := c.h.Transmit([]byte{cla, insVerify, p1, ref})
	if err != nil {
		return err
	}
	sw := swOf(resp)
	switch {
	case sw&0xFFF0 == 0x63C0:
		c.tries[ref], c.fresh[ref] = int(sw&0x0F), true
		c.log.Debug("PIN tries left", "pin_reference", fmt.Sprintf("%02X", ref), "tries", sw&0x0F)
	case sw == 0x9000:
		// Already verified: the counter is at its maximum.
		delete(c.tries, ref)
		c.fresh[ref] = true
	case sw == 0x6983:
		c.tries[ref], c.fresh[ref] = 0, true
	default:
		// The card does not tell (and may even have counted the query as
		// a wrong PIN): never ask it again, keep what its last 63 Cx said.
		c.query[ref] = false
		c.log.Warn("card does not report PIN tries on an empty VERIFY; the last-PIN-try guard now relies on its answers to the guest's own PIN commands",
			"pin_reference", fmt.Sprintf("%02X", ref), "sw", fmt.Sprintf("%04X", sw))
	}
	return nil
}

// learn updates the tries left from the card's answer to a PIN command.
func (c *Card) learn(pc apdu.Command, resp []byte) {
	ref := pc.P2
	sw := swOf(resp)
	switch {
	case sw&0xFFF0 == 0x63C0:
		c.tries[ref], c.fresh[ref] = int(sw&0x0F), true
		if _, known := c.query[ref]; !known {
			c.query[ref] = true // it counts tries the ISO way
		}
	case sw == 0x9000 && (len(pc.Data) > 0 || pc.INS == insVerify):
		// Verified (or changed): the card reset its counter to the maximum.
		delete(c.tries, ref)
		c.fresh[ref] = true
	case sw == 0x6983:
		c.tries[ref], c.fresh[ref] = 0, true
	}
}

func swOf(resp []byte) uint16 {
	if len(resp) < 2 {
		return 0
	}
	return uint16(resp[len(resp)-2])<<8 | uint16(resp[len(resp)-1])
}

// endTx releases the transaction, if any. In shared mode what the guard
// knows goes stale: other programs may send VERIFY between our turns.
// Called with mu held.
func (c *Card) endTx() {
	c.stopHold()
	if !c.inTx {
		return
	}
	c.inTx = false
	clear(c.fresh)
	if err := c.h.EndTransaction(pcsc.LeaveCard); err != nil && !gone(err) {
		c.log.Debug("end transaction", "err", err)
	}
}

// startHold arms the timer that releases a transaction kept for a response
// chain. Called with mu held.
func (c *Card) startHold() {
	c.holdID++
	id := c.holdID
	c.hold = time.AfterFunc(c.o.ChainHold, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.holdID != id || c.closed {
			return // a command came, or another hold started
		}
		c.log.Debug("no follow-up command within the chain hold; releasing the card", "hold", c.o.ChainHold)
		c.endTx()
	})
}

func (c *Card) stopHold() {
	if c.hold != nil {
		c.hold.Stop()
		c.hold = nil
	}
	c.holdID++
}

// gone reports errors that mean the card or the daemon is no longer there.
func gone(err error) bool {
	for _, e := range []error{pcsc.ErrRemovedCard, pcsc.ErrNoSmartcard, pcsc.ErrReaderUnavailable,
		pcsc.ErrUnknownReader, pcsc.ErrNoService, pcsc.ErrServiceStopped, pcsc.ErrInvalidHandle} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
