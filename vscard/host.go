package vscard

import (
	"context"
	"errors"
	"log/slog"
	"net"
)

// HostOptions configures a Host. The zero value (or nil) is ready to use.
type HostOptions struct {
	// Logger receives link events. Nil discards them.
	Logger *slog.Logger

	// MaxAPDU is the largest command APDU Transmit sends; longer ones fail
	// without touching the link. Zero means DefaultMaxAPDU (270), because
	// vscclient reads every message into a static 270-byte buffer without a
	// bounds check (protocols.md §2.3, peers.md §1.5): a longer APDU would
	// overflow it. Raise it only for clients known to take more.
	MaxAPDU int
}

// DefaultMaxAPDU is HostOptions.MaxAPDU's default: vscclient's buffer size.
const DefaultMaxAPDU = 270

// HostEvent is something a client did: one of ReaderAdded, ReaderRemoved,
// CardInserted, CardRemoved or Closed.
type HostEvent interface{ hostEvent() }

// ReaderAdded reports a ReaderAdd, accepted as reader ID (always 0, as QEMU
// assigns it).
type ReaderAdded struct {
	ID   uint32
	Name string // the client's reader name; vscclient sends none
}

// ReaderRemoved reports a ReaderRemove of a reader that was added.
type ReaderRemoved struct{ ID uint32 }

// CardInserted reports an accepted ATR: a card was inserted or reset.
type CardInserted struct {
	ID  uint32
	ATR []byte
}

// CardRemoved reports a CardRemove, or a ReaderRemove with a card in.
type CardRemoved struct{ ID uint32 }

// Closed is the last event: Serve returned with Err (nil when its context
// ended it).
type Closed struct{ Err error }

func (ReaderAdded) hostEvent()   {}
func (ReaderRemoved) hostEvent() {}
func (CardInserted) hostEvent()  {}
func (CardRemoved) hostEvent()   {}
func (Closed) hostEvent()        {}

// Host is the reader's side of a VSCard link, the role QEMU's
// ccid-card-passthru plays: it accepts one client connection, answers the
// handshake as QEMU 7.2 does (protocols.md §1.5), reports the client's
// reader and card events, and sends it APDUs.
type Host struct {
	conn   net.Conn
	o      HostOptions
	events chan HostEvent
}

// NewHost returns a Host for conn, an accepted client connection. Call
// Serve to run it.
func NewHost(conn net.Conn, opts *HostOptions) *Host {
	var o HostOptions
	if opts != nil {
		o = *opts
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.MaxAPDU <= 0 {
		o.MaxAPDU = DefaultMaxAPDU
	}
	return &Host{conn: conn, o: o, events: make(chan HostEvent, 16)}
}

// Events returns the channel of the client's reader and card events. It is
// closed after a Closed event when Serve returns. Serve waits when the
// channel is full, so the caller must keep receiving.
func (h *Host) Events() <-chan HostEvent { return h.events }

// Transmit sends a command APDU to the client's reader readerID and waits
// for the response APDU.
func (h *Host) Transmit(ctx context.Context, readerID uint32, apdu []byte) ([]byte, error) {
	return nil, errors.New("vscard: not implemented yet")
}

// Serve reads the client's messages and answers them until ctx is done or
// the connection ends. It closes the connection before returning.
func (h *Host) Serve(ctx context.Context) error {
	return errors.New("vscard: not implemented yet")
}
