package usbip

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"

	"github.com/vscard/vscard/usb"
)

// Bounds on what a client may queue, so that a client submitting and
// never reading, or submitting to an endpoint the device is not serving,
// cannot grow the server's memory without limit.
const (
	maxQueued      = 1024
	maxQueuedBytes = 16 << 20
)

// urb is one submitted transfer.
type urb struct {
	hdr    urbHeader
	addr   uint8 // endpoint address with 0x80 for IN; 0 for endpoint 0
	data   []byte
	ctx    context.Context
	cancel context.CancelFunc
	q      *queue
}

// queue is one endpoint's FIFO of URBs, served by one goroutine.
type queue struct {
	addr  uint8
	urbs  []*urb // not yet being served; guarded by session.mu
	wake  chan struct{}
	carry []byte // IN data whose URB was unlinked as it completed; worker only
}

// session is the URB phase of one imported device's connection.
type session struct {
	conn  net.Conn
	dev   usb.Device
	devid uint32
	log   *slog.Logger
	ctx   context.Context
	types map[uint8]usb.EndpointType // by endpoint address

	// mu guards pending and the queues, and is held across each write so
	// that a PDU goes out in one write and a RET_UNLINK can never overtake
	// the RET_SUBMIT of the URB it names.
	mu          sync.Mutex
	pending     map[uint32]*urb
	queues      map[uint8]*queue
	queued      int
	queuedBytes int
	wbuf        []byte

	wg sync.WaitGroup
}

// runSession serves URB traffic for dev on conn until the client closes
// it, a PDU is malformed, or ctx ends. It returns once every endpoint
// goroutine has stopped, with why the session ended.
func runSession(ctx context.Context, conn net.Conn, dev usb.Device, devid uint32, log *slog.Logger) error {
	ctx, cancel := context.WithCancel(ctx)
	s := &session{
		conn: conn, dev: dev, devid: devid, log: log, ctx: ctx,
		types:   make(map[uint8]usb.EndpointType),
		pending: make(map[uint32]*urb),
		queues:  make(map[uint8]*queue),
	}
	for _, ep := range dev.Info().Endpoints {
		s.types[ep.Address] = ep.Type
	}
	err := s.readLoop()
	// Detach: cancel what is pending, unblock writers, wait for the
	// endpoint goroutines so that the caller's Reset comes after them.
	cancel()
	conn.Close()
	s.wg.Wait()
	return err
}

func (s *session) readLoop() error {
	var hb [urbHeaderLen]byte
	for {
		if _, err := io.ReadFull(s.conn, hb[:]); err != nil {
			if s.ctx.Err() != nil {
				return s.ctx.Err()
			}
			if errors.Is(err, io.EOF) {
				return errors.New("connection closed by client")
			}
			return fmt.Errorf("read URB header: %w", err)
		}
		h, err := parseURBHeader(hb[:])
		if err != nil {
			s.log.Warn("usbip: unknown PDU; closing", "err", err)
			return err
		}
		if h.DevID != s.devid {
			// Linux's stub drops the connection on a wrong devid too.
			s.log.Warn("usbip: PDU for another device; closing", "devid", h.DevID, "want", s.devid)
			return fmt.Errorf("usbip: devid %#x, want %#x", h.DevID, s.devid)
		}
		switch h.Command {
		case cmdSubmit:
			err = s.submit(h)
		case cmdUnlink:
			err = s.unlink(h)
		default:
			// RET_* are the server's to send.
			err = fmt.Errorf("usbip: client sent reply command %d", h.Command)
			s.log.Warn("usbip: unexpected PDU; closing", "command", h.Command)
		}
		if err != nil {
			return err
		}
	}
}

// submit reads the rest of a CMD_SUBMIT and queues it on its endpoint.
func (s *session) submit(h urbHeader) error {
	if h.EP > 15 || h.Direction > dirIn {
		s.log.Warn("usbip: CMD_SUBMIT with impossible endpoint; closing", "ep", h.EP, "direction", h.Direction)
		return fmt.Errorf("usbip: CMD_SUBMIT endpoint %d direction %d", h.EP, h.Direction)
	}
	addr := uint8(h.EP)
	if h.Direction == dirIn {
		addr |= 0x80
	}
	typ, known := usb.Control, true
	if h.EP != 0 {
		typ, known = s.types[addr]
	}
	var data []byte
	if h.Direction == dirOut && h.TransferBufferLength > 0 {
		// Checked before allocating: the stream cannot be resynchronised
		// past a length we refuse to read.
		if h.TransferBufferLength > maxTransfer {
			s.log.Warn("usbip: CMD_SUBMIT too long; closing", "len", h.TransferBufferLength, "max", maxTransfer)
			return fmt.Errorf("usbip: OUT transfer of %d bytes (max %d)", h.TransferBufferLength, maxTransfer)
		}
		data = make([]byte, h.TransferBufferLength)
		if _, err := io.ReadFull(s.conn, data); err != nil {
			return fmt.Errorf("read OUT data: %w", err)
		}
	}
	if known && typ == usb.Isochronous {
		// vhci-hcd sends an ISO URB's packet descriptors after its data,
		// in both directions; read them to keep framing, then refuse.
		if np := h.NumberOfPackets; np != 0 && np != 0xFFFFFFFF {
			if np > maxISOPackets {
				return fmt.Errorf("usbip: ISO URB with %d packets", np)
			}
			if _, err := io.CopyN(io.Discard, s.conn, int64(np)*16); err != nil {
				return fmt.Errorf("read ISO descriptors: %w", err)
			}
		}
	}
	if !known || typ == usb.Isochronous || (h.EP != 0 && typ == usb.Control) {
		s.log.Debug("usbip: URB for an endpoint the device does not have; stall", "ep", fmt.Sprintf("%#02x", addr))
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.writeLocked(urbHeader{Command: retSubmit, Seqnum: h.Seqnum, Status: errEPIPE}, nil)
	}

	key := addr
	if h.EP == 0 {
		key = 0 // one queue for both directions of endpoint 0
	}
	ctx, cancel := context.WithCancel(s.ctx)
	u := &urb{hdr: h, addr: addr, data: data, ctx: ctx, cancel: cancel}

	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.pending[h.Seqnum]; dup {
		cancel()
		s.log.Warn("usbip: CMD_SUBMIT reuses a pending seqnum; closing", "seqnum", h.Seqnum)
		return fmt.Errorf("usbip: seqnum %d already pending", h.Seqnum)
	}
	if s.queued >= maxQueued || s.queuedBytes+len(data) > maxQueuedBytes {
		cancel()
		s.log.Warn("usbip: too many queued URBs; closing", "urbs", s.queued, "bytes", s.queuedBytes)
		return errors.New("usbip: queue limit exceeded")
	}
	q := s.queues[key]
	if q == nil {
		q = &queue{addr: key, wake: make(chan struct{}, 1)}
		s.queues[key] = q
		s.wg.Add(1)
		go s.worker(q)
	}
	u.q = q
	s.pending[h.Seqnum] = u
	q.urbs = append(q.urbs, u)
	s.queued++
	s.queuedBytes += len(data)
	select {
	case q.wake <- struct{}{}:
	default:
	}
	return nil
}

// unlink answers CMD_UNLINK: a pending URB is cancelled and answered by
// RET_UNLINK -ECONNRESET alone; one already answered gets status 0
// (Linux stub_rx.c does the same; vhci_rx.c then ignores it).
func (s *session) unlink(h urbHeader) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	status := int32(0)
	if u, ok := s.pending[h.UnlinkSeqnum]; ok {
		delete(s.pending, h.UnlinkSeqnum)
		u.cancel()
		for i, v := range u.q.urbs {
			if v == u {
				u.q.urbs = append(u.q.urbs[:i], u.q.urbs[i+1:]...)
				s.queued--
				s.queuedBytes -= len(u.data)
				break
			}
		}
		status = errECONNRESET
	}
	return s.writeLocked(urbHeader{Command: retUnlink, Seqnum: h.Seqnum, Status: status}, nil)
}

// writeLocked sends one PDU in one write. s.mu is held.
func (s *session) writeLocked(h urbHeader, data []byte) error {
	s.wbuf = append(h.append(s.wbuf[:0]), data...)
	if _, err := s.conn.Write(s.wbuf); err != nil {
		// The reader sees the closed connection and ends the session.
		s.conn.Close()
		return fmt.Errorf("write: %w", err)
	}
	if cap(s.wbuf) > 64<<10 {
		s.wbuf = nil // do not keep a large response's buffer for good
	}
	return nil
}

// next takes the next URB of q, or nil when the session ends.
func (s *session) next(q *queue) *urb {
	for {
		s.mu.Lock()
		if len(q.urbs) > 0 {
			u := q.urbs[0]
			q.urbs[0] = nil
			q.urbs = q.urbs[1:]
			s.queued--
			s.queuedBytes -= len(u.data)
			s.mu.Unlock()
			return u
		}
		s.mu.Unlock()
		select {
		case <-q.wake:
		case <-s.ctx.Done():
			return nil
		}
	}
}

// worker serves one endpoint's URBs in order.
func (s *session) worker(q *queue) {
	defer s.wg.Done()
	for {
		u := s.next(q)
		if u == nil {
			return
		}
		if u.ctx.Err() != nil {
			continue // unlinked while it waited
		}
		s.serve(q, u)
	}
}

// serve performs one URB on the device and answers it.
func (s *session) serve(q *queue, u *urb) {
	var (
		resp []byte
		err  error
	)
	switch {
	case u.hdr.EP == 0:
		resp, err = s.control(u)
	case u.addr&0x80 != 0:
		resp, err = s.in(q, u)
	default:
		err = s.dev.Out(u.ctx, u.addr, u.data)
	}
	if err != nil && u.ctx.Err() != nil {
		// Unlinked (its RET_UNLINK is sent) or the session is ending.
		return
	}
	status := int32(0)
	switch {
	case err == nil:
	case errors.Is(err, usb.ErrStall):
		status = errEPIPE
	default:
		s.log.Warn("usbip: device failed a transfer", "ep", fmt.Sprintf("%#02x", u.addr), "err", err)
		status = errEPROTO
	}
	var out []byte // what goes back in RET_SUBMIT after the header
	actual := 0
	switch {
	case status != 0:
	case u.hdr.Direction == dirIn:
		out, actual = resp, len(resp)
	default:
		actual = len(u.data) // an OUT transfer's actual_length: bytes accepted
	}
	if !s.completeN(u, status, out, actual) && u.hdr.Direction == dirIn && u.hdr.EP != 0 && len(resp) > 0 {
		// Unlinked the moment the device answered: keep the data for the
		// next URB on this endpoint rather than lose it (usb package doc).
		q.carry = append(resp, q.carry...)
	}
}

// completeN sends u's RET_SUBMIT, with data (IN) and actual_length, unless
// u was unlinked meanwhile; it reports whether it did.
func (s *session) completeN(u *urb, status int32, data []byte, actual int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pending[u.hdr.Seqnum] != u {
		return false
	}
	delete(s.pending, u.hdr.Seqnum)
	u.cancel()
	_ = s.writeLocked(urbHeader{Command: retSubmit, Seqnum: u.hdr.Seqnum, Status: status, ActualLength: uint32(actual)}, data)
	return true
}

// in reads one IN transfer of at most transfer_buffer_length bytes.
func (s *session) in(q *queue, u *urb) ([]byte, error) {
	limit := int(min(u.hdr.TransferBufferLength, maxTransfer))
	if len(q.carry) > 0 {
		n := min(limit, len(q.carry))
		b := q.carry[:n:n]
		q.carry = q.carry[n:]
		if len(q.carry) == 0 {
			q.carry = nil
		}
		return b, nil
	}
	if limit == 0 {
		return nil, nil
	}
	b, err := s.dev.In(u.ctx, u.addr, limit)
	if err != nil {
		return nil, err
	}
	if len(b) > limit {
		// A device breaking In's contract must not make us send more than
		// the client asked for: vhci-hcd drops the connection then.
		s.log.Warn("usbip: device returned more than asked; truncated", "ep", fmt.Sprintf("%#02x", u.addr), "len", len(b), "max", limit)
		b = b[:limit]
	}
	return b, nil
}

// control performs a transfer on endpoint 0.
func (s *session) control(u *urb) ([]byte, error) {
	setup, _ := usb.ParseSetup(u.hdr.Setup[:])
	dirIn := u.hdr.Direction == dirIn
	if setup.Length > 0 && setup.In() != dirIn {
		// The PDU's direction framed the data; a setup packet saying the
		// opposite cannot be honoured.
		return nil, usb.ErrStall
	}
	if setup.RequestType == 0x00 && setup.Request == usb.ReqSetAddress {
		// vhci-hcd assigns addresses itself and never forwards this
		// (protocols.md §5); a client that does gets a harmless success.
		return nil, nil
	}
	if setup.RequestType == 0x23 && setup.Request == usb.ReqSetFeature && setup.Value == 4 {
		// SET_FEATURE(PORT_RESET) addressed to the device's port: Linux's
		// stub driver resets the device on it (stub_rx.c), so do we.
		s.dev.Reset()
		return nil, nil
	}
	if dirIn {
		limit := int(min(uint32(setup.Length), u.hdr.TransferBufferLength))
		b, err := s.dev.Control(u.ctx, setup, nil)
		if err != nil {
			return nil, err
		}
		return b[:min(len(b), limit)], nil
	}
	if len(u.data) > int(setup.Length) {
		u.data = u.data[:setup.Length] // actual_length follows
	}
	_, err := s.dev.Control(u.ctx, setup, u.data)
	return nil, err
}
