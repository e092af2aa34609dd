package vscard

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/vscard/vscard/card"
)

// ClientOptions configures a Client. The zero value (or nil) is ready to
// use.
type ClientOptions struct {
	// ReaderName is sent as the ReaderAdd payload. Empty sends no name, as
	// vscclient does; QEMU ignores it either way (protocols.md §1.5).
	ReaderName string

	// Logger receives connection and card events. Nil discards them. APDUs
	// are never logged; see Trace.
	Logger *slog.Logger

	// Trace, if set, is called for every message the host sends, after the
	// client has answered it. PIN data is redacted (TraceEvent).
	Trace func(TraceEvent)

	// MinBackoff and MaxBackoff bound the wait between connection attempts;
	// each failure doubles the wait and each wait is jittered down by up to
	// half. Zero means 100 ms and 5 s.
	MinBackoff, MaxBackoff time.Duration

	// QEMU54Workaround makes the client never send a response APDU of
	// exactly 54 bytes. QEMU 7.2's usb-ccid turns such a response into one
	// full 64-byte bulk packet followed by a zero-length packet that the
	// guest reads as the answer to its next command, and the guest's reader
	// stays out of step until it is re-plugged (peers.md appendix "QEMU 7.2
	// usb-ccid loses sync on a 54-byte response"). With the workaround, such
	// a response goes out as its first data byte and 61 xx; the host's GET
	// RESPONSE for the rest is answered by the client itself. Command-line
	// tools turn it on by default.
	QEMU54Workaround bool
}

// ClientStatus is a snapshot of a Client's state.
type ClientStatus struct {
	Connected    bool      // a connection to the host is up and the handshake is done
	Addr         string    // the host's address while connected
	CardInserted bool      // the client holds a card (whether or not the host has it yet)
	APDUs        uint64    // APDUs answered since NewClient
	Connects     uint64    // handshakes completed since NewClient
	LastError    string    // the last connection or card error, if any
	Since        time.Time // when Connected last changed
}

// Errors returned by Client.Insert and Client.Remove.
var (
	ErrCardInserted = errors.New("vscard: a card is already inserted")
	ErrNoCard       = errors.New("vscard: no card inserted")
)

// Client is the card owner's side of a VSCard link (the role of
// libcacard's vscclient): it connects to a host such as QEMU's
// ccid-card-passthru and serves one card in one reader (QEMU only ever
// assigns reader 0).
//
// Run drives the link; Insert, Remove and Status may be called from any
// goroutine while it runs.
type Client struct {
	dial func(ctx context.Context) (net.Conn, error)
	o    ClientOptions

	mu sync.Mutex
	// card is the inserted card, nil if none; last is the card most
	// recently removed, for Insert(nil).
	card, last card.Card
	st         ClientStatus
}

// NewClient returns a Client that reaches its host through dial and serves
// c (nil: start with no card). dial is called for every connection attempt.
func NewClient(dial func(ctx context.Context) (net.Conn, error), c card.Card, opts *ClientOptions) *Client {
	var o ClientOptions
	if opts != nil {
		o = *opts
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = 100 * time.Millisecond
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 5 * time.Second
	}
	o.MaxBackoff = max(o.MaxBackoff, o.MinBackoff)
	return &Client{dial: dial, o: o, card: c}
}

// Run connects to the host and serves the card until ctx is done. On each
// connection it sends Init, waits for the host's Init, sends ReaderRemove
// (clearing a reader left over from a previous connection, as vscclient
// does) and ReaderAdd, and once both are acknowledged powers the card on
// and sends its ATR. It then answers APDUs and Flush. When the connection
// drops — QEMU restarted, the network went away — it reconnects with
// backoff and replays the sequence, so the guest gets its card back.
//
// When ctx is done, Run sends CardRemove (if a card is in) and
// ReaderRemove, makes sure they reach the host before the connection
// closes (vscclient loses them, peers.md §1.3), closes the connection and
// returns nil. Run returns an error only if it cannot run at all.
func (c *Client) Run(ctx context.Context) error {
	return errors.New("vscard: not implemented yet")
}

// Insert puts card into the reader, powering it on and sending its ATR if
// the link is up (otherwise when it comes up). card nil re-inserts the card
// most recently removed. It fails with ErrCardInserted if a card is in.
func (c *Client) Insert(card card.Card) error {
	return errors.New("vscard: not implemented yet")
}

// Remove takes the card out of the reader: it sends CardRemove if the link
// is up and powers the card off. It fails with ErrNoCard if there is no
// card.
func (c *Client) Remove() error {
	return errors.New("vscard: not implemented yet")
}

// Status returns a snapshot of the client's state.
func (c *Client) Status() ClientStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.st
	s.CardInserted = c.card != nil
	return s
}
