// Package ccid is a USB smart card reader of the CCID 1.1 class (interface
// class 0x0B) that implements usb.Device, so that vscard's USB transports
// (usbredir, usbip) can put any card.Card in front of a host's stock CCID
// driver, libccid.
//
// # Model
//
// A Reader has 1 to 8 slots; each holds at most one card.Card, inserted
// and removed from any goroutine. An inserted card stays unpowered until the
// host's IccPowerOn, as on a real reader. Every insertion and removal is
// reported on the interrupt endpoint (0x81) as NotifySlotChange.
//
// The host sends one CCID command per bulk OUT transfer (0x03); the reader
// answers each with exactly one RDR_to_PC message queued on bulk IN (0x82),
// possibly preceded by time extension messages while a slow card works.
// Commands run in their own goroutine, so Out never waits for a card; a
// slot runs one command at a time and answers a second one with
// CMD_SLOT_BUSY. Out blocks only while too many answers are waiting to be
// read: that is how the reader NAKs a host that does not read.
//
// The exchange level is extended APDU with automatic parameter negotiation
// (see features in desc.go): APDUs go to Card.Transmit as the host sent
// them, responses of any size up to 65538 bytes come back in one
// DataBlock, and the host never sends TPDUs, PPS or SetParameters it
// expects the reader to act on (protocols.md §4.3). QEMU's usb-ccid
// choices (TPDU level, a 374-byte response cap, GetParameters with
// dwLength 0; protocols.md §3) are deliberately not copied.
package ccid

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"sync"

	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/usb"
)

// Options configure a Reader. The zero value (or nil) is a one-slot reader
// with QEMU usb-ccid's VID:PID 08E6:4433, which stock libccid recognises
// (protocols.md §4.1).
type Options struct {
	Slots                         int    // 1..8, default 1
	VendorID, ProductID           uint16 // default 0x08E6, 0x4433
	Manufacturer, Product, Serial string // string descriptors; empty Serial: none
	Logger                        *slog.Logger
	// Trace, if set, is called after each card operation (APDU exchange,
	// power on/off) with PIN data redacted (apdu.Redact). It is called
	// from the slot's command goroutine while the slot is busy, so it must
	// not block for long nor call Insert or Remove (they wait for the
	// slot).
	Trace func(TraceEvent)
}

// Event is the kind of card operation a TraceEvent records.
type Event uint8

const (
	EventAPDU     Event = iota // XfrBlock: Command and Response APDUs
	EventPowerOn               // IccPowerOn: Response is the ATR
	EventPowerOff              // IccPowerOff
)

func (e Event) String() string {
	switch e {
	case EventAPDU:
		return "apdu"
	case EventPowerOn:
		return "power-on"
	case EventPowerOff:
		return "power-off"
	}
	return fmt.Sprintf("Event(%d)", uint8(e))
}

// TraceEvent is one card operation done for the host. Its slices are
// copies owned by the receiver.
type TraceEvent struct {
	Time     time.Time
	Slot     int
	Event    Event
	Command  []byte // command APDU; for VERIFY and the like only its header
	Redacted int    // bytes removed from Command
	Response []byte // response APDU, or the ATR for EventPowerOn
	Duration time.Duration
	Err      error
}

// Errors of Insert and Remove.
var (
	ErrNoCard   = errors.New("ccid: no card in slot")
	ErrSlotFull = errors.New("ccid: slot already holds a card")
	// ErrReset is what a pending In returns when the device is reset.
	ErrReset = errors.New("ccid: device reset")
)

// Reader is a CCID reader with Slots slots. Create it with New.
type Reader struct {
	opts   Options
	log    *slog.Logger
	config []byte // configuration descriptor, fixed by Slots

	// timeExt is how long a card operation runs before the first time
	// extension message, and timeExtEvery the interval of the next ones.
	timeExt, timeExtEvery time.Duration
	// maxQueued bounds the answers waiting on bulk IN before Out blocks.
	maxQueued int

	mu   sync.Mutex
	wake chan struct{} // closed and replaced on every state change
	// intrWake is closed and replaced only on what the interrupt
	// endpoint reports (slot changes, halt, reset, configuration), so
	// that the poller waiting in interruptIn sleeps through the bulk
	// traffic of every APDU instead of waking for each message.
	intrWake   chan struct{}
	gen        uint64 // bumped by Reset: answers of older commands are dropped
	configured uint8
	halted     map[uint8]bool // endpoints halted by SET_FEATURE(ENDPOINT_HALT)

	outBuf  []byte    // a bulk OUT message arriving in pieces
	queue   []*outMsg // RDR_to_PC messages for bulk IN
	intr    []byte    // rest of an interrupt message the host read in part
	notify  bool      // report every slot's state at the next interrupt poll
	running int       // commands being executed

	slots []*slot
}

// outMsg is one message on the bulk IN queue.
type outMsg struct {
	b     []byte
	off   int  // bytes already returned by In
	taken bool // fully returned
}

// slot is the state of one slot; guarded by Reader.mu. The card itself is
// called only by the goroutine that owns the slot (busy), so card calls
// are serialised as card.Card requires.
type slot struct {
	card    card.Card
	powered bool
	changed bool // presence changed since the last NotifySlotChange

	busy     bool
	cancel   context.CancelFunc // of the running command
	abortSeq int                // bSeq of a pending Abort, -1 if none
	removing bool               // Remove waits for the running command
	ext      *outMsg            // last time extension, to send one at a time
	seq      byte               // bSeq of the running command
	abortCmd []byte             // header of a bulk Abort to answer after the running command

	clockStopped bool
	params       params
}

// New returns a Reader with all slots empty.
func New(opts *Options) *Reader {
	r := &Reader{
		timeExt:      250 * time.Millisecond,
		timeExtEvery: time.Second,
		maxQueued:    16,
		wake:         make(chan struct{}),
		intrWake:     make(chan struct{}),
		halted:       map[uint8]bool{},
		notify:       true,
	}
	if opts != nil {
		r.opts = *opts
	}
	if r.opts.Slots <= 0 {
		r.opts.Slots = 1
	}
	if r.opts.Slots > maxSlots {
		r.opts.Slots = maxSlots
	}
	if r.opts.VendorID == 0 && r.opts.ProductID == 0 {
		r.opts.VendorID, r.opts.ProductID = 0x08E6, 0x4433
	}
	if r.opts.Manufacturer == "" {
		r.opts.Manufacturer = "vscard"
	}
	if r.opts.Product == "" {
		r.opts.Product = "vscard CCID reader"
	}
	r.log = r.opts.Logger
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	for range r.opts.Slots {
		r.slots = append(r.slots, &slot{abortSeq: -1})
	}
	r.config = r.configDescriptor()
	return r
}

// Slots returns the number of slots.
func (r *Reader) Slots() int { return len(r.slots) }

// broadcast wakes every waiter, the interrupt poller included; r.mu
// must be held.
func (r *Reader) broadcast() {
	r.dataChanged()
	close(r.intrWake)
	r.intrWake = make(chan struct{})
}

// dataChanged wakes the waiters of the bulk pipes (In, Out waiting for
// room, Remove waiting for a command to end) but not the interrupt poller:
// an answer queued or read is no slot news. r.mu must be held.
func (r *Reader) dataChanged() {
	close(r.wake)
	r.wake = make(chan struct{})
}

// Insert puts c in slot (0-based). The card stays unpowered until the host
// powers it on; the host learns of it through NotifySlotChange.
func (r *Reader) Insert(slot int, c card.Card) error {
	if slot < 0 || slot >= len(r.slots) {
		return fmt.Errorf("ccid: insert: slot %d does not exist (reader has %d)", slot, len(r.slots))
	}
	if c == nil {
		return fmt.Errorf("ccid: insert: nil card")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.slots[slot]
	if s.card != nil || s.removing {
		return fmt.Errorf("ccid: insert slot %d: %w", slot, ErrSlotFull)
	}
	s.card, s.powered, s.changed, s.clockStopped = c, false, true, false
	s.params = paramsFromATR(c.ATR())
	r.broadcast()
	r.log.Debug("ccid: card inserted", "slot", slot)
	return nil
}

// Remove takes the card out of slot. A command running on it is cancelled
// and waited for; it answers the host with a failure (ICC mute). A powered
// card is powered off first, as contacts opening would.
func (r *Reader) Remove(slot int) error {
	if slot < 0 || slot >= len(r.slots) {
		return fmt.Errorf("ccid: remove: slot %d does not exist (reader has %d)", slot, len(r.slots))
	}
	r.mu.Lock()
	s := r.slots[slot]
	if s.card == nil || s.removing {
		r.mu.Unlock()
		return fmt.Errorf("ccid: remove slot %d: %w", slot, ErrNoCard)
	}
	s.removing = true
	for s.busy {
		if s.cancel != nil {
			s.cancel()
		}
		w := r.wake
		r.mu.Unlock()
		<-w
		r.mu.Lock()
	}
	c, powered := s.card, s.powered
	s.busy = true // keep commands off the card while it powers down
	r.mu.Unlock()
	if powered {
		c.PowerOff()
	}
	r.mu.Lock()
	s.busy, s.removing = false, false
	s.card, s.powered, s.changed = nil, false, true
	r.broadcast()
	r.mu.Unlock()
	r.log.Debug("ccid: card removed", "slot", slot)
	return nil
}

// Info implements usb.Device.
func (r *Reader) Info() usb.Info {
	return usb.Info{
		Speed:              usb.SpeedFull,
		VendorID:           r.opts.VendorID,
		ProductID:          r.opts.ProductID,
		BCDDevice:          0x0100,
		ConfigurationValue: 1,
		NumConfigurations:  1,
		Interfaces:         []usb.Interface{{Number: 0, Class: 0x0B}},
		Endpoints:          append([]usb.Endpoint(nil), endpoints...),
	}
}

// Reset implements usb.Device: the reader returns to its unconfigured
// state, queued answers and half-received commands are dropped, running
// commands are cancelled (their answers dropped) and powered cards are
// powered off. Cards stay inserted.
func (r *Reader) Reset() {
	r.mu.Lock()
	r.gen++
	r.configured = 0
	clear(r.halted)
	r.outBuf, r.queue, r.intr = nil, nil, nil
	r.notify = true
	var (
		off   []*slot
		cards []card.Card
	)
	for _, s := range r.slots {
		s.ext = nil
		s.abortSeq = -1
		s.clockStopped = false
		if s.busy {
			// The command's goroutine powers the card off when it
			// ends (it sees the new generation).
			if s.cancel != nil {
				s.cancel()
			}
			continue
		}
		if s.card != nil {
			s.params = paramsFromATR(s.card.ATR())
			if s.powered {
				// Held busy while it powers down, so no command
				// reaches the card meanwhile (card.Card calls are
				// serialised).
				off, cards = append(off, s), append(cards, s.card)
				s.powered, s.busy = false, true
			}
		}
	}
	r.broadcast()
	r.mu.Unlock()
	// Powering off outside the lock: a card over pcscd may take a while.
	for _, c := range cards {
		c.PowerOff()
	}
	if len(off) > 0 {
		r.mu.Lock()
		for _, s := range off {
			s.busy = false
		}
		r.broadcast()
		r.mu.Unlock()
	}
	r.log.Debug("ccid: reset")
}

// In implements usb.Device.
func (r *Reader) In(ctx context.Context, ep uint8, max int) ([]byte, error) {
	switch ep {
	case epBulkIn:
		return r.bulkIn(ctx, max)
	case epIntrIn:
		return r.interruptIn(ctx, max)
	}
	return nil, usb.ErrStall
}

func (r *Reader) bulkIn(ctx context.Context, max int) ([]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	gen := r.gen
	for {
		if r.halted[epBulkIn] {
			return nil, usb.ErrStall
		}
		if len(r.queue) > 0 {
			m := r.queue[0]
			n := min(max, len(m.b)-m.off)
			n = max0(n)
			out := append([]byte(nil), m.b[m.off:m.off+n]...)
			m.off += n
			if m.off == len(m.b) {
				m.taken = true
				r.queue[0] = nil
				r.queue = r.queue[1:]
				r.dataChanged() // Out may be waiting for room
			}
			return out, nil
		}
		if err := r.waitLocked(ctx, gen, r.wake); err != nil {
			return nil, err
		}
	}
}

func max0(n int) int {
	if n < 0 {
		return 0
	}
	return n
}

// waitLocked waits for w (r.wake or r.intrWake) to be closed with r.mu
// held (it is released while waiting). It fails when ctx ends or the
// device is reset.
func (r *Reader) waitLocked(ctx context.Context, gen uint64, w chan struct{}) error {
	r.mu.Unlock()
	select {
	case <-w:
	case <-ctx.Done():
	}
	r.mu.Lock()
	if r.gen != gen {
		return ErrReset
	}
	return ctx.Err()
}

// interruptIn serves NotifySlotChange (CCID 1.1 §6.3.1): 0x50 and two bits
// per slot, bit 0 card present and bit 1 changed. The first poll after
// attach, reset or configuration reports every slot, changed set for
// present cards, as libccid's first interrupt read expects a current
// picture (protocols.md §4.2); after that the poll waits for a change.
func (r *Reader) interruptIn(ctx context.Context, max int) ([]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	gen := r.gen
	for {
		if r.halted[epIntrIn] {
			return nil, usb.ErrStall
		}
		if len(r.intr) == 0 {
			r.intr = r.slotChangeLocked()
		}
		if len(r.intr) > 0 {
			n := max0(min(max, len(r.intr)))
			out := append([]byte(nil), r.intr[:n]...)
			r.intr = r.intr[n:]
			return out, nil
		}
		if err := r.waitLocked(ctx, gen, r.intrWake); err != nil {
			return nil, err
		}
	}
}

// slotChangeLocked returns a NotifySlotChange message if there is news,
// clearing the changed bits, or nil.
func (r *Reader) slotChangeLocked() []byte {
	news := r.notify
	for _, s := range r.slots {
		news = news || s.changed
	}
	if !news {
		return nil
	}
	m := make([]byte, 1+(2*len(r.slots)+7)/8)
	m[0] = 0x50
	for i, s := range r.slots {
		var bits byte
		if s.card != nil {
			bits |= 1
		}
		if s.changed || (r.notify && s.card != nil) {
			bits |= 2
		}
		m[1+i/4] |= bits << (2 * (i % 4))
		s.changed = false
	}
	r.notify = false
	return m
}
