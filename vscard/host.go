package vscard

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"context"
	"errors"
	"github.com/vscard/vscard/internal/netutil"
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

// Errors returned by Host.Transmit.
var (
	// ErrAPDUTooLong means the command APDU exceeds HostOptions.MaxAPDU.
	ErrAPDUTooLong = errors.New("vscard: command APDU too long for the client")
	// ErrNoCardPresent means the client has no card in the reader.
	ErrNoCardPresent = errors.New("vscard: no card in the client's reader")
	// ErrClosed means the link is gone.
	ErrClosed = errors.New("vscard: link closed")
)

// APDUError is Transmit's error when the client answered the command with
// an Error message instead of a response: vscclient does when its card
// cannot process the command, with the code in host byte order
// (protocols.md §2.3 item 6; 1 is VREADER_NO_CARD there). The card stays
// inserted: a client whose card went away also sends CardRemove.
type APDUError struct{ Code ErrorCode }

func (e *APDUError) Error() string {
	return fmt.Sprintf("vscard: client could not process the APDU: %v", e.Code)
}

// Host is the reader's side of a VSCard link, the role QEMU's
// ccid-card-passthru plays: it takes one client connection, answers the
// handshake as QEMU 7.2 does (protocols.md §1.5), reports the client's
// reader and card events, and sends it APDUs.
//
// Like QEMU, a Host serves one reader: every ReaderAdd is accepted as
// reader 0. Unlike QEMU, it does not send an Init of its own when it
// starts: QEMU's is lost anyway (peers.md §1.3), and a second Init would
// make vscclient send ReaderRemove twice.
type Host struct {
	conn   net.Conn
	rconn  net.Conn // conn wrapped by netutil.LowLatency
	o      HostOptions
	events chan HostEvent
	sem    chan struct{} // one Transmit at a time: the protocol has no tags
	done   chan struct{} // closed when Serve returns

	mu        sync.Mutex // guards the fields below and writes to conn
	wbuf      []byte
	reader    bool                // a reader was added
	cardIn    bool                // the client inserted a card
	pending   chan transmitResult // the waiting Transmit's channel, or nil
	flushing  chan struct{}       // the waiting Flush's channel, or nil
	flushOwed int                 // FlushCompletes due to Flush calls that gave up
	closedErr error               // why the link ended, once done is closed
}

// transmitResult is the client's answer to a command APDU.
type transmitResult struct {
	resp []byte
	err  error
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
	o.MaxAPDU = min(o.MaxAPDU, maxQEMUPayload)
	return &Host{
		conn:   conn,
		rconn:  netutil.LowLatency(conn),
		o:      o,
		events: make(chan HostEvent, 16),
		sem:    make(chan struct{}, 1),
		done:   make(chan struct{}),
	}
}

// Events returns the channel of the client's reader and card events. It is
// closed after the Closed event when Serve returns. Serve waits while the
// channel is full, so the caller must keep receiving (from a goroutine
// other than the one calling Transmit).
func (h *Host) Events() <-chan HostEvent { return h.events }

// Transmit sends a command APDU to the client's reader readerID and waits
// for the response APDU. Calls are serialised: VSCard has no way to match
// a response to its command other than order. If ctx ends first, Transmit
// returns ctx's error, and the next Transmit waits until the abandoned
// response has arrived (or the link closed), so that it never receives
// another command's response.
func (h *Host) Transmit(ctx context.Context, readerID uint32, apdu []byte) ([]byte, error) {
	if len(apdu) > h.o.MaxAPDU {
		return nil, fmt.Errorf("vscard: transmit %d bytes (limit %d): %w", len(apdu), h.o.MaxAPDU, ErrAPDUTooLong)
	}
	select {
	case <-h.done:
		return nil, h.closedError()
	default:
	}
	select {
	case h.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-h.done:
		return nil, h.closedError()
	}
	ch := make(chan transmitResult, 1)
	h.mu.Lock()
	if !h.cardIn {
		h.mu.Unlock()
		<-h.sem
		return nil, ErrNoCardPresent
	}
	h.pending = ch
	err := h.sendLocked(MsgAPDU, readerID, apdu)
	if err != nil {
		h.pending = nil
	}
	h.mu.Unlock()
	if err != nil {
		<-h.sem
		return nil, err
	}
	select {
	case r := <-ch:
		<-h.sem
		return r.resp, r.err
	case <-h.done:
		<-h.sem
		return nil, h.closedError()
	case <-ctx.Done():
		go func() {
			// Keep the line busy until the orphaned response arrives.
			select {
			case <-ch:
			case <-h.done:
			}
			<-h.sem
		}()
		return nil, ctx.Err()
	}
}

// Flush sends the client a Flush and waits for its FlushComplete, which a
// client sends once it has answered every APDU sent before the Flush
// (protocols.md §1.2): after it, no stale response can be in flight. Like
// Transmit, it waits for the line. vscclient only handles a zero-length
// Flush when more bytes arrive (protocols.md §2.3 item 7), so give ctx a
// deadline: when ctx ends first, Flush returns ctx's error and frees the
// line at once; the late FlushComplete, which vscclient sends before the
// answer to the next APDU, is then dropped.
func (h *Host) Flush(ctx context.Context) error {
	select {
	case <-h.done:
		return h.closedError()
	default:
	}
	select {
	case h.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-h.done:
		return h.closedError()
	}
	defer func() { <-h.sem }()
	ch := make(chan struct{}, 1)
	h.mu.Lock()
	h.flushing = ch
	err := h.sendLocked(MsgFlush, MinimalReaderID, nil)
	if err != nil {
		h.flushing = nil
	}
	h.mu.Unlock()
	if err != nil {
		return err
	}
	select {
	case <-ch:
		return nil
	case <-h.done:
		return h.closedError()
	case <-ctx.Done():
		h.mu.Lock()
		if h.flushing == ch {
			h.flushing = nil
			h.flushOwed++
		}
		h.mu.Unlock()
		select {
		case <-ch: // it arrived meanwhile after all
			return nil
		default:
		}
		return ctx.Err()
	}
}

func (h *Host) closedError() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closedErr != nil {
		return fmt.Errorf("%w: %w", ErrClosed, h.closedErr)
	}
	return ErrClosed
}

// sendLocked writes one message in one write. Called with h.mu held.
func (h *Host) sendLocked(t MsgType, reader uint32, payload []byte) error {
	h.wbuf = AppendMessage(h.wbuf[:0], Message{Type: t, ReaderID: reader, Payload: payload})
	// A client that stops reading must not hold h.mu forever.
	_ = h.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	if _, err := h.conn.Write(h.wbuf); err != nil {
		return fmt.Errorf("vscard: host write %v: %w", t, err)
	}
	return nil
}

func (h *Host) send(t MsgType, reader uint32, payload []byte) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.sendLocked(t, reader, payload)
}

// Serve reads the client's messages and answers them until ctx is done or
// the connection ends, then closes the connection, fails a waiting
// Transmit, sends Closed and closes the Events channel. It returns nil when
// ctx ended it, and otherwise why the link ended: an error wrapping io.EOF
// for a clean close, io.ErrUnexpectedEOF for a close inside a message, or
// ErrTooLarge for a length no VSCard peer can send (the stream cannot be
// resynchronised after it; QEMU drops the link too, protocols.md §1.5).
// Call it once.
func (h *Host) Serve(ctx context.Context) (err error) {
	stop := context.AfterFunc(ctx, func() { h.conn.Close() })
	defer func() {
		stop()
		h.conn.Close()
		if ctx.Err() != nil {
			err = nil
		}
		h.mu.Lock()
		h.closedErr = err
		if err == nil {
			h.closedErr = context.Cause(ctx)
		}
		h.pending = nil
		h.mu.Unlock()
		close(h.done)
		select {
		case h.events <- Closed{Err: err}:
		default:
			h.o.Logger.Warn("VSCard host: events channel full; Closed event dropped")
		}
		close(h.events)
	}()

	buf := make([]byte, 0, 512)
	for {
		var m Message
		m, buf, err = ReadMessage(h.rconn, buf)
		if err != nil {
			if errors.Is(err, io.EOF) {
				return fmt.Errorf("vscard: connection closed by client: %w", err)
			}
			return err
		}
		if err := h.handle(ctx, m); err != nil {
			return err
		}
	}
}

// emit delivers an event, waiting while the channel is full.
func (h *Host) emit(ctx context.Context, ev HostEvent) {
	select {
	case h.events <- ev:
	case <-ctx.Done():
	}
}

// failPending fails a waiting Transmit: QEMU discards pending answers when
// the reader or card goes away (protocols.md §1.5). Called with h.mu held.
func (h *Host) failPendingLocked(err error) {
	if h.pending != nil {
		h.pending <- transmitResult{err: err}
		h.pending = nil
	}
}

// handle answers one client message the way QEMU 7.2 does (protocols.md
// §1.5).
func (h *Host) handle(ctx context.Context, m Message) error {
	log := h.o.Logger
	switch m.Type {
	case MsgInit:
		version, _, err := ParseInit(m.Payload)
		if err != nil {
			// QEMU only logs a bad Init; a short one would corrupt its
			// memory. Refuse it and keep reading.
			log.Warn("VSCard host: bad Init from client", "err", err)
			return h.send(MsgError, m.ReaderID, ErrorPayload(CodeGeneralError))
		}
		if version != Version {
			log.Warn("VSCard host: client speaks another version", "version", version)
		}
		return h.send(MsgInit, UndefinedReaderID, InitPayload(0))

	case MsgReaderAdd:
		h.mu.Lock()
		added := !h.reader
		h.reader = true
		err := h.sendLocked(MsgError, MinimalReaderID, ErrorPayload(CodeOK))
		h.mu.Unlock()
		if added {
			h.emit(ctx, ReaderAdded{ID: MinimalReaderID, Name: strings.ToValidUTF8(string(m.Payload), "\uFFFD")})
		}
		return err

	case MsgReaderRemove:
		h.mu.Lock()
		hadCard, hadReader := h.cardIn, h.reader
		h.cardIn, h.reader = false, false
		h.failPendingLocked(ErrNoCardPresent)
		err := h.sendLocked(MsgError, m.ReaderID, ErrorPayload(CodeOK))
		h.mu.Unlock()
		if hadCard {
			h.emit(ctx, CardRemoved{ID: MinimalReaderID})
		}
		if hadReader {
			h.emit(ctx, ReaderRemoved{ID: MinimalReaderID})
		}
		return err

	case MsgATR:
		if !validATR(m.Payload) {
			log.Warn("VSCard host: client sent an ATR QEMU would refuse", "atr", fmt.Sprintf("%X", m.Payload))
			return h.send(MsgError, m.ReaderID, ErrorPayload(CodeGeneralError))
		}
		atr := append([]byte(nil), m.Payload...)
		h.mu.Lock()
		h.cardIn = true
		// A new ATR is a card reset: QEMU answers pending commands empty.
		h.failPendingLocked(errors.New("vscard: card was reset"))
		err := h.sendLocked(MsgError, m.ReaderID, ErrorPayload(CodeOK))
		h.mu.Unlock()
		h.emit(ctx, CardInserted{ID: MinimalReaderID, ATR: atr})
		return err

	case MsgCardRemove:
		h.mu.Lock()
		had := h.cardIn
		h.cardIn = false
		h.failPendingLocked(ErrNoCardPresent)
		err := h.sendLocked(MsgError, m.ReaderID, ErrorPayload(CodeOK))
		h.mu.Unlock()
		if had {
			h.emit(ctx, CardRemoved{ID: MinimalReaderID})
		}
		return err

	case MsgAPDU:
		h.mu.Lock()
		defer h.mu.Unlock()
		if h.pending == nil {
			// QEMU drops a response nobody asked for.
			log.Debug("VSCard host: unsolicited APDU from client dropped", "len", len(m.Payload))
			return nil
		}
		h.pending <- transmitResult{resp: append([]byte(nil), m.Payload...)}
		h.pending = nil
		return nil

	case MsgError:
		code, err := ParseError(m.Payload)
		if err != nil {
			code = CodeGeneralError
		}
		h.mu.Lock()
		defer h.mu.Unlock()
		if h.pending != nil {
			// vscclient's answer when the card cannot process a command; QEMU
			// fails the guest's XfrBlock.
			h.failPendingLocked(&APDUError{Code: code})
			return nil
		}
		log.Debug("VSCard host: error from client", "code", code)
		return nil

	case MsgFlush:
		// Flush is the host's message; a client that sends one gets the
		// answer a client would give.
		return h.send(MsgFlushComplete, m.ReaderID, nil)

	case MsgFlushComplete:
		h.mu.Lock()
		defer h.mu.Unlock()
		switch {
		case h.flushOwed > 0:
			// The answer to a Flush whose caller gave up.
			h.flushOwed--
		case h.flushing != nil:
			h.flushing <- struct{}{}
			h.flushing = nil
		default:
			log.Debug("VSCard host: FlushComplete nobody asked for")
		}
		return nil

	default:
		log.Debug("VSCard host: unexpected message", "type", m.Type, "len", len(m.Payload))
		return h.send(MsgError, m.ReaderID, ErrorPayload(CodeGeneralError))
	}
}

// maxATR is the longest ATR QEMU accepts (protocols.md §1.5).
const maxATR = 40

// validATR applies QEMU's ATR checks (check_atr in ccid-card-passthru,
// protocols.md §1.5), including its off-by-one in following TDi, so that
// the host accepts exactly what QEMU accepts.
func validATR(atr []byte) bool {
	if len(atr) > maxATR || len(atr) < 2 {
		return false
	}
	if atr[0] != 0x3B && atr[0] != 0x3F {
		return false
	}
	hist := int(atr[1] & 0x0F)
	opt := 0
	td := atr[1] >> 4
	for count := 0; td != 0 && count < 2 && opt+hist+2 < len(atr); count++ {
		for _, bit := range []byte{0x1, 0x2, 0x4} {
			if td&bit != 0 {
				opt++
			}
		}
		if td&0x8 == 0 {
			// QEMU keeps td and counts the same bits again on the next
			// round; so does this.
			continue
		}
		opt++
		if opt+2 >= len(atr) {
			return false
		}
		td = atr[opt+2] >> 4
	}
	return len(atr) >= 2+hist+opt
}
