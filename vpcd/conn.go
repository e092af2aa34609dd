package vpcd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"time"

	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/internal/netutil"
)

// Control messages: the 1-byte payloads vpcd sends (VPCD_CTRL_* in
// vsmartcard's vpcd.h, peers.md §2.1).
const (
	ctrlOff   = 0x00
	ctrlOn    = 0x01
	ctrlReset = 0x02
	ctrlATR   = 0x04
)

// swNoDiagnosis is what vpcd is told when the card's answer cannot be
// framed. An empty reply is not an option: vpcd treats a 0-length response
// as a dead card and ejects it (vicc_transmit: r <= 0).
var swNoDiagnosis = []byte{0x6F, 0x00}

// ServeConn runs the vpcd protocol for c on nc, which must already be
// connected to vpcd, until ctx is done or the connection ends. It always
// closes nc, and powers c off when the connection ends (the card left the
// reader, so verified PINs and selections must not survive).
//
// It returns nil when ctx ended the connection; an error wrapping io.EOF
// when vpcd closed it cleanly; an error wrapping io.ErrUnexpectedEOF when it
// closed mid-message; and an error wrapping ErrCardFailed when c.Transmit
// failed.
//
// The command slice passed to c.Transmit is only valid during the call: it
// aliases the connection's receive buffer.
func ServeConn(ctx context.Context, nc net.Conn, c card.Card, opts *Options) error {
	o := opts.withDefaults()
	_, err := serveConn(ctx, nc, c, &o, nil)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// serveConn is ServeConn; served reports whether vpcd sent at least one
// message, which Serve uses to tell a working link from one that drops at
// once. onFirst, if not nil, is called when the first message arrives.
func serveConn(ctx context.Context, nc net.Conn, c card.Card, o *Options, onFirst func()) (served bool, err error) {
	// Closing the socket is both how cancellation interrupts a blocked
	// read and how vpcd learns that the card is gone.
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	defer func() {
		stop()
		nc.Close()
		c.PowerOff()
	}()

	var conn net.Conn
	if o.noQuickAck {
		if tc, ok := nc.(*net.TCPConn); ok {
			_ = tc.SetNoDelay(true)
		}
		conn = nc
	} else {
		conn = netutil.LowLatency(nc)
	}
	s := session{
		ctx:   ctx,
		conn:  conn,
		card:  c,
		log:   o.Logger,
		trace: o.Trace,
		fr:    newFrameReader(conn),
		// Room for a short APDU's full response and its length prefix;
		// grown once, then reused, by longer ones.
		wbuf: make([]byte, 0, 2+256+2),
	}
	for {
		msg, err := s.fr.next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return served, fmt.Errorf("vpcd: connection closed by vpcd: %w", err)
			}
			return served, fmt.Errorf("vpcd: read: %w", err)
		}
		if !served {
			served = true
			if onFirst != nil {
				onFirst()
			}
		}
		if err := s.handle(msg); err != nil {
			return served, err
		}
	}
}

// session is the state of one connection.
type session struct {
	ctx   context.Context
	conn  net.Conn
	card  card.Card
	log   *slog.Logger
	trace func(TraceEvent)
	fr    *frameReader
	wbuf  []byte
}

// handle answers one message from vpcd.
func (s *session) handle(msg []byte) error {
	var start time.Time
	if s.trace != nil {
		start = time.Now()
	}
	switch len(msg) {
	case 0:
		// vpcd never sends an empty message (vicc_transmit skips the send
		// for apdu_len 0), so nobody waits for an answer: ignore it rather
		// than put an unsolicited reply on the wire.
		s.log.Debug("ignoring empty message from vpcd")
		return nil
	case 1:
		return s.control(msg[0], start)
	}

	resp, err := s.card.Transmit(s.ctx, msg)
	if s.trace != nil {
		// The event is taken now (the arguments of a deferred call are
		// evaluated at once) but written when the answer is on the wire:
		// encoding and writing a line costs about 10 µs, which would
		// otherwise sit in every APDU's round trip.
		defer s.trace(newAPDUEvent(start, msg, resp, err))
	}
	if err != nil {
		return fmt.Errorf("%w: %w", ErrCardFailed, err)
	}
	if len(resp) < 2 || len(resp) > MaxPayload {
		// Not a response APDU (no SW), or too long for the 16-bit length
		// prefix: a card bug, but the reader stays usable.
		s.log.Warn("card returned an invalid response; answering 6F 00",
			"len", len(resp), "ins", fmt.Sprintf("%02X", msg[1]))
		resp = swNoDiagnosis
	}
	return s.reply(resp)
}

// control handles a 1-byte control message (peers.md §2.1, §2.2).
func (s *session) control(b byte, start time.Time) error {
	var ev Event
	var reply []byte
	switch b {
	case ctrlOff:
		ev = EventPowerOff
		s.card.PowerOff()
	case ctrlOn:
		ev = EventPowerOn
		s.card.PowerOn()
	case ctrlReset:
		ev = EventReset
		s.card.Reset()
	case ctrlATR:
		ev = EventGetATR
		reply = s.card.ATR()
	default:
		// No defined meaning, and vpcd only waits for an answer after
		// GetATR, so any reply would desynchronise the stream.
		s.log.Debug("ignoring unknown vpcd control byte", "byte", fmt.Sprintf("%02X", b))
		ev = EventUnknown
	}
	if s.trace != nil {
		e := TraceEvent{Time: start, Event: ev, Duration: time.Since(start)}
		if ev == EventUnknown {
			e.Command = []byte{b}
		}
		if ev == EventGetATR {
			e.Response = append([]byte(nil), reply...)
		}
		defer s.trace(e) // after the answer, as for APDUs
	}
	if ev != EventGetATR {
		return nil
	}
	if len(reply) > MaxPayload {
		// An ATR is at most 33 bytes (ISO 7816-3); this only guards the
		// frame encoder. An empty ATR would mean "no card" to vpcd.
		reply = reply[:0]
	}
	return s.reply(reply)
}

// reply sends payload as one frame in one write, so that vpcd's side
// never waits on Nagle for the second half of a message (peers.md §4.1).
func (s *session) reply(payload []byte) error {
	buf, err := appendFrame(s.wbuf[:0], payload)
	if err != nil {
		return err
	}
	s.wbuf = buf
	if _, err := s.conn.Write(buf); err != nil {
		return fmt.Errorf("vpcd: write: %w", err)
	}
	return nil
}
