package pcsc

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"time"
)

// Context is one connection to pcscd (an SCARDCONTEXT). Its methods, and
// those of the Cards it connects, are serialised by a mutex, as libpcsclite
// serialises the calls on one context; Cancel alone may run concurrently.
type Context struct {
	socket string
	log    *slog.Logger
	minor  int32  // IPC minor we negotiated: 4, or 5 with pcsc-lite 2.3.0-2.4.0
	hctx   uint32 // pcscd's context handle

	mu       sync.Mutex // serialises use of conn
	conn     net.Conn
	r        *bufio.Reader
	lost     error // why conn is unusable, once it is
	released bool

	pollMax time.Duration // tests only: fixed poll interval instead of pollMin..pollMax; < 0 = none

	cmu        sync.Mutex // guards registered, which Cancel reads
	registered bool       // pcscd will send us a wait_reader_state_change
}

const (
	scopeSystem = 2 // SCARD_SCOPE_SYSTEM; pcscd ignores the scope
	ipcMajor    = 4
)

// EstablishContext connects to pcscd and opens a context. It offers IPC
// protocol 4.4 (pcsc-lite 1.8.24 to 2.2.x, and the later releases that
// accept older clients); a strict 4.5 daemon (pcsc-lite 2.3.0 to 2.4.0)
// refuses that with SCARD_E_SERVICE_STOPPED and its own minor 5, and then
// we connect again offering 4.5, whose structs are the same (peers.md
// §5.2). ctx bounds the connection set-up only.
func EstablishContext(ctx context.Context, opts *Options) (*Context, error) {
	if opts == nil {
		opts = &Options{}
	}
	c := &Context{socket: opts.Socket, log: opts.Logger}
	if c.socket == "" {
		c.socket = SocketPath()
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	conn, srvMinor, err := c.dialVersion(ctx, 4)
	if errors.Is(err, ErrServiceStopped) && srvMinor == 5 {
		c.log.Debug("pcsc: pcscd refused IPC 4.4 and speaks 4.5; reconnecting as 4.5")
		conn, srvMinor, err = c.dialVersion(ctx, 5)
		c.minor = 5
	} else {
		c.minor = 4
	}
	if err != nil {
		if errors.Is(err, ErrServiceStopped) {
			return nil, fmt.Errorf("pcsc: pcscd at %s speaks IPC protocol %d.%d, this client 4.4 or 4.5: %w",
				c.socket, ipcMajor, srvMinor, err)
		}
		return nil, err
	}
	c.conn, c.r = conn, bufio.NewReaderSize(conn, 4096)
	c.log.Debug("pcsc: connected", "socket", c.socket, "ipc", fmt.Sprintf("4.%d", c.minor), "server_minor", srvMinor)

	var reply [establishLen]byte
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	err = c.exchange("establish context", request(cmdEstablishContext, []uint32{scopeSystem, 0, 0}, nil), reply[:])
	conn.SetDeadline(time.Time{})
	if err != nil {
		c.conn.Close()
		return nil, err
	}
	if u32(reply[:], 0) != scopeSystem {
		c.conn.Close()
		return nil, fmt.Errorf("pcsc: establish context: %w", malformed("scope echo %d, sent %d", u32(reply[:], 0), scopeSystem))
	}
	if rv := u32(reply[:], 2); rv != 0 {
		c.conn.Close()
		return nil, Error(rv)
	}
	c.hctx = u32(reply[:], 1)
	return c, nil
}

// dial opens a new connection to pcscd's socket. Failing to reach the
// socket is ErrNoService, as in libpcsclite.
func (c *Context) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.socket)
	if err != nil {
		return nil, fmt.Errorf("pcsc: connect to pcscd at %s: %w: %w", c.socket, ErrNoService, err)
	}
	return conn, nil
}

// dialVersion connects and exchanges CMD_VERSION offering 4.minor. It
// returns the server's minor with any refusal so the caller can retry.
func (c *Context) dialVersion(ctx context.Context, minor int32) (net.Conn, int32, error) {
	conn, err := c.dial(ctx)
	if err != nil {
		return nil, 0, err
	}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	req := request(cmdVersion, []uint32{ipcMajor, uint32(minor), 0}, nil)
	var reply [versionLen]byte
	_, err = conn.Write(req)
	if err == nil {
		_, err = io.ReadFull(conn, reply[:])
	}
	conn.SetDeadline(time.Time{})
	if err != nil {
		conn.Close()
		return nil, 0, fmt.Errorf("pcsc: protocol version exchange with %s: %w: %w", c.socket, ErrNoService, err)
	}
	major, srvMinor, rv := int32(u32(reply[:], 0)), int32(u32(reply[:], 1)), u32(reply[:], 2)
	if major != ipcMajor {
		conn.Close()
		return nil, srvMinor, fmt.Errorf("pcsc: protocol version exchange: %w", malformed("server IPC major %d, want %d", major, ipcMajor))
	}
	if rv != 0 {
		conn.Close()
		return nil, srvMinor, Error(rv)
	}
	return conn, srvMinor, nil
}

// usable reports why the connection cannot carry a call. c.mu is held.
func (c *Context) usable() error {
	if c.released {
		return fmt.Errorf("pcsc: context already released: %w", ErrInvalidHandle)
	}
	if c.lost != nil {
		return fmt.Errorf("pcsc: connection to pcscd lost earlier (%v): %w", c.lost, ErrNoService)
	}
	return nil
}

// fail closes the connection after an I/O error or a malformed reply:
// either way the byte stream is out of step with pcscd. c.mu is held.
func (c *Context) fail(op string, err error) error {
	if c.lost == nil {
		c.lost = err
		c.conn.Close()
		c.log.Debug("pcsc: connection closed", "op", op, "err", err)
	}
	if errors.Is(err, errMalformed) {
		return fmt.Errorf("pcsc: %s: %w", op, err)
	}
	return fmt.Errorf("pcsc: %s: %w: %w", op, ErrNoService, err)
}

// send writes one request. c.mu is held.
func (c *Context) send(op string, req []byte) error {
	if err := c.usable(); err != nil {
		return err
	}
	if _, err := c.conn.Write(req); err != nil {
		return c.fail(op, err)
	}
	return nil
}

// recv reads exactly len(b) reply bytes. c.mu is held.
func (c *Context) recv(op string, b []byte) error {
	if _, err := io.ReadFull(c.r, b); err != nil {
		return c.fail(op, err)
	}
	return nil
}

// exchange sends req and reads the fixed-size reply into reply.
func (c *Context) exchange(op string, req, reply []byte) error {
	if err := c.send(op, req); err != nil {
		return err
	}
	return c.recv(op, reply)
}

// Release ends the context: pcscd disconnects its cards (leaving them as
// they are) and the socket is closed. Releasing a context whose daemon has
// gone only closes the socket.
func (c *Context) Release() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.released {
		return nil
	}
	var err error
	if c.lost == nil {
		var reply [releaseLen]byte
		err = c.exchange("release context", request(cmdReleaseContext, []uint32{c.hctx, 0}, nil), reply[:])
		if err == nil {
			if rv := u32(reply[:], 1); rv != 0 {
				err = Error(rv)
			}
		}
		if errors.Is(err, ErrNoService) {
			err = nil // the daemon is gone: nothing left to release
		}
	}
	c.released = true
	c.conn.Close()
	return err
}

// readerTable fetches pcscd's reader-state table (CMD_GET_READERS_STATE).
// c.mu is held.
func (c *Context) readerTable(op string) ([]readerEntry, error) {
	if err := c.send(op, request(cmdGetReadersState, nil, nil)); err != nil {
		return nil, err
	}
	return c.recvTable(op)
}

func (c *Context) recvTable(op string) ([]readerEntry, error) {
	buf := make([]byte, readerTableLen)
	if err := c.recv(op, buf); err != nil {
		return nil, err
	}
	t, err := decodeReaderTable(buf)
	if err != nil {
		return nil, c.fail(op, err)
	}
	return t, nil
}

// ListReaders names pcscd's readers in its slot order. With no reader it
// returns ErrNoReadersAvailable, as SCardListReaders does.
func (c *Context) ListReaders() ([]string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t, err := c.readerTable("list readers")
	if err != nil {
		return nil, err
	}
	if len(t) == 0 {
		return nil, ErrNoReadersAvailable
	}
	names := make([]string, len(t))
	for i, e := range t {
		names[i] = e.name
	}
	return names, nil
}

// Readers is a snapshot of pcscd's reader-state table. State holds the
// SCARD_STATE_* flags GetStatusChange would report for the reader from
// StateUnaware (without StateChanged); ATR is set while a card is present.
func (c *Context) Readers() ([]ReaderInfo, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t, err := c.readerTable("readers")
	if err != nil {
		return nil, err
	}
	out := make([]ReaderInfo, len(t))
	for i, e := range t {
		ev, atr, _ := evalReader(StateUnaware, e)
		out[i] = ReaderInfo{
			Name:         e.name,
			State:        ev &^ StateChanged & 0xFFFF,
			ATR:          atr,
			Protocol:     Protocol(e.protocol),
			EventCounter: e.eventCounter,
		}
	}
	return out, nil
}

// isPnP matches the PnP pseudo-reader name case-insensitively, as
// libpcsclite's strcasecmp does.
func isPnP(name string) bool { return strings.EqualFold(name, PnPNotification) }

func (c *Context) setRegistered(v bool) {
	c.cmu.Lock()
	c.registered = v
	c.cmu.Unlock()
}

// register asks pcscd to signal the next reader event to this connection
// (CMD_WAIT_READER_STATE_CHANGE); pcscd answers with the current table.
// From here until we read a wait_reader_state_change, pcscd owes us exactly
// one: the event, a cancellation, or the answer to unregister.
func (c *Context) register(op string) ([]readerEntry, error) {
	c.setRegistered(true)
	if err := c.send(op, request(cmdWaitReaderStateChange, nil, nil)); err != nil {
		return nil, err
	}
	return c.recvTable(op)
}

// unregister sends CMD_STOP_WAITING_READER_STATE_CHANGE and reads the one
// message pcscd owes: its answer, or an event or cancellation that crossed
// our request (pcscd then sends no answer). It returns that message's rv.
func (c *Context) unregister(op string) (uint32, error) {
	if err := c.send(op, request(cmdStopWaiting, nil, nil)); err != nil {
		return 0, err
	}
	var b [waitLen]byte
	err := c.recv(op, b[:])
	c.setRegistered(false)
	if err != nil {
		return 0, err
	}
	return u32(b[:], 1), nil
}

// readerEvents reads pcscd's reader-events counter (CMD_GET_READER_EVENTS,
// IPC 4.5), which counts reader additions and removals. It must only be
// sent while not registered: its 8-byte answer could otherwise not be told
// from an event notification.
func (c *Context) readerEvents(op string) (uint32, error) {
	var b [eventsLen]byte
	if err := c.exchange(op, request(cmdGetReaderEvents, nil, nil), b[:]); err != nil {
		return 0, err
	}
	if rv := u32(b[:], 1); rv != 0 {
		return 0, Error(rv)
	}
	return u32(b[:], 0), nil
}

var (
	errWaitTimeout   = errors.New("wait timed out")
	errWaitCancelled = errors.New("wait cancelled by its context")
)

// longAgo is a deadline in the past, to interrupt a blocked read.
var longAgo = time.Unix(1, 0)

// waitEvent reads the wait_reader_state_change pcscd sends on a reader
// event or cancellation. It gives up with errWaitTimeout at deadline (zero
// = none) and with ctx's error when ctx ends; the caller must then
// unregister. c.mu is held.
func (c *Context) waitEvent(ctx context.Context, deadline time.Time) (uint32, error) {
	const op = "get status change"
	if err := c.usable(); err != nil {
		return 0, err
	}
	c.conn.SetReadDeadline(deadline)
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		c.conn.SetReadDeadline(longAgo)
		close(fired)
	})
	var b [waitLen]byte
	n, err := io.ReadFull(c.r, b[:])
	if !stop() && ctx.Err() != nil {
		<-fired // the deadline is set; make sure it is before we clear it
	}
	c.conn.SetReadDeadline(time.Time{})
	if err != nil && n > 0 && errors.Is(err, os.ErrDeadlineExceeded) {
		// Half a message: finish it rather than lose step with pcscd.
		_, err = io.ReadFull(c.r, b[n:])
	}
	switch {
	case err == nil:
		c.setRegistered(false)
		return u32(b[:], 1), nil
	case errors.Is(err, os.ErrDeadlineExceeded):
		if ctx.Err() != nil {
			return 0, errWaitCancelled
		}
		return 0, errWaitTimeout
	default:
		return 0, c.fail(op, err)
	}
}

// maxStates is libpcsclite's limit on SCardGetStatusChange's reader count
// (PCSCLITE_MAX_READERS_CONTEXTS).
const maxStates = maxReaders

// GetStatusChange waits until the state of one of the readers differs from
// its CurrentState, or timeout passes (timeout < 0: no limit), and fills in
// EventState and ATR of every entry, like SCardGetStatusChange. EventState
// carries the reader's event counter (card insertions and removals) in its
// upper 16 bits; pass it back as CurrentState to notice events that happened
// between two calls.
//
// It is built on the client side exactly as libpcsclite builds it, since
// pcscd has no such command: register for events and receive the reader
// table, compare, and wait for pcscd's signal, until something differs.
// Entries naming an unknown reader fail with ErrUnknownReader. An entry
// named PnPNotification changes (StateChanged) when readers are added or
// removed; with an IPC 4.5 daemon its upper 16 bits carry pcscd's
// reader-events counter like libpcsclite 2.3+, with 4.4 they stay 0 and
// only additions and removals during the call are seen.
//
// It returns ErrTimeout on timeout, and an error wrapping ErrCancelled when
// Cancel is called or ctx ends (then also wrapping ctx's error).
func (c *Context) GetStatusChange(ctx context.Context, timeout time.Duration, states []ReaderState) error {
	const op = "get status change"
	if len(states) > maxStates {
		return fmt.Errorf("pcsc: %s: %d readers, at most %d: %w", op, len(states), maxStates, ErrInvalidParameter)
	}
	active := 0
	pnp := -1
	for i, s := range states {
		if s.CurrentState&StateIgnore == 0 {
			active++
		}
		if isPnP(s.Reader) {
			pnp = i
		}
	}
	if active == 0 {
		return nil
	}
	var deadline time.Time
	if timeout >= 0 {
		deadline = time.Now().Add(timeout)
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.usable(); err != nil {
		return err
	}
	if ctx.Err() != nil {
		return fmt.Errorf("pcsc: %s: %w: %w", op, ErrCancelled, ctx.Err())
	}

	// IPC 4.5's reader-events counter, read before registering (see readerEvents).
	useEvents := pnp >= 0 && c.minor >= 5
	var events uint32
	if useEvents {
		var err error
		if events, err = c.readerEvents(op); err != nil {
			return err
		}
	}
	table, err := c.register(op)
	if err != nil {
		return err
	}
	for _, s := range states {
		if !isPnP(s.Reader) && findReader(table, s.Reader) < 0 {
			c.unregister(op)
			return fmt.Errorf("pcsc: %s: reader %q: %w", op, s.Reader, ErrUnknownReader)
		}
	}
	w := watch{states: states, readers: len(table)}
	for i := range states {
		states[i].EventState = 0
	}
	if useEvents {
		w.pnpEvents(pnp, events, true)
	}

	for {
		if w.evaluate(table) {
			// Something differs. Our registration is still open; close it
			// (a cancellation crossing it no longer matters, as in libpcsclite).
			if _, err := c.unregister(op); err != nil {
				return err
			}
			return nil
		}
		rv, err := c.waitEvent(ctx, deadline)
		switch {
		case errors.Is(err, errWaitTimeout):
			rv, err := c.unregister(op)
			if err != nil {
				return err
			}
			if Error(rv) == ErrCancelled {
				return fmt.Errorf("pcsc: %s: %w", op, ErrCancelled)
			}
			// One last look, as libpcsclite takes after its timeout.
			if table, err = c.readerTable(op); err != nil {
				return err
			}
			if w.evaluate(table) {
				return nil
			}
			return ErrTimeout
		case errors.Is(err, errWaitCancelled):
			if _, err := c.unregister(op); err != nil {
				return err
			}
			return fmt.Errorf("pcsc: %s: %w: %w", op, ErrCancelled, ctx.Err())
		case err != nil:
			return err
		}
		if rv != 0 {
			if Error(rv) == ErrCancelled {
				return fmt.Errorf("pcsc: %s: %w", op, ErrCancelled)
			}
			return Error(rv)
		}
		if useEvents {
			if events, err = c.readerEvents(op); err != nil {
				return err
			}
			w.events = events
		}
		if table, err = c.register(op); err != nil {
			return err
		}
	}
}

// Cancel ends a GetStatusChange blocked on this context in another
// goroutine, which then returns an error wrapping ErrCancelled. Like
// SCardCancel it speaks to pcscd over a connection of its own (the
// context's connection is busy waiting) and does nothing when no
// GetStatusChange is waiting.
func (c *Context) Cancel() error {
	c.cmu.Lock()
	waiting := c.registered
	c.cmu.Unlock()
	if !waiting {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := c.dial(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	var reply [cancelLen]byte
	if _, err := conn.Write(request(cmdCancel, []uint32{c.hctx, 0}, nil)); err != nil {
		return fmt.Errorf("pcsc: cancel: %w: %w", ErrNoService, err)
	}
	if _, err := io.ReadFull(conn, reply[:]); err != nil {
		return fmt.Errorf("pcsc: cancel: %w: %w", ErrNoService, err)
	}
	if h := u32(reply[:], 0); h != c.hctx {
		return fmt.Errorf("pcsc: cancel: %w", malformed("context echo %#x, sent %#x", h, c.hctx))
	}
	switch rv := Error(u32(reply[:], 1)); rv {
	case 0:
		return nil
	case ErrInvalidHandle:
		// pcscd says this when the context was no longer waiting: the
		// wait ended between our check and pcscd's; nothing to cancel.
		return nil
	default:
		return rv
	}
}
