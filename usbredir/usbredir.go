// Package usbredir serves a usb.Device over the usbredir protocol, playing
// its "usb-host" role (the side that owns the device) towards QEMU's
// `-device usb-redir,chardev=...`, which plays "usb-guest" (protocols.md §6).
//
// # Model
//
// Serve runs one session on one connection. Both sides send a hello first;
// once the peer's hello is in, the capabilities both advertise fix the
// framing (64-bit packet ids, 32-bit bulk lengths, ep_info with max packet
// sizes, device_connect with bcdDevice), and Serve announces the device:
// interface_info, ep_info, then device_connect (QEMU rejects a
// device_connect without interface info before it, protocols.md §6.4).
//
// From then on the guest drives the device. Each endpoint of the device has
// one goroutine that serves that endpoint's transfers in arrival order, so
// QEMU may pipeline bulk IN requests (several outstanding) and a slow IN
// transfer never holds up the reading of the stream: a cancel_data_packet
// for it must get through. A bulk transfer that finds its endpoint idle is
// first tried by the reader itself, with a cancelled ctx so the device
// cannot block it; only what the device cannot do at once goes to the
// worker (see session.bulk: it saves a goroutine handoff on each half of
// every APDU). Control transfers and the configuration and
// alternate-setting requests share the endpoint 0 goroutine. The
// interrupt IN endpoint is polled by its own goroutine between
// start_interrupt_receiving and stop_interrupt_receiving, and whatever the
// device returns goes out as an unsolicited interrupt_packet.
//
// Every packet goes out in a single Write, serialised between goroutines,
// so that a peer never sees a header without its payload (peers.md §4: a
// split write costs a delayed ACK).
//
// A malformed packet from the peer is logged and skipped, or answered with
// an error status when it is a transfer the peer waits on; the session goes
// on. Only an unrecoverable stream (I/O error, a length past the reference
// parser's own limit) ends it.
package usbredir

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"time"

	"github.com/vscard/vscard/internal/netutil"
	"github.com/vscard/vscard/usb"
)

// Options configures Serve. The zero value (or nil) is ready to use.
type Options struct {
	Logger *slog.Logger // nil: discard
}

// Timeouts of the shutdown: bounded so that a peer that stopped reading
// (QEMU reads only while its VM runs, protocols.md §6) cannot hold Serve.
const (
	disconnectWriteTimeout = 2 * time.Second
	disconnectAckTimeout   = time.Second
	disconnectDrain        = 200 * time.Millisecond // without the ack: let the peer read and close
)

// Per-endpoint queue bounds: a peer cannot make us hold more than this.
const (
	maxQueued      = 32
	maxQueuedBytes = 4 << 20
)

// Serve serves dev to one peer on conn until the peer disconnects or ctx
// ends. When ctx ends, Serve sends device_disconnect, waits briefly for the
// peer's device_disconnect_ack when both sides have that capability, and
// returns nil. Serve closes conn before it returns. It returns nil when the
// peer closes the connection, and an error when the stream fails or cannot
// be parsed any more.
func Serve(ctx context.Context, conn net.Conn, dev usb.Device, opts *Options) error {
	var log *slog.Logger
	if opts != nil {
		log = opts.Logger
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// LowLatency only passes calls through for non-TCP connections.
	c := netutil.LowLatency(conn)
	s := &session{
		raw:      conn,
		conn:     c,
		br:       bufio.NewReaderSize(c, 64<<10),
		dev:      dev,
		info:     dev.Info(),
		log:      log,
		pending:  make(map[uint64]*request),
		workers:  make(map[uint8]*worker),
		intr:     make(map[uint8]context.CancelFunc),
		intrDone: make(map[uint8]chan struct{}),
		ackCh:    make(chan struct{}),
	}
	return s.run(ctx)
}

type session struct {
	raw  net.Conn // as given, for CloseWrite
	conn net.Conn
	br   *bufio.Reader
	dev  usb.Device
	info usb.Info
	log  *slog.Logger

	// codec is set by the reader on the peer's hello, before any goroutine
	// other than the reader exists; read-only afterwards.
	codec codec

	wctx    context.Context // ends when the session ends; parent of every request
	wcancel context.CancelFunc
	// tryCtx is already cancelled: the ctx of the reader's first,
	// non-blocking attempt at a bulk transfer (see bulk).
	tryCtx context.Context
	wg     sync.WaitGroup

	wmu        sync.Mutex // serialises writes
	connected  bool       // device_connect sent (under wmu)
	unplugged  bool       // device_disconnect sent: nothing may follow (under wmu)
	nextIntrID uint64     // id of the next unsolicited interrupt_packet (under wmu)
	wbuf       []byte     // (under wmu)
	werr       error      // first write error (under wmu)

	mu          sync.Mutex
	pending     map[uint64]*request          // requests queued or in progress, by id
	workers     map[uint8]*worker            // by endpoint address; 0 for control
	intr        map[uint8]context.CancelFunc // running interrupt pollers
	intrDone    map[uint8]chan struct{}      // closed when the last poller started on ep exits
	queuedBytes int
	config      uint8 // last configuration set successfully

	ackOnce sync.Once
	ackCh   chan struct{} // closed on device_disconnect_ack
}

// request is one packet a worker serves and answers.
type request struct {
	p         packet
	ctx       context.Context
	cancel    context.CancelFunc
	cancelled bool // cancel_data_packet seen (under s.mu)
}

// worker serves one endpoint's requests in order.
type worker struct {
	ep     uint8
	queue  []*request // under s.mu
	active bool       // a request of this endpoint is being served (under s.mu)
	wake   chan struct{}
}

func (s *session) run(ctx context.Context) error {
	s.wctx, s.wcancel = context.WithCancel(context.Background())
	defer s.wcancel()
	tryCtx, tryCancel := context.WithCancel(context.Background())
	tryCancel()
	s.tryCtx = tryCtx

	ver := "vscard"
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		ver += " " + bi.Main.Version
	}
	hdr, data := helloPayload(ver)
	// The hello always has the 12-byte header (protocols.md §6.1). A peer
	// that never reads must not hold Serve past ctx.
	stop := context.AfterFunc(ctx, func() { s.conn.Close() })
	err := s.send(typeHello, 0, hdr, data)
	if !stop() || err != nil {
		s.conn.Close()
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("usbredir: send hello: %w", err)
	}

	readDone := make(chan error, 1)
	go func() { readDone <- s.readLoop() }()

	select {
	case err = <-readDone:
		s.wcancel()
		s.conn.Close()
	case <-ctx.Done():
		s.wcancel()
		s.disconnect(readDone)
		s.conn.Close()
		<-readDone
	}
	s.wg.Wait()
	return err
}

// disconnect unplugs the device from the peer's point of view: it sends
// device_disconnect and, with device_disconnect_ack negotiated, waits for
// the ack so that the peer has seen the unplug before the link drops.
func (s *session) disconnect(readDone chan error) {
	s.wmu.Lock()
	connected := s.connected
	s.wmu.Unlock()
	if !connected {
		return
	}
	_ = s.conn.SetWriteDeadline(time.Now().Add(disconnectWriteTimeout))
	s.wmu.Lock()
	err := s.sendLocked(typeDeviceDisconnect, 0, nil, nil)
	// A worker that finished a transfer just now must not answer it
	// after the unplug.
	s.unplugged = true
	s.wmu.Unlock()
	if err != nil {
		s.log.Debug("usbredir: send device_disconnect", "err", err)
		return
	}
	s.log.Info("usbredir: device disconnected")
	// FIN right behind the unplug. The reader keeps draining what the peer
	// still sends meanwhile: closing a TCP socket with unread input sends
	// a RST, which can destroy our last packet in the peer's receive queue
	// before QEMU reads it.
	if cw, ok := s.raw.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	wait := disconnectDrain
	if s.codec.both&capDeviceDisconnectAck != 0 {
		wait = disconnectAckTimeout
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-s.ackCh:
	case err := <-readDone:
		readDone <- err // run reads it again
	case <-t.C:
		if wait == disconnectAckTimeout {
			s.log.Debug("usbredir: no device_disconnect_ack")
		}
	}
}

// send writes one packet in a single Write.
func (s *session) send(typ uint32, id uint64, hdr, data []byte) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	return s.sendLocked(typ, id, hdr, data)
}

// errUnplugged refuses writes after device_disconnect.
var errUnplugged = errors.New("usbredir: device disconnected")

func (s *session) sendLocked(typ uint32, id uint64, hdr, data []byte) error {
	if s.unplugged || s.wctx.Err() != nil && typ != typeDeviceDisconnect {
		// Once the session ends, answers to requests it cut short would
		// only confuse the peer: the unplug is the last word.
		return errUnplugged
	}
	s.wbuf = s.codec.appendPacket(s.wbuf[:0], typ, id, hdr, data)
	_, err := s.conn.Write(s.wbuf)
	if cap(s.wbuf) > 64<<10 {
		s.wbuf = nil // do not keep a large buffer after a big transfer
	}
	if err != nil && s.werr == nil {
		// A failed write leaves the stream in an unknown state; closing
		// ends the reader, and with it the session.
		s.werr = err
		s.conn.Close()
	}
	return err
}

// readLoop reads and dispatches packets until the stream ends.
func (s *session) readLoop() error {
	helloSeen := false
	for {
		p, err := s.codec.readPacket(s.br)
		if err != nil {
			var me *malformedError
			if errors.As(err, &me) {
				s.log.Warn("usbredir: skipping malformed packet", "err", err)
				if helloSeen {
					s.rejectMalformed(me.p)
				}
				continue
			}
			switch {
			case s.wctx.Err() != nil:
				return nil // we are shutting down and closed conn
			case errors.Is(err, net.ErrClosed):
				// Closed by a failed write (sendLocked).
				s.wmu.Lock()
				werr := s.werr
				s.wmu.Unlock()
				if werr != nil {
					return fmt.Errorf("usbredir: write: %w", werr)
				}
				return nil
			case err == io.EOF:
				return nil // the peer closed between packets
			case errors.Is(err, io.ErrUnexpectedEOF):
				return fmt.Errorf("usbredir: peer closed mid-packet: %w", err)
			}
			return fmt.Errorf("usbredir: read: %w", err)
		}
		if !helloSeen {
			if p.typ != typeHello {
				// Nothing can precede the hellos (protocols.md §6.1).
				s.log.Warn("usbredir: packet before the peer's hello, ignored", "type", p.typ)
				continue
			}
			helloSeen = true
			if err := s.onHello(p); err != nil {
				return err
			}
			continue
		}
		if s.wctx.Err() != nil {
			// Shutting down: only the disconnect ack still matters.
			if p.typ == typeDeviceDisconnectAck {
				s.ackOnce.Do(func() { close(s.ackCh) })
			}
			continue
		}
		s.dispatch(p)
	}
}

// onHello takes the peer's capabilities and announces the device.
func (s *session) onHello(p packet) error {
	ver, peer := parseHello(p)
	s.codec = negotiate(peer)
	s.log.Info("usbredir: peer hello", "version", ver, "caps", fmt.Sprintf("%#x", uint32(peer)),
		"ids64", s.codec.ids64, "bulk32", s.codec.bulk32)

	// One worker per endpoint, endpoint 0 included; created before any
	// packet that needs them is read.
	s.workers[0] = s.newWorker(0)
	for _, e := range s.info.Endpoints {
		if e.Type == usb.Bulk || e.Type == usb.Interrupt && !e.In() {
			if _, dup := s.workers[e.Address]; !dup {
				s.workers[e.Address] = s.newWorker(e.Address)
			}
		}
	}

	s.wmu.Lock()
	defer s.wmu.Unlock()
	for _, pk := range []struct {
		typ       uint32
		hdr, data []byte
	}{
		// interface_info first, as usbredirhost does; both precede
		// device_connect (protocols.md §6.4 step 2).
		{typeInterfaceInfo, s.interfaceInfo(), nil},
		{typeEPInfo, s.epInfo(), nil},
		{typeDeviceConnect, s.deviceConnect(), nil},
	} {
		if err := s.sendLocked(pk.typ, 0, pk.hdr, pk.data); err != nil {
			return fmt.Errorf("usbredir: announce device: %w", err)
		}
	}
	s.connected = true
	return nil
}

func (s *session) newWorker(ep uint8) *worker {
	w := &worker{ep: ep, wake: make(chan struct{}, 1)}
	s.wg.Add(1)
	go s.serveWorker(w)
	return w
}

// interfaceInfo builds interface_info (132 bytes) from dev.Info.
func (s *session) interfaceInfo() []byte {
	b := make([]byte, 4+4*32)
	n := min(len(s.info.Interfaces), 32)
	binary.LittleEndian.PutUint32(b, uint32(n))
	for i, f := range s.info.Interfaces[:n] {
		b[4+i] = f.Number
		b[4+32+i] = f.Class
		b[4+64+i] = f.SubClass
		b[4+96+i] = f.Protocol
	}
	return b
}

// epInfo builds ep_info: 96 bytes, or 160 with max packet sizes.
func (s *session) epInfo() []byte {
	size := 96
	if s.codec.both&capEPInfoMaxPacketSize != 0 {
		size = 160
	}
	b := make([]byte, size)
	for i := range 32 {
		b[i] = 255 // invalid: no such endpoint
	}
	// Endpoint 0 both ways; its max packet size stays 0 as usbredirhost
	// leaves it (protocols.md §6.4).
	b[0], b[16] = byte(usb.Control), byte(usb.Control)
	for _, e := range s.info.Endpoints {
		i := epIndex(e.Address)
		b[i] = byte(e.Type)
		iv := e.Interval
		if iv == 0 && (e.Type == usb.Interrupt || e.Type == usb.Isochronous) {
			// QEMU disconnects on a zero interval for interrupt and iso
			// endpoints (protocols.md §6.4).
			iv = 1
		}
		b[32+i] = iv
		b[64+i] = e.Interface
		if size > 96 {
			binary.LittleEndian.PutUint16(b[96+2*i:], e.MaxPacketSize)
		}
	}
	return b
}

// deviceConnect builds device_connect: 10 bytes, or 8 without bcdDevice.
func (s *session) deviceConnect() []byte {
	b := make([]byte, 8, 10)
	b[0] = redirSpeed(s.info.Speed)
	b[1], b[2], b[3] = s.info.Class, s.info.SubClass, s.info.Protocol
	binary.LittleEndian.PutUint16(b[4:], s.info.VendorID)
	binary.LittleEndian.PutUint16(b[6:], s.info.ProductID)
	if s.codec.both&capConnectDeviceVersion != 0 {
		b = binary.LittleEndian.AppendUint16(b, s.info.BCDDevice)
	}
	return b
}

// redirSpeed numbers speeds as usbredir does: one lower than USB/IP.
func redirSpeed(sp usb.Speed) uint8 {
	switch sp {
	case usb.SpeedLow:
		return 0
	case usb.SpeedFull:
		return 1
	case usb.SpeedHigh:
		return 2
	case usb.SpeedSuper:
		return 3
	}
	return 255
}

// endpoint looks an endpoint of the device up.
func (s *session) endpoint(addr uint8) (usb.Endpoint, bool) {
	for _, e := range s.info.Endpoints {
		if e.Address == addr {
			return e, true
		}
	}
	return usb.Endpoint{}, false
}

// dispatch handles one well-formed packet from the peer.
func (s *session) dispatch(p packet) {
	switch p.typ {
	case typeHello:
		s.log.Warn("usbredir: second hello, ignored")
	case typeReset:
		// No reply (protocols.md §6.4 step 8); the device drops back to
		// its unconfigured state and QEMU re-enumerates it.
		s.log.Debug("usbredir: reset")
		s.mu.Lock()
		s.config = 0
		s.mu.Unlock()
		s.dev.Reset()
	case typeSetConfiguration, typeGetConfiguration, typeSetAltSetting, typeGetAltSetting:
		s.enqueue(0, p)
	case typeControlPacket:
		s.enqueue(0, p)
	case typeBulkPacket:
		ep := p.hdr[0]
		if e, ok := s.endpoint(ep); !ok || e.Type != usb.Bulk {
			s.log.Warn("usbredir: bulk packet for no bulk endpoint", "ep", ep)
			s.replyStatus(p, statusStall)
			return
		}
		s.bulk(ep, p)
	case typeInterruptPacket:
		// checkData let only OUT interrupt packets through.
		ep := p.hdr[0]
		if e, ok := s.endpoint(ep); !ok || e.Type != usb.Interrupt {
			s.log.Warn("usbredir: interrupt packet for no interrupt endpoint", "ep", ep)
			s.replyStatus(p, statusStall)
			return
		}
		s.enqueue(ep, p)
	case typeIsoPacket:
		s.log.Warn("usbredir: iso packet ignored: the device has no iso endpoint")
	case typeStartInterruptReceiving:
		s.startInterrupt(p)
	case typeStopInterruptReceiving:
		ep := p.hdr[0]
		s.mu.Lock()
		stop, ok := s.intr[ep]
		delete(s.intr, ep)
		s.mu.Unlock()
		if ok {
			stop()
		}
		s.send(typeInterruptReceivingStatus, p.id, []byte{statusSuccess, ep}, nil)
	case typeCancelDataPacket:
		s.cancel(p.id)
	case typeStartIsoStream, typeStopIsoStream:
		st := byte(statusSuccess)
		if p.typ == typeStartIsoStream {
			st = statusStall
		}
		s.send(typeIsoStreamStatus, p.id, []byte{st, p.hdr[0]}, nil)
	case typeAllocBulkStreams, typeFreeBulkStreams:
		// We never advertise bulk_streams; answer so the peer does not
		// wait, refusing an allocation.
		st := byte(statusSuccess)
		if p.typ == typeAllocBulkStreams {
			st = statusInval
		}
		b := make([]byte, 9)
		copy(b, p.hdr[:4])
		b[8] = st
		s.send(typeBulkStreamsStatus, p.id, b, nil)
	case typeStartBulkReceiving, typeStopBulkReceiving:
		// Not advertised either (protocols.md §6.4 step 5).
		b := make([]byte, 6)
		copy(b, p.hdr[:4])
		st := byte(statusSuccess)
		if p.typ == typeStartBulkReceiving {
			b[4], st = p.hdr[8], statusInval
		} else {
			b[4] = p.hdr[4]
		}
		b[5] = st
		s.send(typeBulkReceivingStatus, p.id, b, nil)
	case typeFilterFilter:
		s.log.Debug("usbredir: peer filter ignored")
	case typeFilterReject:
		s.log.Warn("usbredir: peer rejected the device (filter_reject)")
	case typeDeviceDisconnectAck:
		s.ackOnce.Do(func() { close(s.ackCh) })
	}
}

// rejectMalformed answers a malformed transfer the peer would otherwise
// wait for forever.
func (s *session) rejectMalformed(p packet) {
	switch p.typ {
	case typeInterruptPacket:
		// Only an OUT interrupt transfer waits for an answer; an IN one
		// from the guest is a protocol violation with no request behind it.
		if len(p.hdr) == 4 && p.hdr[0]&0x80 == 0 {
			s.replyStatus(p, statusInval)
		}
	case typeControlPacket, typeBulkPacket:
		if len(p.hdr) == s.codec.recvHeaderLen(p.typ) && p.hdr != nil {
			s.replyStatus(p, statusInval)
		}
	}
}

// reply answers a transfer packet: the same type-specific header with
// status and length set, and IN data appended.
func (s *session) reply(p packet, status uint8, n int, data []byte) {
	h := append([]byte(nil), p.hdr...)
	switch p.typ {
	case typeControlPacket:
		h[3] = status
		binary.LittleEndian.PutUint16(h[8:], uint16(n))
	case typeBulkPacket:
		h[1] = status
		binary.LittleEndian.PutUint16(h[2:], uint16(n))
		if s.codec.bulk32 {
			binary.LittleEndian.PutUint16(h[8:], uint16(n>>16))
		}
	case typeInterruptPacket, typeIsoPacket:
		h[1] = status
		binary.LittleEndian.PutUint16(h[2:], uint16(n))
	}
	if err := s.send(p.typ, p.id, h, data); err != nil {
		s.log.Debug("usbredir: reply", "type", p.typ, "id", p.id, "err", err)
	}
}

func (s *session) replyStatus(p packet, status uint8) { s.reply(p, status, 0, nil) }

// bulk serves a bulk packet. When its endpoint is idle, the reader first
// tries it itself with an already cancelled ctx. A usb.Device returns
// once its ctx is done, and a cancelled In loses no data (usb package
// doc): In returns what is ready or the ctx's error. Out is relied on to
// do the same, to take the whole transfer or refuse it with the ctx's
// error, as ccid's Out does (it only ever waits before taking anything).
// Only a refused attempt goes to the endpoint's worker, which waits as
// long as the device needs.
//
// This is the path of every APDU (libccid: one bulk OUT, then one bulk
// IN, protocols.md §4) and each is a round trip the guest waits on.
// Handing a transfer to the worker costs a goroutine wakeup, and on a
// loaded host the thread that runs it may wait for a CPU: measured in
// the guest bench (test/guest TestGuestReaderBench) as 100-300 µs from
// reading a bulk OUT to answering it, against about 20 µs served here.
// A CCID reader's Out only blocks when the host reads no answers, and
// its In has the answer queued by the time libccid asks for it.
func (s *session) bulk(ep uint8, p packet) {
	s.mu.Lock()
	w := s.workers[ep]
	if w == nil || w.active || len(w.queue) > 0 || s.pending[p.id] != nil {
		// Busy (order must hold), or a duplicate id that enqueue rejects.
		s.mu.Unlock()
		s.enqueue(ep, p)
		return
	}
	w.active = true // keeps the worker off ep while we call the device
	s.mu.Unlock()
	done := s.tryBulk(p)
	s.mu.Lock()
	w.active = false
	s.mu.Unlock()
	if !done {
		s.enqueue(ep, p)
	}
}

// tryBulk makes the non-blocking attempt of bulk; it reports whether p
// was answered.
func (s *session) tryBulk(p packet) bool {
	ep, n, _ := s.codec.endpointAndLength(p)
	if ep&0x80 == 0 {
		err := s.dev.Out(s.tryCtx, ep, p.data)
		if errors.Is(err, context.Canceled) {
			return false // it would have to wait: the worker will
		}
		st := statusOf(s.wctx, err)
		if err != nil {
			s.log.Debug("usbredir: out", "ep", ep, "err", err)
			n = 0
		}
		s.reply(p, st, n, nil)
		return true
	}
	n = min(n, maxData)
	data, err := s.dev.In(s.tryCtx, ep, n)
	switch {
	case errors.Is(err, context.Canceled):
		return false // nothing ready yet
	case err != nil:
		s.log.Debug("usbredir: in", "ep", ep, "err", err)
		s.replyStatus(p, statusOf(s.wctx, err))
		return true
	case len(data) == 0 && n > 0:
		// Never forwarded (inNonEmpty): the worker polls again.
		return false
	}
	if len(data) > n {
		s.log.Warn("usbredir: device returned more than asked", "ep", ep, "got", len(data), "want", n)
		data = data[:n]
	}
	s.reply(p, statusSuccess, len(data), data)
	return true
}

// enqueue hands p to the worker of endpoint ep.
func (s *session) enqueue(ep uint8, p packet) {
	s.mu.Lock()
	w := s.workers[ep]
	if w == nil {
		s.mu.Unlock()
		s.replyStatus(p, statusStall)
		return
	}
	if _, dup := s.pending[p.id]; dup && isTransfer(p.typ) {
		s.mu.Unlock()
		// A second transfer under a live id would make cancel ambiguous.
		s.log.Warn("usbredir: duplicate packet id", "id", p.id)
		s.replyStatus(p, statusInval)
		return
	}
	if len(w.queue) >= maxQueued || s.queuedBytes+len(p.data) > maxQueuedBytes {
		s.mu.Unlock()
		s.log.Warn("usbredir: endpoint queue full", "ep", ep)
		s.replyStatus(p, statusIOError)
		return
	}
	ctx, cancel := context.WithCancel(s.wctx)
	r := &request{p: p, ctx: ctx, cancel: cancel}
	w.queue = append(w.queue, r)
	s.queuedBytes += len(p.data)
	if isTransfer(p.typ) {
		s.pending[p.id] = r
	}
	s.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func isTransfer(typ uint32) bool {
	return typ == typeControlPacket || typ == typeBulkPacket || typ == typeInterruptPacket
}

// cancel handles cancel_data_packet: the request's ctx ends, and its
// worker answers it once, cancelled or with its normal completion if the
// device had already finished (protocols.md §6.4 step 7). An id we do
// not hold was already answered.
func (s *session) cancel(id uint64) {
	s.mu.Lock()
	r := s.pending[id]
	if r != nil {
		r.cancelled = true
		r.cancel()
	}
	s.mu.Unlock()
	if r == nil {
		s.log.Debug("usbredir: cancel for an id not pending", "id", id)
	}
}

func (s *session) serveWorker(w *worker) {
	defer s.wg.Done()
	for {
		select {
		case <-w.wake:
		case <-s.wctx.Done():
			return
		}
		for {
			s.mu.Lock()
			if len(w.queue) == 0 {
				s.mu.Unlock()
				break
			}
			r := w.queue[0]
			w.queue[0] = nil
			w.queue = w.queue[1:]
			s.queuedBytes -= len(r.p.data)
			w.active = true
			s.mu.Unlock()

			s.serveRequest(r)

			s.mu.Lock()
			w.active = false
			if s.pending[r.p.id] == r {
				delete(s.pending, r.p.id)
			}
			s.mu.Unlock()
			r.cancel()
			if s.wctx.Err() != nil {
				return
			}
		}
	}
}

// statusOf maps a device error to a usbredir status.
func statusOf(ctx context.Context, err error) uint8 {
	switch {
	case err == nil:
		return statusSuccess
	case errors.Is(err, usb.ErrStall):
		return statusStall
	case ctx.Err() != nil:
		return statusCancelled
	case errors.Is(err, context.DeadlineExceeded):
		return statusTimeout
	}
	return statusIOError
}

func (s *session) serveRequest(r *request) {
	if s.wctx.Err() != nil {
		return // the session is over: no more replies
	}
	p := r.p
	if r.ctx.Err() != nil {
		// Cancelled while queued: the device never saw it.
		s.replyStatus(p, statusCancelled)
		return
	}
	switch p.typ {
	case typeControlPacket:
		s.control(r)
	case typeBulkPacket, typeInterruptPacket:
		s.transfer(r)
	case typeSetConfiguration:
		s.setConfiguration(r)
	case typeGetConfiguration:
		s.getConfiguration(r)
	case typeSetAltSetting:
		s.setAltSetting(r)
	case typeGetAltSetting:
		s.getAltSetting(r)
	}
}

func (s *session) control(r *request) {
	p := r.p
	setup := usb.Setup{
		RequestType: p.hdr[2],
		Request:     p.hdr[1],
		Value:       binary.LittleEndian.Uint16(p.hdr[4:]),
		Index:       binary.LittleEndian.Uint16(p.hdr[6:]),
		Length:      binary.LittleEndian.Uint16(p.hdr[8:]),
	}
	if setup.In() != (p.hdr[0]&0x80 != 0) {
		// The endpoint field decides which way data may flow on the wire
		// (protocols.md §6.3); a request type going the other way cannot
		// be answered within the protocol.
		s.log.Warn("usbredir: control packet endpoint and request type disagree", "ep", p.hdr[0], "type", setup.RequestType)
		s.replyStatus(p, statusInval)
		return
	}
	if setup.In() {
		// QEMU's control buffer holds 4096 bytes; it stalls on more
		// (protocols.md §6.4 step 3), so never ask the device for more.
		setup.Length = min(setup.Length, maxControlIn)
	}
	data, err := s.dev.Control(r.ctx, setup, p.data)
	st := statusOf(r.ctx, err)
	if st != statusSuccess {
		s.log.Debug("usbredir: control", "setup", fmt.Sprintf("% x", setup.Bytes()), "err", err)
		s.replyStatus(p, st)
		return
	}
	if !setup.In() {
		s.reply(p, st, len(p.data), nil)
		return
	}
	if len(data) > int(setup.Length) {
		s.log.Warn("usbredir: device returned more control data than asked", "got", len(data), "want", setup.Length)
		data = data[:setup.Length]
	}
	s.reply(p, st, len(data), data)
}

// transfer serves a bulk or interrupt packet on its endpoint's worker.
func (s *session) transfer(r *request) {
	p := r.p
	ep, n, _ := s.codec.endpointAndLength(p)
	if ep&0x80 == 0 {
		err := s.dev.Out(r.ctx, ep, p.data)
		st := statusOf(r.ctx, err)
		if err != nil {
			s.log.Debug("usbredir: out", "ep", ep, "err", err)
			n = 0
		}
		s.reply(p, st, n, nil)
		return
	}
	// Bulk IN: n is how much the guest asked for. Our device's messages
	// are far below maxData; a larger request is served up to maxData,
	// which the guest sees as a short transfer.
	n = min(n, maxData)
	data, err := s.inNonEmpty(r.ctx, ep, n)
	if err != nil {
		st := statusOf(r.ctx, err)
		if st != statusCancelled {
			s.log.Debug("usbredir: in", "ep", ep, "err", err)
		}
		s.replyStatus(p, st)
		return
	}
	if len(data) > n {
		// More than asked would be babble to QEMU (protocols.md §6.4).
		s.log.Warn("usbredir: device returned more than asked", "ep", ep, "got", len(data), "want", n)
		data = data[:n]
	}
	s.reply(p, statusSuccess, len(data), data)
}

// inNonEmpty calls dev.In until it returns data. A usb.Device returns a
// whole transfer; an empty one would reach the guest as a zero-length
// message of its own, the desync peers.md's appendix (QEMU 7.2's 54-byte
// trap) describes, so the transport never forwards one.
func (s *session) inNonEmpty(ctx context.Context, ep uint8, n int) ([]byte, error) {
	backoff := time.Millisecond
	for {
		data, err := s.dev.In(ctx, ep, n)
		if err != nil || len(data) > 0 || n == 0 {
			return data, err
		}
		s.log.Debug("usbredir: device returned an empty IN transfer; not forwarded", "ep", ep)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
		backoff = min(2*backoff, 50*time.Millisecond)
	}
}

// announceConfigLocked resends interface_info and ep_info, which QEMU wants
// before configuration_status or alt_setting_status (protocols.md §6.4).
func (s *session) announceConfigLocked() error {
	if err := s.sendLocked(typeInterfaceInfo, 0, s.interfaceInfo(), nil); err != nil {
		return err
	}
	return s.sendLocked(typeEPInfo, 0, s.epInfo(), nil)
}

func (s *session) setConfiguration(r *request) {
	cfg := r.p.hdr[0]
	_, err := s.dev.Control(r.ctx, usb.Setup{RequestType: 0x00, Request: usb.ReqSetConfiguration, Value: uint16(cfg)}, nil)
	st := statusOf(r.ctx, err)
	s.mu.Lock()
	if st == statusSuccess {
		s.config = cfg
	}
	cur := s.config
	s.mu.Unlock()
	if err != nil {
		s.log.Debug("usbredir: set_configuration", "config", cfg, "err", err)
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if st == statusSuccess {
		if s.announceConfigLocked() != nil {
			return
		}
	}
	s.sendLocked(typeConfigurationStatus, r.p.id, []byte{st, cur}, nil)
}

func (s *session) getConfiguration(r *request) {
	data, err := s.dev.Control(r.ctx, usb.Setup{RequestType: 0x80, Request: usb.ReqGetConfiguration, Length: 1}, nil)
	st := statusOf(r.ctx, err)
	s.mu.Lock()
	cur := s.config
	s.mu.Unlock()
	if st == statusSuccess && len(data) == 1 {
		cur = data[0]
	} else if st == statusSuccess {
		// A device that answers nothing: fall back to what we tracked.
		s.log.Debug("usbredir: get_configuration: short answer", "len", len(data))
	}
	s.send(typeConfigurationStatus, r.p.id, []byte{st, cur}, nil)
}

func (s *session) setAltSetting(r *request) {
	iface, alt := r.p.hdr[0], r.p.hdr[1]
	_, err := s.dev.Control(r.ctx, usb.Setup{RequestType: 0x01, Request: usb.ReqSetInterface, Value: uint16(alt), Index: uint16(iface)}, nil)
	st := statusOf(r.ctx, err)
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if st == statusSuccess {
		if s.announceConfigLocked() != nil {
			return
		}
	}
	s.sendLocked(typeAltSettingStatus, r.p.id, []byte{st, iface, alt}, nil)
}

func (s *session) getAltSetting(r *request) {
	iface := r.p.hdr[0]
	data, err := s.dev.Control(r.ctx, usb.Setup{RequestType: 0x81, Request: usb.ReqGetInterface, Index: uint16(iface), Length: 1}, nil)
	st := statusOf(r.ctx, err)
	alt := byte(0)
	if st == statusSuccess && len(data) == 1 {
		alt = data[0]
	} else if st == statusSuccess {
		st = statusIOError
	}
	s.send(typeAltSettingStatus, r.p.id, []byte{st, iface, alt}, nil)
}

// startInterrupt handles start_interrupt_receiving: answer with the
// status, then poll the endpoint and forward what it returns as
// unsolicited interrupt_packets (protocols.md §6.4 step 6).
func (s *session) startInterrupt(p packet) {
	ep := p.hdr[0]
	e, ok := s.endpoint(ep)
	if !ok || e.Type != usb.Interrupt || !e.In() {
		s.log.Warn("usbredir: start_interrupt_receiving for no interrupt IN endpoint", "ep", ep)
		s.send(typeInterruptReceivingStatus, p.id, []byte{statusStall, ep}, nil)
		return
	}
	s.mu.Lock()
	_, running := s.intr[ep]
	var (
		ctx        context.Context
		prev, done chan struct{}
	)
	if !running {
		var cancel context.CancelFunc
		ctx, cancel = context.WithCancel(s.wctx)
		s.intr[ep] = cancel
		prev, done = s.intrDone[ep], make(chan struct{})
		s.intrDone[ep] = done
	}
	s.mu.Unlock()
	// The status goes out before any interrupt_packet of this run.
	s.send(typeInterruptReceivingStatus, p.id, []byte{statusSuccess, ep}, nil)
	if !running {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer close(done)
			// One In caller per endpoint at a time (usb package doc): a
			// stop quickly followed by a start waits for the old poller.
			if prev != nil {
				<-prev
			}
			s.pollInterrupt(ctx, e)
		}()
	}
}

func (s *session) pollInterrupt(ctx context.Context, e usb.Endpoint) {
	max := int(e.MaxPacketSize)
	if max == 0 {
		max = 64
	}
	backoff := time.Millisecond
	for {
		data, err := s.inNonEmpty(ctx, e.Address, max)
		if ctx.Err() != nil && err != nil {
			return
		}
		if err != nil {
			// E.g. a Reset made In return: wait a little instead of
			// spinning, and poll again while receiving is on.
			s.log.Debug("usbredir: interrupt in", "ep", e.Address, "err", err)
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			backoff = min(2*backoff, 100*time.Millisecond)
			continue
		}
		backoff = time.Millisecond
		if len(data) > max {
			data = data[:max]
		}
		h := make([]byte, 4)
		h[0] = e.Address
		h[1] = statusSuccess
		binary.LittleEndian.PutUint16(h[2:], uint16(len(data)))
		s.wmu.Lock()
		// Ids of unsolicited packets count up from 0 (protocols.md §6.4).
		id := s.nextIntrID
		s.nextIntrID++
		err = s.sendLocked(typeInterruptPacket, id, h, data)
		s.wmu.Unlock()
		if err != nil {
			return
		}
	}
}
