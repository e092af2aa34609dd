// Package ccid is a USB CCID 1.1 smart card reader (class 0x0B) that
// implements usb.Device, so that vscard's USB transports (usbredir, usbip)
// can put any card.Card in front of a host's stock CCID driver (libccid).
package ccid

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/usb"
)

// Options configure a Reader. The zero value (or nil) is a one-slot reader
// with QEMU usb-ccid's VID:PID 08E6:4433, which stock libccid recognises.
type Options struct {
	Slots                         int    // 1..8, default 1
	VendorID, ProductID           uint16 // default 0x08E6, 0x4433
	Manufacturer, Product, Serial string // string descriptors; empty Serial: none
	Logger                        *slog.Logger
	// Trace, if set, is called after each card operation (APDU exchange,
	// power on/off) with PIN data redacted (apdu.Redact).
	Trace func(TraceEvent)
}

// Event is the kind of card operation a TraceEvent records.
type Event uint8

const (
	EventAPDU Event = iota
	EventPowerOn
	EventPowerOff
)

// TraceEvent is one card operation done for the host.
type TraceEvent struct {
	Time     time.Time
	Slot     int
	Event    Event
	Command  []byte // command APDU, PIN data removed
	Redacted int    // bytes removed from Command
	Response []byte // response APDU, or the ATR for EventPowerOn
	Duration time.Duration
	Err      error
}

// Reader is a CCID reader with Slots slots.
type Reader struct {
	opts Options
}

var errSkeleton = errors.New("ccid: not implemented")

// New returns a Reader with all slots empty.
func New(opts *Options) *Reader {
	r := &Reader{}
	if opts != nil {
		r.opts = *opts
	}
	if r.opts.Slots <= 0 {
		r.opts.Slots = 1
	}
	return r
}

// Slots returns the number of slots.
func (r *Reader) Slots() int { return r.opts.Slots }

// Insert puts c in slot (0-based).
func (r *Reader) Insert(slot int, c card.Card) error { return errSkeleton }

// Remove takes the card out of slot.
func (r *Reader) Remove(slot int) error { return errSkeleton }

// Info implements usb.Device.
func (r *Reader) Info() usb.Info { return usb.Info{} }

// Control implements usb.Device.
func (r *Reader) Control(ctx context.Context, s usb.Setup, data []byte) ([]byte, error) {
	return nil, usb.ErrStall
}

// Out implements usb.Device.
func (r *Reader) Out(ctx context.Context, ep uint8, data []byte) error { return usb.ErrStall }

// In implements usb.Device.
func (r *Reader) In(ctx context.Context, ep uint8, max int) ([]byte, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

// Reset implements usb.Device.
func (r *Reader) Reset() {}

var _ usb.Device = (*Reader)(nil)
