package vscard

import (
	"fmt"
	"io"
	"math/rand/v2"

	"context"
	"errors"
	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/internal/netutil"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
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
	// RESPONSE for the rest is answered by the client itself. Hosts that
	// follow 61 xx chains and keep the data (OpenSC) read the same bytes;
	// CoolKey does not follow them, see qemu54.go. Command-line tools turn
	// it on by default.
	QEMU54Workaround bool

	// NoReader starts the client without a reader: on each connection it
	// only clears the host's reader (ReaderRemove) until AddReader is
	// called. A physical reader that is not plugged in yet, or pcscd that
	// is down, is such a case.
	NoReader bool

	// noQuickAck turns the TCP_QUICKACK re-arm off, so that benchmarks can
	// show the stall it prevents.
	noQuickAck bool
}

// ClientStatus is a snapshot of a Client's state.
type ClientStatus struct {
	Connected    bool      // a connection to the host is up and the handshake is done
	Reader       bool      // the reader is present (see AddReader, RemoveReader)
	Addr         string    // the host's address while connected
	CardInserted bool      // the client holds a card (whether or not the host has it yet)
	APDUs        uint64    // APDUs answered since NewClient
	Connects     uint64    // handshakes completed since NewClient
	LastError    string    // the last connection or card error, if any
	Since        time.Time // when Connected last changed
}

// Errors returned by Client.Insert, Remove, AddReader and RemoveReader.
var (
	ErrCardInserted  = errors.New("vscard: a card is already inserted")
	ErrNoCard        = errors.New("vscard: no card inserted")
	ErrReaderPresent = errors.New("vscard: the reader is already present")
	ErrNoReader      = errors.New("vscard: no reader present")
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
	sess       *session // the current connection, nil between connections
	// reader reports whether the reader is plugged in (AddReader,
	// RemoveReader); without it the host gets no ReaderAdd.
	reader bool

	stMu      sync.Mutex // guards st; separate so Status never waits for an APDU
	st        ClientStatus
	hasCard   atomic.Bool // card != nil, readable without mu
	hasReader atomic.Bool // reader, readable without mu
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
	cl := &Client{dial: dial, o: o, card: c, reader: !o.NoReader}
	cl.hasCard.Store(c != nil)
	cl.hasReader.Store(cl.reader)
	return cl
}

// Run connects to the host and serves the card until ctx is done. On each
// connection it sends Init, waits for the host's Init, sends ReaderRemove
// (clearing a reader left over from a previous connection, as vscclient
// does) and ReaderAdd (unless the reader is absent: NoReader,
// RemoveReader), and once both are acknowledged powers the card on and
// sends its ATR. It then answers APDUs and Flush. When the connection
// drops — QEMU restarted, the network went away — it reconnects with
// backoff and replays the sequence, so the guest gets its card back
// (QEMU ignores the socket closing and keeps the old card "inserted" until
// the new ReaderRemove, protocols.md §1.5). End of stream is a dropped
// connection, never a reason to read again at once: vscclient spins at
// 100% CPU there (peers.md §1.3).
//
// When ctx is done, Run sends CardRemove (if a card is in) and
// ReaderRemove, makes sure they reach the host before the connection
// closes (vscclient loses them, peers.md §1.3), closes the connection and
// returns nil. Run is not reentrant: call it once at a time.
func (c *Client) Run(ctx context.Context) error {
	log := c.o.Logger
	backoff := c.o.MinBackoff
	lastReason := ""
	for ctx.Err() == nil {
		nc, err := c.dial(ctx)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			c.setError(err)
			wait := jitter(backoff)
			// Say once what we are waiting for and again only when the reason
			// changes: QEMU may legitimately be down for a long time.
			level := slog.LevelDebug
			if reason := err.Error(); reason != lastReason {
				level, lastReason = slog.LevelInfo, reason
			}
			log.Log(ctx, level, "waiting for VSCard host", "err", err, "retry_in", wait)
			if !sleep(ctx, wait) {
				break
			}
			backoff = min(2*backoff, c.o.MaxBackoff)
			continue
		}
		lastReason = ""
		handshook, err := c.serveConn(ctx, nc)
		if ctx.Err() != nil {
			break
		}
		c.setError(err)
		if handshook {
			// The link worked; a drop now is most likely a QEMU restart,
			// which deserves a quick reconnect.
			backoff = c.o.MinBackoff
		}
		wait := jitter(backoff)
		log.Warn("VSCard connection lost", "err", err, "retry_in", wait)
		if !sleep(ctx, wait) {
			break
		}
		// A host that accepts and hangs up at once must not make us spin.
		backoff = min(2*backoff, c.o.MaxBackoff)
	}
	log.Info("VSCard client stopped")
	return nil
}

// Insert puts card into the reader, powering it on and sending its ATR if
// the link is up (otherwise when it comes up). card nil re-inserts the card
// most recently removed. It fails with ErrCardInserted if a card is in.
func (c *Client) Insert(cd card.Card) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.card != nil {
		return ErrCardInserted
	}
	if cd == nil {
		if cd = c.last; cd == nil {
			return fmt.Errorf("vscard: insert: no card to re-insert: %w", ErrNoCard)
		}
	}
	c.card = cd
	c.hasCard.Store(true)
	if s := c.sess; s != nil && s.ready && !s.closing {
		return s.insertCard()
	}
	return nil
}

// Remove takes the card out of the reader: it sends CardRemove if the link
// is up and powers the card off. It fails with ErrNoCard if there is no
// card.
func (c *Client) Remove() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.card == nil {
		return ErrNoCard
	}
	var err error
	if s := c.sess; s != nil && s.atrSent && !s.closing {
		err = s.removeCard()
	} else {
		c.card.PowerOff()
		c.last, c.card = c.card, nil
		c.hasCard.Store(false)
	}
	return err
}

// AddReader plugs the reader in: if the link is up it sends ReaderAdd
// and, once the host acknowledges it, the held card's ATR (otherwise both
// go out when the link comes up). It fails with ErrReaderPresent if the
// reader is there.
func (c *Client) AddReader() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.reader {
		return ErrReaderPresent
	}
	c.reader = true
	c.hasReader.Store(true)
	if s := c.sess; s != nil && s.gotInit && !s.closing {
		return s.sendOut(MsgReaderAdd, MinimalReaderID, []byte(c.o.ReaderName))
	}
	return nil
}

// RemoveReader unplugs the reader: if the link is up it sends CardRemove
// (if the host has the card) and ReaderRemove. A held card stays held and
// is inserted again after AddReader. It fails with ErrNoReader if the
// reader is not there.
func (c *Client) RemoveReader() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.reader {
		return ErrNoReader
	}
	c.reader = false
	c.hasReader.Store(false)
	s := c.sess
	if s == nil || !s.gotInit || s.closing {
		return nil
	}
	s.held = nil
	if s.atrSent {
		s.atrSent = false
		c.card.PowerOff()
		s.log.Info("card removed with its reader")
		if err := s.sendOut(MsgCardRemove, s.reader, nil); err != nil {
			return err
		}
	}
	s.ready = false
	s.log.Info("reader removed", "reader", s.reader)
	return s.sendOut(MsgReaderRemove, s.reader, nil)
}

// Status returns a snapshot of the client's state.
func (c *Client) Status() ClientStatus {
	c.stMu.Lock()
	s := c.st
	c.stMu.Unlock()
	s.CardInserted = c.hasCard.Load()
	s.Reader = c.hasReader.Load()
	return s
}

func (c *Client) setError(err error) {
	if err == nil {
		return
	}
	c.stMu.Lock()
	c.st.LastError = err.Error()
	c.stMu.Unlock()
}

func (c *Client) setConnected(up bool, addr string) {
	c.stMu.Lock()
	defer c.stMu.Unlock()
	if c.st.Connected == up {
		return
	}
	c.st.Connected, c.st.Addr, c.st.Since = up, addr, time.Now()
	if up {
		c.st.Connects++
	}
}

// linger bounds how long shutdown waits for the host to acknowledge
// CardRemove and ReaderRemove before closing the connection.
const linger = time.Second

// writeTimeout bounds one write to the host. QEMU reads its chardev from
// the main loop even while the guest is stopped, so a write that takes
// this long means the host is wedged; the link is dropped and redialled.
const writeTimeout = 10 * time.Second

// session is the state of one connection. Every field except raw, conn
// and the read buffer is guarded by Client.mu, which the read loop holds
// while it handles a message (including the card's Transmit), so Insert
// and Remove never interleave with an APDU.
type session struct {
	c    *Client
	ctx  context.Context
	raw  net.Conn // the dialled connection, for CloseWrite and deadlines
	conn net.Conn // raw wrapped by netutil.LowLatency
	log  *slog.Logger
	wbuf []byte

	gotInit bool      // the host's Init arrived; ReaderRemove+ReaderAdd sent
	ready   bool      // ReaderAdd acknowledged: the reader exists in the host
	atrSent bool      // the host has the card (ATR sent, no CardRemove since)
	closing bool      // shutdown started: answer nothing more
	reader  uint32    // reader id the host assigned (QEMU: always 0)
	expect  []MsgType // sent messages awaiting the host's Error ack, oldest first
	held    []byte    // QEMU54Workaround: rest of a split response, with its SW
}

// serveConn runs one connection until it fails or ctx ends. handshook
// reports whether the reader was accepted, which Run uses to reset its
// backoff.
func (c *Client) serveConn(ctx context.Context, nc net.Conn) (handshook bool, err error) {
	addr := ""
	if ra := nc.RemoteAddr(); ra != nil {
		addr = ra.String()
	}
	s := &session{
		c:    c,
		ctx:  ctx,
		raw:  nc,
		conn: lowLatency(nc, c.o.noQuickAck),
		log:  c.o.Logger.With("addr", addr),
		wbuf: make([]byte, 0, HeaderSize+258),
	}
	s.log.Debug("connected to VSCard host")

	c.mu.Lock()
	c.sess = s
	// QEMU's own Init, sent when the device is realized, is lost on a socket
	// nobody was connected to, and QEMU never sends it again on connect: the
	// client speaks first and QEMU answers (protocols.md §1.5, peers.md §1.3).
	err = s.sendOut(MsgInit, 0, InitPayload(0))
	c.mu.Unlock()

	stop := context.AfterFunc(ctx, func() { c.shutdown(s) })
	defer func() {
		stop()
		c.mu.Lock()
		if c.card != nil && s.atrSent {
			// The card left the reader as far as this link goes: drop
			// verified PINs and selections before the next connection.
			c.card.PowerOff()
		}
		c.sess = nil
		c.mu.Unlock()
		nc.Close()
		c.setConnected(false, "")
	}()
	if err != nil {
		return false, err
	}

	buf := make([]byte, 0, 512)
	for {
		var m Message
		m, buf, err = ReadMessage(s.conn, buf)
		if err != nil {
			c.mu.Lock()
			closing := s.closing
			c.mu.Unlock()
			if closing {
				// EOF or the linger deadline after our shutdown messages.
				return s.ready, nil
			}
			if errors.Is(err, io.EOF) {
				return s.ready, fmt.Errorf("vscard: connection closed by host: %w", err)
			}
			return s.ready, fmt.Errorf("vscard: read: %w", err)
		}
		c.mu.Lock()
		err = s.handle(m)
		wasReady, closing, drained := s.ready, s.closing, s.closing && len(s.expect) == 0
		c.mu.Unlock()
		if err != nil {
			return wasReady, err
		}
		if wasReady {
			c.setConnected(true, addr)
		}
		if closing && drained {
			// Everything the shutdown sent was acknowledged.
			return wasReady, nil
		}
	}
}

// shutdown sends CardRemove and ReaderRemove and half-closes the
// connection, so that they reach the host ahead of the FIN (a full close
// with unread data could send a RST that discards them). The read loop
// then collects the host's acks until EOF, all acks, or linger expires.
func (c *Client) shutdown(s *session) {
	// If a write is stuck under c.mu, closing the socket unblocks it.
	time.AfterFunc(2*linger, func() { s.raw.Close() })
	c.mu.Lock()
	if !s.closing {
		if s.atrSent && c.card != nil {
			_ = s.sendOut(MsgCardRemove, s.reader, nil)
			s.atrSent = false
			c.card.PowerOff()
		}
		if s.gotInit {
			_ = s.sendOut(MsgReaderRemove, s.reader, nil)
		}
		s.closing = true
	}
	done := len(s.expect) == 0
	c.mu.Unlock()
	if cw, ok := s.raw.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	if done {
		s.raw.Close()
		return
	}
	_ = s.raw.SetReadDeadline(time.Now().Add(linger))
}

// send writes one message in one write (peers.md §4: a split message costs
// the peer a delayed-ACK stall). Called with c.mu held.
func (s *session) send(t MsgType, reader uint32, payload []byte) error {
	s.wbuf = AppendMessage(s.wbuf[:0], Message{Type: t, ReaderID: reader, Payload: payload})
	// A host that stops reading must not wedge the client (and every
	// Insert/Remove waiting for c.mu): give up on the link instead.
	_ = s.raw.SetWriteDeadline(time.Now().Add(writeTimeout))
	if _, err := s.conn.Write(s.wbuf); err != nil {
		return fmt.Errorf("vscard: write %v: %w", t, err)
	}
	return nil
}

// sendOut sends a message the client initiates (not a reply), records that
// the host will acknowledge it with an Error message if it is one QEMU
// acknowledges, and traces it.
func (s *session) sendOut(t MsgType, reader uint32, payload []byte) error {
	if err := s.send(t, reader, payload); err != nil {
		return err
	}
	switch t {
	case MsgReaderAdd, MsgReaderRemove, MsgATR, MsgCardRemove:
		// QEMU answers each with VSC_Error (protocols.md §1.5).
		s.expect = append(s.expect, t)
	}
	if tr := s.c.o.Trace; tr != nil {
		tr(TraceEvent{Time: time.Now(), Dir: "out", Type: t, ReaderID: reader, Command: append([]byte(nil), payload...)})
	}
	return nil
}

// insertCard powers the card on and sends its ATR. Called with c.mu held
// and s.ready.
func (s *session) insertCard() error {
	cd := s.c.card
	cd.PowerOn()
	s.held = nil
	atr := cd.ATR()
	if len(atr) > 40 {
		// QEMU rejects an ATR over 40 bytes (protocols.md §1.5); send it
		// anyway so the refusal shows up in the log, not silence.
		s.log.Warn("card ATR is longer than QEMU accepts", "len", len(atr))
	}
	if err := s.sendOut(MsgATR, s.reader, atr); err != nil {
		return err
	}
	s.atrSent = true
	s.log.Info("card inserted", "atr", fmt.Sprintf("%X", atr))
	return nil
}

// removeCard sends CardRemove, powers the card off and forgets it (keeping
// it for Insert(nil)). Called with c.mu held.
func (s *session) removeCard() error {
	cd := s.c.card
	s.c.last, s.c.card = cd, nil
	s.c.hasCard.Store(false)
	s.held = nil
	cd.PowerOff()
	if !s.atrSent {
		return nil
	}
	s.atrSent = false
	s.log.Info("card removed")
	return s.sendOut(MsgCardRemove, s.reader, nil)
}

// handle processes one message from the host. Called with c.mu held. A
// returned error drops the connection.
func (s *session) handle(m Message) error {
	if s.closing {
		// Only the acks of the shutdown messages matter now; the write side
		// is closed.
		s.traceIn(m, nil, time.Now())
		if m.Type == MsgError && len(s.expect) > 0 {
			s.expect = s.expect[1:]
		}
		return nil
	}
	switch m.Type {
	case MsgInit:
		return s.handleInit(m)
	case MsgError:
		return s.handleError(m)
	case MsgAPDU:
		return s.handleAPDU(m)
	case MsgFlush:
		// APDUs are answered in order before the next message is read, so
		// by now nothing is outstanding. ReadMessage does not wait for bytes
		// after a zero-length message, unlike vscclient (peers.md §1.4).
		s.traceIn(m, nil, time.Now())
		return s.send(MsgFlushComplete, s.reader, nil)
	default:
		// QEMU answers unexpected messages with a general error and keeps
		// reading (protocols.md §1.5); so does the client, where vscclient
		// would stop reading for good (protocols.md §2.3 item 8).
		s.log.Debug("unexpected message from host", "type", m.Type, "len", len(m.Payload))
		s.traceIn(m, nil, time.Now())
		return s.send(MsgError, m.ReaderID, ErrorPayload(CodeGeneralError))
	}
}

func (s *session) handleInit(m Message) error {
	s.traceIn(m, nil, time.Now())
	if s.gotInit {
		// QEMU only sends Init in reply to one; a second is harmless.
		s.log.Debug("ignoring repeated Init from host")
		return nil
	}
	version, _, err := ParseInit(m.Payload)
	if err != nil {
		return fmt.Errorf("vscard: host's Init: %w", err)
	}
	if version != Version {
		s.log.Warn("host speaks another VSCard version", "version", version, "want", Version)
	}
	s.gotInit = true
	// QEMU keeps a card from a previous connection "inserted" (it ignores
	// the socket closing), so remove any stale reader first, as vscclient
	// does; then add ours if it is plugged in. QEMU may answer the
	// ReaderRemove before or after the ReaderAdd is sent (peers.md §1.3):
	// both acks are counted in order.
	if err := s.sendOut(MsgReaderRemove, MinimalReaderID, nil); err != nil {
		return err
	}
	if !s.c.reader {
		s.log.Info("no reader yet; waiting for one before adding it to the host")
		return nil
	}
	return s.sendOut(MsgReaderAdd, MinimalReaderID, []byte(s.c.o.ReaderName))
}

func (s *session) handleError(m Message) error {
	s.traceIn(m, nil, time.Now())
	code, err := ParseError(m.Payload)
	if err != nil {
		code = CodeGeneralError
		s.log.Warn("malformed Error message from host", "err", err)
	}
	if len(s.expect) == 0 {
		// Not an ack of ours: QEMU sends none unasked, but a host may use
		// Error to report trouble (peers.md §1.4).
		s.log.Warn("host reported an error", "code", code, "reader", m.ReaderID)
		return nil
	}
	what := s.expect[0]
	s.expect = s.expect[1:]
	switch what {
	case MsgReaderAdd:
		if slices.Contains(s.expect, MsgReaderAdd) || !s.c.reader {
			// The reader was removed (and maybe added again) since this
			// ReaderAdd went out; only the latest one counts.
			return nil
		}
		if code != CodeOK {
			return fmt.Errorf("vscard: host refused the reader: %v", code)
		}
		if m.ReaderID != UndefinedReaderID {
			// Adopt the id the host assigned, as vscclient does (QEMU: 0).
			s.reader = m.ReaderID
		}
		s.ready = true
		s.log.Info("reader added", "reader", s.reader)
		if s.c.card != nil {
			return s.insertCard()
		}
	case MsgATR:
		if code != CodeOK {
			err := fmt.Errorf("vscard: host refused the card's ATR: %v", code)
			s.log.Error("host refused the card's ATR", "code", code)
			s.c.setError(err)
		}
	default:
		if code != CodeOK {
			s.log.Warn("host refused a message", "type", what, "code", code)
		}
	}
	return nil
}

// swNoDiagnosis answers an APDU whose response cannot be sent.
var swNoDiagnosis = []byte{0x6F, 0x00}

func (s *session) handleAPDU(m Message) error {
	start := time.Now()
	cmd := m.Payload
	cd := s.c.card
	if cd == nil || !s.atrSent {
		// No card in the reader: vscclient answers with an Error (its
		// NO_CARD status), which QEMU turns into a failed DataBlock.
		s.traceIn(m, nil, start)
		return s.send(MsgError, s.reader, ErrorPayload(CodeGeneralError))
	}
	var resp []byte
	if s.held != nil && isGetResponse(cmd) {
		resp = s.fromHeld(cmd[4])
	} else {
		s.held = nil
		var err error
		resp, err = cd.Transmit(s.ctx, cmd)
		if err != nil {
			if s.ctx.Err() != nil {
				return nil // shutting down; shutdown removes the card
			}
			// The card can no longer answer (card.Card contract): fail this
			// APDU and take the card out, keeping the reader.
			s.traceInErr(m, start, err)
			s.log.Error("card failed; removing it", "err", err)
			s.c.setError(fmt.Errorf("vscard: card failed: %w", err))
			if err := s.send(MsgError, s.reader, ErrorPayload(CodeGeneralError)); err != nil {
				return err
			}
			return s.removeCard()
		}
		if len(resp) < 2 || len(resp) > maxQEMUPayload {
			s.log.Warn("card returned an invalid response; answering 6F 00", "len", len(resp))
			resp = swNoDiagnosis
		}
		if s.c.o.QEMU54Workaround && len(resp) == qemuBadLen {
			resp = s.split54(resp)
		}
	}
	err := s.send(MsgAPDU, s.reader, resp)
	s.c.stMu.Lock()
	s.c.st.APDUs++
	s.c.stMu.Unlock()
	s.traceIn(m, resp, start)
	return err
}

// traceIn reports a message from the host, with the response sent.
func (s *session) traceIn(m Message, resp []byte, start time.Time) {
	tr := s.c.o.Trace
	if tr == nil {
		return
	}
	e := TraceEvent{Time: start, Dir: "in", Type: m.Type, ReaderID: m.ReaderID, Duration: time.Since(start)}
	if m.Type == MsgAPDU {
		e.Command, e.Redacted = apdu.Redact(m.Payload)
	} else {
		e.Command = append([]byte(nil), m.Payload...)
	}
	e.Response = append([]byte(nil), resp...)
	tr(e)
}

func (s *session) traceInErr(m Message, start time.Time, err error) {
	if tr := s.c.o.Trace; tr != nil {
		e := TraceEvent{Time: start, Dir: "in", Type: m.Type, ReaderID: m.ReaderID, Duration: time.Since(start), Err: err}
		e.Command, e.Redacted = apdu.Redact(m.Payload)
		tr(e)
	}
}

// jitter picks a wait in [d/2, d], so that clients restarted together do
// not retry in lockstep.
func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2+1)
}

// sleep waits for d and reports whether ctx is still alive.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// lowLatency applies netutil.LowLatency: TCP_NODELAY for our single-write
// messages, and TCP_QUICKACK re-armed after each read so that QEMU's split
// header/payload writes do not wait for a delayed ACK (peers.md §4.1).
func lowLatency(nc net.Conn, noQuickAck bool) net.Conn {
	if noQuickAck {
		if tc, ok := nc.(*net.TCPConn); ok {
			_ = tc.SetNoDelay(true)
		}
		return nc
	}
	return netutil.LowLatency(nc)
}
