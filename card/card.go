// Package card defines what a smart card is to vscard's transports, and the
// applet engine that card personalities (card/cac, later card/piv) are
// built on.
//
// A transport (vpcd, VSCard, CCID) drives a Card through power events and
// Transmit; it never sees applets, keys or PINs. A Card never knows which
// transport it sits behind.
package card

import "context"

// Card is a contact smart card as a reader sees it.
//
// Implementations are safe for use by one transport goroutine at a time;
// a transport serialises its calls, as a real reader does.
type Card interface {
	// ATR returns the answer-to-reset. The caller must not modify it.
	ATR() []byte
	// PowerOn, PowerOff and Reset model the reader's contact events: each
	// one drops volatile state (selected applets, buffered responses,
	// verified PINs), never persistent state.
	PowerOn()
	PowerOff()
	Reset()
	// Transmit processes one command APDU and returns the response APDU
	// (data followed by SW1 SW2). Malformed commands get a status word,
	// not an error: an error means the card can no longer answer at all
	// (its key store vanished, ctx was cancelled) and the transport
	// should treat the card as removed.
	//
	// cmd is only valid during the call: transports pass a slice of a
	// reused receive buffer, so a card copies whatever it keeps (chained
	// SIGN input, for example). The returned slice belongs to the caller.
	Transmit(ctx context.Context, cmd []byte) ([]byte, error)
}
