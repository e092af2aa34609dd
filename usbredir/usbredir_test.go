package usbredir

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"flag"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vscard/vscard/usb"
)

// fakeDev is a CCID-shaped usb.Device: bulk OUT 0x03, interrupt IN 0x81,
// bulk IN 0x82 (protocols.md §6.4). Bulk OUT data is echoed on bulk IN
// with a prefix, so that a test sees which transfer produced what.
type fakeDev struct {
	mu       sync.Mutex
	setups   []usb.Setup
	outs     [][]byte
	resets   int
	config   uint8
	alt      uint8
	bulkIn   chan []byte
	intrIn   chan []byte
	blockOut chan struct{} // non-nil: Out waits for it
	outDone  []bool        // per Out call: was its ctx already done
}

func newFakeDev() *fakeDev {
	return &fakeDev{bulkIn: make(chan []byte, 256), intrIn: make(chan []byte, 16)}
}

var devDescriptor = []byte{18, 1, 0x10, 0x01, 0, 0, 0, 64, 0xE6, 0x08, 0x33, 0x44, 0x00, 0x01, 1, 2, 3, 1}

func (d *fakeDev) Info() usb.Info {
	return usb.Info{
		Speed: usb.SpeedFull, VendorID: 0x08E6, ProductID: 0x4433, BCDDevice: 0x0100,
		ConfigurationValue: 1, NumConfigurations: 1,
		Interfaces: []usb.Interface{{Number: 0, Class: 0x0B}},
		Endpoints: []usb.Endpoint{
			{Address: 0x81, Type: usb.Interrupt, MaxPacketSize: 8, Interval: 255},
			{Address: 0x82, Type: usb.Bulk, MaxPacketSize: 64},
			{Address: 0x03, Type: usb.Bulk, MaxPacketSize: 64},
		},
	}
}

func (d *fakeDev) Control(ctx context.Context, s usb.Setup, data []byte) ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.setups = append(d.setups, s)
	switch {
	case s.RequestType == 0x80 && s.Request == usb.ReqGetDescriptor && s.Value == 0x0100:
		return devDescriptor[:min(len(devDescriptor), int(s.Length))], nil
	case s.RequestType == 0x00 && s.Request == usb.ReqSetConfiguration:
		if s.Value > 1 {
			return nil, usb.ErrStall
		}
		d.config = uint8(s.Value)
		return nil, nil
	case s.RequestType == 0x80 && s.Request == usb.ReqGetConfiguration:
		return []byte{d.config}, nil
	case s.RequestType == 0x01 && s.Request == usb.ReqSetInterface:
		if s.Value != 0 || s.Index != 0 {
			return nil, usb.ErrStall
		}
		return nil, nil
	case s.RequestType == 0x81 && s.Request == usb.ReqGetInterface:
		return []byte{d.alt}, nil
	case s.RequestType == 0x21 && s.Request == 0x7F: // a class OUT request with data
		d.outs = append(d.outs, append([]byte(nil), data...))
		return nil, nil
	}
	return nil, usb.ErrStall
}

func (d *fakeDev) Out(ctx context.Context, ep uint8, data []byte) error {
	d.mu.Lock()
	block := d.blockOut
	d.outDone = append(d.outDone, ctx.Err() != nil)
	d.mu.Unlock()
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	d.mu.Lock()
	d.outs = append(d.outs, append([]byte(nil), data...))
	d.mu.Unlock()
	if ep != 0x03 {
		return usb.ErrStall
	}
	d.bulkIn <- append([]byte("re:"), data...)
	return nil
}

func (d *fakeDev) In(ctx context.Context, ep uint8, max int) ([]byte, error) {
	var ch chan []byte
	switch ep {
	case 0x81:
		ch = d.intrIn
	case 0x82:
		ch = d.bulkIn
	default:
		return nil, usb.ErrStall
	}
	select {
	case b := <-ch:
		if len(b) > max {
			// Keep the rest for the next call, as a Device must.
			go func(rest []byte) { ch <- rest }(b[max:])
			b = b[:max]
		}
		return b, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (d *fakeDev) Reset() {
	d.mu.Lock()
	d.resets++
	d.config = 0
	d.mu.Unlock()
}

// peer plays QEMU's usb-guest side on a real socket.
type peer struct {
	t     testing.TB
	c     net.Conn
	br    *bufio.Reader
	codec codec // framing once both hellos are exchanged
}

// rpacket is a packet as the peer receives it: type, id, and everything
// after the header.
type rpacket struct {
	typ  uint32
	id   uint64
	body []byte
}

type session_ struct {
	peer *peer
	dev  *fakeDev
	done chan error
	stop context.CancelFunc
}

// start runs Serve on one end of a loopback TCP connection and returns the
// peer for the other end, after the hello exchange with peerCaps.
func start(t testing.TB, peerCaps caps) *session_ {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	dev := newFakeDev()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, server, dev, nil) }()
	p := &peer{t: t, c: client, br: bufio.NewReader(client)}
	s := &session_{peer: p, dev: dev, done: done, stop: cancel}
	t.Cleanup(func() {
		cancel()
		client.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Error("Serve did not return after cancel and close")
		}
	})
	_ = client.SetDeadline(time.Now().Add(10 * time.Second))

	h := p.recv()
	if h.typ != typeHello || h.id != 0 || len(h.body) != 68 {
		t.Fatalf("first packet: type %d id %d len %d, want hello 0 68", h.typ, h.id, len(h.body))
	}
	if v := string(bytes.TrimRight(h.body[:64], "\x00")); !strings.HasPrefix(v, "vscard") {
		t.Errorf("hello version %q", v)
	}
	if got := caps(binary.LittleEndian.Uint32(h.body[64:])); got != ourCaps {
		t.Errorf("hello caps %#x, want %#x", got, ourCaps)
	}
	hdr := make([]byte, 64)
	copy(hdr, "qemu usb-redir guest 7.2.22")
	p.sendRaw(codec{}, typeHello, 0, hdr, binary.LittleEndian.AppendUint32(nil, uint32(peerCaps)))
	p.codec = negotiate(peerCaps)
	return s
}

func (p *peer) sendRaw(c codec, typ uint32, id uint64, hdr, data []byte) {
	p.t.Helper()
	if _, err := p.c.Write(c.appendPacket(nil, typ, id, hdr, data)); err != nil {
		p.t.Fatalf("peer write: %v", err)
	}
}

func (p *peer) send(typ uint32, id uint64, hdr, data []byte) {
	p.t.Helper()
	p.sendRaw(p.codec, typ, id, hdr, data)
}

func (p *peer) recv() rpacket {
	p.t.Helper()
	r, err := p.tryRecv()
	if err != nil {
		p.t.Fatalf("peer read: %v", err)
	}
	return r
}

func (p *peer) tryRecv() (rpacket, error) {
	h := make([]byte, p.codec.headerLen())
	if _, err := io.ReadFull(p.br, h); err != nil {
		return rpacket{}, err
	}
	r := rpacket{typ: binary.LittleEndian.Uint32(h)}
	if p.codec.ids64 {
		r.id = binary.LittleEndian.Uint64(h[8:])
	} else {
		r.id = uint64(binary.LittleEndian.Uint32(h[8:]))
	}
	r.body = make([]byte, binary.LittleEndian.Uint32(h[4:]))
	_, err := io.ReadFull(p.br, r.body)
	return r, err
}

// expect receives one packet and checks its type, id and body size.
func (p *peer) expect(typ uint32, id uint64, size int) rpacket {
	p.t.Helper()
	r := p.recv()
	if r.typ != typ || r.id != id || (size >= 0 && len(r.body) != size) {
		p.t.Fatalf("got packet type %d id %d len %d (% x), want type %d id %d len %d",
			r.typ, r.id, len(r.body), r.body[:min(len(r.body), 32)], typ, id, size)
	}
	return r
}

// expectNothing checks that no packet arrives for a while.
func (p *peer) expectNothing(d time.Duration) {
	p.t.Helper()
	_ = p.c.SetReadDeadline(time.Now().Add(d))
	r, err := p.tryRecv()
	if err == nil {
		p.t.Fatalf("unexpected packet type %d id %d", r.typ, r.id)
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		p.t.Fatalf("read: %v", err)
	}
	_ = p.c.SetReadDeadline(time.Now().Add(10 * time.Second))
}

// QEMU 7.2's advertised caps (protocols.md §6.2), without bulk_streams.
const qemuCaps = capConnectDeviceVersion | capFilter | capDeviceDisconnectAck |
	capEPInfoMaxPacketSize | cap64BitIDs | cap32BitBulkLength | capBulkReceiving

// announce consumes interface_info, ep_info and device_connect.
func (p *peer) announce() (iface, ep, conn rpacket) {
	p.t.Helper()
	epLen, connLen := 96, 8
	if p.codec.both&capEPInfoMaxPacketSize != 0 {
		epLen = 160
	}
	if p.codec.both&capConnectDeviceVersion != 0 {
		connLen = 10
	}
	iface = p.expect(typeInterfaceInfo, 0, 132)
	ep = p.expect(typeEPInfo, 0, epLen)
	conn = p.expect(typeDeviceConnect, 0, connLen)
	return
}

func TestHandshake(t *testing.T) {
	tests := []struct {
		name string
		caps caps
	}{
		{"qemu", qemuCaps},
		{"none", 0},
		{"64-bit ids only", cap64BitIDs},
		{"32-bit bulk only", cap32BitBulkLength},
		{"max packet size and device version", capEPInfoMaxPacketSize | capConnectDeviceVersion},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := start(t, tt.caps)
			iface, ep, conn := s.peer.announce()

			wantIface := make([]byte, 132)
			wantIface[0] = 1
			wantIface[4+32] = 0x0B
			if !bytes.Equal(iface.body, wantIface) {
				t.Errorf("interface_info % x", iface.body)
			}
			b := ep.body
			for i := range 32 {
				want := byte(255)
				switch i {
				case 0, 16:
					want = 0
				case 3, 18:
					want = 2
				case 17:
					want = 3
				}
				if b[i] != want {
					t.Errorf("ep_info type[%d] = %d, want %d", i, b[i], want)
				}
			}
			if b[32+17] != 255 {
				t.Errorf("interrupt interval %d, want 255", b[32+17])
			}
			if len(b) == 160 {
				for i, want := range map[int]uint16{0: 0, 3: 64, 17: 8, 18: 64} {
					if got := binary.LittleEndian.Uint16(b[96+2*i:]); got != want {
						t.Errorf("max_packet_size[%d] = %d, want %d", i, got, want)
					}
				}
			}
			c := conn.body
			if c[0] != 1 || c[1] != 0 || binary.LittleEndian.Uint16(c[4:]) != 0x08E6 || binary.LittleEndian.Uint16(c[6:]) != 0x4433 {
				t.Errorf("device_connect % x", c)
			}
			if len(c) == 10 && binary.LittleEndian.Uint16(c[8:]) != 0x0100 {
				t.Errorf("device_connect bcd % x", c[8:])
			}
			// The session works in the negotiated framing: a control
			// transfer with an id that needs 64 bits when negotiated.
			id := uint64(7)
			if s.peer.codec.ids64 {
				id = 1<<40 + 7
			}
			s.peer.send(typeControlPacket, id, ctrlHdr(0x80, usb.ReqGetDescriptor, 0x0100, 0, 18), nil)
			r := s.peer.expect(typeControlPacket, id, 10+18)
			if !bytes.Equal(r.body[10:], devDescriptor) {
				t.Errorf("descriptor % x", r.body[10:])
			}
		})
	}
}

func ctrlHdr(reqType, req uint8, value, index, length uint16) []byte {
	h := []byte{reqType & 0x80, req, reqType, 0, 0, 0, 0, 0, 0, 0}
	binary.LittleEndian.PutUint16(h[4:], value)
	binary.LittleEndian.PutUint16(h[6:], index)
	binary.LittleEndian.PutUint16(h[8:], length)
	return h
}

func TestControl(t *testing.T) {
	tests := []struct {
		name       string
		hdr        []byte
		data       []byte
		wantStatus uint8
		wantLen    int
		wantData   []byte
	}{
		{"GET_DESCRIPTOR device", ctrlHdr(0x80, usb.ReqGetDescriptor, 0x0100, 0, 18), nil, statusSuccess, 18, devDescriptor},
		{"GET_DESCRIPTOR short", ctrlHdr(0x80, usb.ReqGetDescriptor, 0x0100, 0, 8), nil, statusSuccess, 8, devDescriptor[:8]},
		{"GET_DESCRIPTOR long ask", ctrlHdr(0x80, usb.ReqGetDescriptor, 0x0100, 0, 0xFFFF), nil, statusSuccess, 18, devDescriptor},
		{"unsupported stalls", ctrlHdr(0x80, usb.ReqGetDescriptor, 0x0F00, 0, 5), nil, statusStall, 0, nil},
		{"class OUT with data", ctrlHdr(0x21, 0x7F, 0, 0, 3), []byte{1, 2, 3}, statusSuccess, 3, nil},
	}
	s := start(t, qemuCaps)
	s.peer.announce()
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s.peer.t = t
			id := uint64(100 + i)
			s.peer.send(typeControlPacket, id, tt.hdr, tt.data)
			r := s.peer.expect(typeControlPacket, id, 10+len(tt.wantData))
			want := append([]byte(nil), tt.hdr...)
			want[3] = tt.wantStatus
			binary.LittleEndian.PutUint16(want[8:], uint16(tt.wantLen))
			if !bytes.Equal(r.body[:10], want) {
				t.Errorf("reply header % x, want % x", r.body[:10], want)
			}
			if !bytes.Equal(r.body[10:], tt.wantData) {
				t.Errorf("reply data % x, want % x", r.body[10:], tt.wantData)
			}
		})
	}
	s.dev.mu.Lock()
	defer s.dev.mu.Unlock()
	if len(s.dev.outs) != 1 || !bytes.Equal(s.dev.outs[0], []byte{1, 2, 3}) {
		t.Errorf("device got OUT data %x", s.dev.outs)
	}
	// The device never sees a wLength beyond QEMU's 4096-byte buffer.
	for _, su := range s.dev.setups {
		if su.Length > maxControlIn {
			t.Errorf("device saw wLength %d", su.Length)
		}
	}
}

func TestConfiguration(t *testing.T) {
	s := start(t, qemuCaps)
	p := s.peer
	p.announce()

	// set_configuration: interface_info and ep_info come again before the
	// status (protocols.md §6.4 step 3).
	p.send(typeSetConfiguration, 1, []byte{1}, nil)
	p.expect(typeInterfaceInfo, 0, 132)
	p.expect(typeEPInfo, 0, 160)
	r := p.expect(typeConfigurationStatus, 1, 2)
	if !bytes.Equal(r.body, []byte{statusSuccess, 1}) {
		t.Errorf("configuration_status % x", r.body)
	}
	p.send(typeGetConfiguration, 2, nil, nil)
	if r := p.expect(typeConfigurationStatus, 2, 2); !bytes.Equal(r.body, []byte{statusSuccess, 1}) {
		t.Errorf("get_configuration % x", r.body)
	}
	// A refused configuration: stall, current one unchanged, no infos.
	p.send(typeSetConfiguration, 3, []byte{9}, nil)
	if r := p.expect(typeConfigurationStatus, 3, 2); !bytes.Equal(r.body, []byte{statusStall, 1}) {
		t.Errorf("refused set_configuration % x", r.body)
	}

	p.send(typeSetAltSetting, 4, []byte{0, 0}, nil)
	p.expect(typeInterfaceInfo, 0, 132)
	p.expect(typeEPInfo, 0, 160)
	if r := p.expect(typeAltSettingStatus, 4, 3); !bytes.Equal(r.body, []byte{statusSuccess, 0, 0}) {
		t.Errorf("alt_setting_status % x", r.body)
	}
	p.send(typeSetAltSetting, 5, []byte{0, 3}, nil)
	if r := p.expect(typeAltSettingStatus, 5, 3); !bytes.Equal(r.body, []byte{statusStall, 0, 3}) {
		t.Errorf("refused set_alt_setting % x", r.body)
	}
	p.send(typeGetAltSetting, 6, []byte{0}, nil)
	if r := p.expect(typeAltSettingStatus, 6, 3); !bytes.Equal(r.body, []byte{statusSuccess, 0, 0}) {
		t.Errorf("get_alt_setting % x", r.body)
	}

	s.dev.mu.Lock()
	defer s.dev.mu.Unlock()
	if len(s.dev.setups) == 0 || s.dev.setups[0] != (usb.Setup{Request: usb.ReqSetConfiguration, Value: 1}) {
		t.Errorf("device setups %+v", s.dev.setups)
	}
}

func bulkHdr(c codec, ep uint8, n int) []byte {
	h := make([]byte, c.bulkHeaderLen())
	h[0] = ep
	binary.LittleEndian.PutUint16(h[2:], uint16(n))
	if c.bulk32 {
		binary.LittleEndian.PutUint16(h[8:], uint16(n>>16))
	}
	return h
}

func bulkLen(c codec, body []byte) int {
	n := int(binary.LittleEndian.Uint16(body[2:]))
	if c.bulk32 {
		n |= int(binary.LittleEndian.Uint16(body[8:])) << 16
	}
	return n
}

func TestBulkPipelined(t *testing.T) {
	for _, tc := range []struct {
		name string
		caps caps
		ask  int
	}{
		{"qemu", qemuCaps, 65546}, // libccid's read size needs length_high
		{"16-bit lengths", 0, 65535},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := start(t, tc.caps)
			p := s.peer
			p.announce()
			c := p.codec
			hl := c.bulkHeaderLen()
			// Three IN requests outstanding before any OUT, as QEMU
			// pipelines them.
			for id := uint64(10); id < 13; id++ {
				p.send(typeBulkPacket, id, bulkHdr(c, 0x82, tc.ask), nil)
			}
			msgs := [][]byte{[]byte("one"), bytes.Repeat([]byte{0xAB}, 5000), {}}
			for i, m := range msgs {
				id := uint64(20 + i)
				p.send(typeBulkPacket, id, bulkHdr(c, 0x03, len(m)), m)
			}
			// Replies: OUT acks and IN data interleave, but each endpoint
			// is answered in order, IN ids 10, 11, 12 with the echoes.
			gotIn, gotOut := 0, 0
			for gotIn+gotOut < 6 {
				r := p.recv()
				if r.typ != typeBulkPacket {
					t.Fatalf("packet type %d", r.typ)
				}
				switch r.body[0] {
				case 0x03:
					if r.id != uint64(20+gotOut) || len(r.body) != hl || r.body[1] != 0 || bulkLen(c, r.body) != len(msgs[gotOut]) {
						t.Fatalf("OUT reply id %d % x", r.id, r.body)
					}
					gotOut++
				case 0x82:
					want := append([]byte("re:"), msgs[gotIn]...)
					if r.id != uint64(10+gotIn) || r.body[1] != 0 || bulkLen(c, r.body) != len(want) || !bytes.Equal(r.body[hl:], want) {
						t.Fatalf("IN reply id %d len %d status %d", r.id, bulkLen(c, r.body), r.body[1])
					}
					gotIn++
				default:
					t.Fatalf("reply on endpoint %#x", r.body[0])
				}
			}
			// An IN request shorter than the message gets the first part;
			// the device keeps the rest for the next request.
			p.send(typeBulkPacket, 30, bulkHdr(c, 0x03, 10), []byte("0123456789"))
			p.expect(typeBulkPacket, 30, hl)
			p.send(typeBulkPacket, 31, bulkHdr(c, 0x82, 4), nil)
			if r := p.expect(typeBulkPacket, 31, hl+4); string(r.body[hl:]) != "re:0" {
				t.Errorf("short IN got %q", r.body[hl:])
			}
			p.send(typeBulkPacket, 32, bulkHdr(c, 0x82, 64), nil)
			if r := p.expect(typeBulkPacket, 32, hl+9); string(r.body[hl:]) != "123456789" {
				t.Errorf("rest of IN got %q", r.body[hl:])
			}
			// A bulk packet for an endpoint the device lacks stalls.
			p.send(typeBulkPacket, 33, bulkHdr(c, 0x85, 64), nil)
			if r := p.expect(typeBulkPacket, 33, hl); r.body[1] != statusStall {
				t.Errorf("unknown endpoint status %d", r.body[1])
			}
		})
	}
}

func TestInterruptReceiving(t *testing.T) {
	s := start(t, qemuCaps)
	p := s.peer
	p.announce()
	p.send(typeStartInterruptReceiving, 0, []byte{0x81}, nil)
	if r := p.expect(typeInterruptReceivingStatus, 0, 2); !bytes.Equal(r.body, []byte{0, 0x81}) {
		t.Fatalf("status % x", r.body)
	}
	// A second start while running does not start a second poller.
	p.send(typeStartInterruptReceiving, 1, []byte{0x81}, nil)
	p.expect(typeInterruptReceivingStatus, 1, 2)

	for i, n := range [][]byte{{0x50, 0x03}, {0x50, 0x02}} {
		s.dev.intrIn <- n
		r := p.expect(typeInterruptPacket, uint64(i), 6)
		if !bytes.Equal(r.body, append([]byte{0x81, 0, 2, 0}, n...)) {
			t.Errorf("interrupt_packet % x", r.body)
		}
	}
	p.send(typeStopInterruptReceiving, 2, []byte{0x81}, nil)
	if r := p.expect(typeInterruptReceivingStatus, 2, 2); !bytes.Equal(r.body, []byte{0, 0x81}) {
		t.Fatalf("stop status % x", r.body)
	}
	s.dev.intrIn <- []byte{0x50, 0x03}
	p.expectNothing(100 * time.Millisecond)
	// Restarting delivers what the device kept, with the next id.
	p.send(typeStartInterruptReceiving, 3, []byte{0x81}, nil)
	p.expect(typeInterruptReceivingStatus, 3, 2)
	p.expect(typeInterruptPacket, 2, 6)

	// Receiving on a bulk endpoint is refused.
	p.send(typeStartInterruptReceiving, 4, []byte{0x82}, nil)
	if r := p.expect(typeInterruptReceivingStatus, 4, 2); r.body[0] != statusStall {
		t.Errorf("bulk endpoint status % x", r.body)
	}
}

func TestCancel(t *testing.T) {
	s := start(t, qemuCaps)
	p := s.peer
	p.announce()
	c := p.codec
	hl := c.bulkHeaderLen()

	p.send(typeBulkPacket, 5, bulkHdr(c, 0x82, 64), nil)
	p.send(typeBulkPacket, 6, bulkHdr(c, 0x82, 64), nil)
	p.expectNothing(50 * time.Millisecond)
	// Cancel the queued one first, then the one in progress: each gets
	// exactly one reply, status cancelled, length 0.
	p.send(typeCancelDataPacket, 6, nil, nil)
	p.send(typeCancelDataPacket, 5, nil, nil)
	got := map[uint64]bool{}
	for range 2 {
		r := p.recv()
		if r.typ != typeBulkPacket || len(r.body) != hl || r.body[1] != statusCancelled || bulkLen(c, r.body) != 0 {
			t.Fatalf("cancel reply type %d id %d % x", r.typ, r.id, r.body)
		}
		got[r.id] = true
	}
	if !got[5] || !got[6] {
		t.Fatalf("cancel replies for %v", got)
	}
	// Cancels for answered or unknown ids get no reply.
	p.send(typeCancelDataPacket, 5, nil, nil)
	p.send(typeCancelDataPacket, 99, nil, nil)
	p.expectNothing(50 * time.Millisecond)

	// The device lost nothing: the next request gets the next message.
	s.dev.bulkIn <- []byte("later")
	p.send(typeBulkPacket, 7, bulkHdr(c, 0x82, 64), nil)
	if r := p.expect(typeBulkPacket, 7, hl+5); string(r.body[hl:]) != "later" {
		t.Errorf("after cancel got %q", r.body[hl:])
	}
	// A cancel after completion: one reply only, the normal one.
	s.dev.bulkIn <- []byte("x")
	p.send(typeBulkPacket, 8, bulkHdr(c, 0x82, 64), nil)
	p.expect(typeBulkPacket, 8, hl+1)
	p.send(typeCancelDataPacket, 8, nil, nil)
	p.expectNothing(50 * time.Millisecond)

	// A bulk OUT stuck in the device is cancelled too.
	s.dev.mu.Lock()
	s.dev.blockOut = make(chan struct{})
	s.dev.mu.Unlock()
	p.send(typeBulkPacket, 9, bulkHdr(c, 0x03, 2), []byte{1, 2})
	p.send(typeCancelDataPacket, 9, nil, nil)
	if r := p.expect(typeBulkPacket, 9, hl); r.body[1] != statusCancelled {
		t.Errorf("cancelled OUT status %d", r.body[1])
	}
}

func TestReset(t *testing.T) {
	s := start(t, qemuCaps)
	p := s.peer
	p.announce()
	p.send(typeSetConfiguration, 1, []byte{1}, nil)
	p.expect(typeInterfaceInfo, 0, 132)
	p.expect(typeEPInfo, 0, 160)
	p.expect(typeConfigurationStatus, 1, 2)
	p.send(typeReset, 0, nil, nil)
	// No reply to reset; the device is unconfigured afterwards.
	p.send(typeGetConfiguration, 2, nil, nil)
	if r := p.expect(typeConfigurationStatus, 2, 2); !bytes.Equal(r.body, []byte{0, 0}) {
		t.Errorf("configuration after reset % x", r.body)
	}
	s.dev.mu.Lock()
	defer s.dev.mu.Unlock()
	if s.dev.resets != 1 {
		t.Errorf("device resets %d", s.dev.resets)
	}
}

func TestDisconnectOnCancel(t *testing.T) {
	for _, tc := range []struct {
		name string
		caps caps
		ack  bool
	}{
		{"with ack", qemuCaps, true},
		{"peer never acks", qemuCaps, false},
		{"no ack cap", qemuCaps &^ capDeviceDisconnectAck, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := start(t, tc.caps)
			p := s.peer
			p.announce()
			// An IN request pending in the device must not hold Serve.
			p.send(typeBulkPacket, 1, bulkHdr(p.codec, 0x82, 64), nil)
			p.send(typeStartInterruptReceiving, 2, []byte{0x81}, nil)
			p.expect(typeInterruptReceivingStatus, 2, 2)
			begin := time.Now()
			s.stop()
			p.expect(typeDeviceDisconnect, 0, 0)
			if tc.ack {
				p.send(typeDeviceDisconnectAck, 0, nil, nil)
			}
			select {
			case err := <-s.done:
				if err != nil {
					t.Errorf("Serve: %v", err)
				}
				s.done <- err
			case <-time.After(5 * time.Second):
				t.Fatal("Serve did not return")
			}
			took := time.Since(begin)
			if tc.ack && took > disconnectAckTimeout/2 {
				t.Errorf("Serve took %v despite the ack", took)
			}
			if !tc.ack && tc.caps&capDeviceDisconnectAck != 0 && took < disconnectAckTimeout/2 {
				t.Errorf("Serve did not wait for the ack (%v)", took)
			}
			// Nothing follows the disconnect: not a cancelled reply for
			// the pending IN request.
			if r, err := p.tryRecv(); err == nil {
				t.Errorf("packet type %d after device_disconnect", r.typ)
			}
		})
	}
}

func TestPeerCloses(t *testing.T) {
	s := start(t, qemuCaps)
	s.peer.announce()
	s.peer.send(typeBulkPacket, 1, bulkHdr(s.peer.codec, 0x82, 64), nil)
	s.peer.c.Close()
	select {
	case err := <-s.done:
		if err != nil {
			t.Errorf("Serve after peer close: %v", err)
		}
		s.done <- err
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after the peer closed")
	}
}

func TestPeerClosesMidPacket(t *testing.T) {
	s := start(t, qemuCaps)
	s.peer.announce()
	b := s.peer.codec.appendPacket(nil, typeControlPacket, 1, ctrlHdr(0x80, 6, 0x100, 0, 18), nil)
	s.peer.c.Write(b[:len(b)-3])
	s.peer.c.Close()
	select {
	case err := <-s.done:
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("Serve: %v, want unexpected EOF", err)
		}
		s.done <- err
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
}

func TestAbsurdLengthEndsSession(t *testing.T) {
	s := start(t, qemuCaps)
	s.peer.announce()
	h := make([]byte, 16)
	binary.LittleEndian.PutUint32(h, typeBulkPacket)
	binary.LittleEndian.PutUint32(h[4:], 0xFFFFFFF0)
	s.peer.c.Write(h)
	select {
	case err := <-s.done:
		if err == nil || !strings.Contains(err.Error(), "exceeds") {
			t.Errorf("Serve: %v", err)
		}
		s.done <- err
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
}

// rawPacket builds a packet with an arbitrary length field.
func rawPacket(c codec, typ uint32, id uint64, length uint32, body []byte) []byte {
	b := c.appendPacket(nil, typ, id, body, nil)
	binary.LittleEndian.PutUint32(b[4:], length)
	return b
}

func TestMalformedPacketsSurvive(t *testing.T) {
	c := negotiate(qemuCaps)
	bulkOutHdr := bulkHdr(c, 0x03, 4)
	tests := []struct {
		name  string
		raw   []byte
		reply uint64 // id of an inval reply expected, 0: none
		typ   uint32
	}{
		{"unknown type", rawPacket(c, 9999, 1, 5, []byte{1, 2, 3, 4, 5}), 0, 0},
		{"device_connect from the guest", rawPacket(c, typeDeviceConnect, 2, 10, make([]byte, 10)), 0, 0},
		{"set_configuration with extra data", rawPacket(c, typeSetConfiguration, 3, 3, []byte{1, 2, 3}), 0, 0},
		{"control shorter than its header", rawPacket(c, typeControlPacket, 4, 4, []byte{0, 6, 0x80, 0}), 0, 0},
		{"control OUT data length mismatch", c.appendPacket(nil, typeControlPacket, 5, ctrlHdr(0x21, 0x7F, 0, 0, 8), []byte{1, 2}), 5, typeControlPacket},
		{"bulk IN carrying data", c.appendPacket(nil, typeBulkPacket, 6, bulkHdr(c, 0x82, 2), []byte{1, 2}), 6, typeBulkPacket},
		{"bulk OUT too long", func() []byte {
			d := make([]byte, maxData+1)
			return c.appendPacket(nil, typeBulkPacket, 7, bulkHdr(c, 0x03, len(d)), d)
		}(), 7, typeBulkPacket},
		{"bulk OUT length field lies", c.appendPacket(nil, typeBulkPacket, 8, bulkOutHdr, []byte{1, 2, 3}), 8, typeBulkPacket},
		{"interrupt IN from the guest", c.appendPacket(nil, typeInterruptPacket, 9, []byte{0x81, 0, 0, 0}, nil), 0, 0},
		{"filter not NUL-terminated", c.appendPacket(nil, typeFilterFilter, 10, nil, []byte("-1,-1,-1,-1,1")), 0, 0},
		{"valid filter", c.appendPacket(nil, typeFilterFilter, 11, nil, []byte("-1,-1,-1,-1,1\x00")), 0, 0},
		{"control direction mismatch", c.appendPacket(nil, typeControlPacket, 14, func() []byte {
			h := ctrlHdr(0x21, 0x7F, 0, 0, 4)
			h[0] = 0x80 // endpoint says IN, request type says OUT
			return h
		}(), nil), 14, typeControlPacket},
		{"second hello", c.appendPacket(nil, typeHello, 12, make([]byte, 64), []byte{0xFF, 0, 0, 0}), 0, 0},
		{"iso stream start", c.appendPacket(nil, typeStartIsoStream, 13, []byte{0x84, 1, 1}, nil), 13, typeIsoStreamStatus},
	}
	s := start(t, qemuCaps)
	p := s.peer
	p.announce()
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p.t = t
			if _, err := p.c.Write(tt.raw); err != nil {
				t.Fatal(err)
			}
			if tt.reply != 0 {
				r := p.recv()
				if r.typ != tt.typ || r.id != tt.reply {
					t.Fatalf("reply type %d id %d, want %d %d", r.typ, r.id, tt.typ, tt.reply)
				}
				st := r.body[1]
				if r.typ == typeControlPacket {
					st = r.body[3]
				} else if r.typ == typeIsoStreamStatus {
					st = r.body[0]
				}
				if st == statusSuccess {
					t.Errorf("status success for a malformed packet")
				}
			}
			// The session still serves.
			id := uint64(1000 + i)
			p.send(typeControlPacket, id, ctrlHdr(0x80, usb.ReqGetDescriptor, 0x0100, 0, 18), nil)
			p.expect(typeControlPacket, id, 28)
		})
	}
}

// Packets before the peer's hello are ignored; the hello still works.
func TestPacketBeforeHello(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, server, newFakeDev(), nil) }()
	defer func() { cancel(); client.Close(); <-done }()
	p := &peer{t: t, c: client, br: bufio.NewReader(client)}
	_ = client.SetDeadline(time.Now().Add(10 * time.Second))
	p.expect(typeHello, 0, 68)
	p.send(typeReset, 0, nil, nil)
	p.send(typeHello, 0, make([]byte, 64), binary.LittleEndian.AppendUint32(nil, uint32(qemuCaps)))
	p.codec = negotiate(qemuCaps)
	p.announce()
}

// Writes from the interrupt poller, the bulk workers and the control
// worker interleave whole packets only.
func TestConcurrentWritesWholePackets(t *testing.T) {
	s := start(t, qemuCaps)
	p := s.peer
	p.announce()
	c := p.codec
	p.send(typeStartInterruptReceiving, 0, []byte{0x81}, nil)
	p.expect(typeInterruptReceivingStatus, 0, 2)
	const n = 50
	go func() {
		for range n {
			s.dev.intrIn <- []byte{0x50, 0x03}
		}
	}()
	counts := map[uint32]int{}
	recv := func() {
		r, err := p.tryRecv()
		if err != nil {
			t.Fatalf("after %v: %v", counts, err)
		}
		counts[r.typ]++
		if r.typ == typeBulkPacket && r.body[1] != statusSuccess {
			t.Errorf("bulk id %d status %d", r.id, r.body[1])
		}
	}
	// Batches of 10 stay within the per-endpoint queue bound.
	for b := range n / 10 {
		for i := b * 10; i < b*10+10; i++ {
			p.send(typeControlPacket, uint64(100+i), ctrlHdr(0x80, usb.ReqGetDescriptor, 0x0100, 0, 18), nil)
			p.send(typeBulkPacket, uint64(1000+i), bulkHdr(c, 0x03, 3), []byte("abc"))
			p.send(typeBulkPacket, uint64(2000+i), bulkHdr(c, 0x82, 64), nil)
		}
		for counts[typeControlPacket]+counts[typeBulkPacket] < 30*(b+1) {
			recv()
		}
	}
	for counts[typeInterruptPacket] < n {
		recv()
	}
	if counts[typeInterruptPacket] != n || counts[typeControlPacket] != n || counts[typeBulkPacket] != 2*n {
		t.Errorf("packet counts %v", counts)
	}
}

// A peer that queues more than maxQueued transfers on one endpoint gets
// I/O errors for the excess at once; the queued ones are still served.
func TestQueueBound(t *testing.T) {
	s := start(t, qemuCaps)
	p := s.peer
	p.announce()
	c := p.codec
	hl := c.bulkHeaderLen()
	release := make(chan struct{})
	s.dev.mu.Lock()
	s.dev.blockOut = release
	s.dev.mu.Unlock()
	const n = maxQueued + 8
	for i := range n {
		p.send(typeBulkPacket, uint64(i+1), bulkHdr(c, 0x03, 1), []byte{byte(i)})
	}
	// Excess: 7 (one transfer may already be in the device) or 8, all
	// past the first maxQueued; which ones depends on when the worker took
	// the first transfer.
	rejected := map[uint64]bool{}
	for {
		// At least 7 must come; an 8th, if any, comes right behind them.
		wait := 10 * time.Second
		if len(rejected) >= 7 {
			wait = 300 * time.Millisecond
		}
		_ = p.c.SetReadDeadline(time.Now().Add(wait))
		r, err := p.tryRecv()
		if err != nil {
			break
		}
		if r.body[1] != statusIOError || r.id <= maxQueued {
			t.Fatalf("early reply id %d status %d", r.id, r.body[1])
		}
		rejected[r.id] = true
	}
	_ = p.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if len(rejected) != 7 && len(rejected) != 8 {
		t.Fatalf("%d rejected, want 7 or 8", len(rejected))
	}
	close(release)
	for id := uint64(1); id <= n; id++ {
		if rejected[id] {
			continue
		}
		r := p.expect(typeBulkPacket, id, hl)
		if r.body[1] != statusSuccess {
			t.Errorf("queued id %d status %d", r.id, r.body[1])
		}
	}
}

// TestBulkTriedInline: a bulk transfer on an idle endpoint is first
// offered to the device with a done ctx, by the reader (session.bulk); a
// device that cannot take it at once gets it again from the endpoint's
// worker with a live ctx. Each transfer reaches the device once, in order.
func TestBulkTriedInline(t *testing.T) {
	s := start(t, qemuCaps)
	p := s.peer
	p.announce()
	c := p.codec
	hl := c.bulkHeaderLen()
	in := func(id uint64, want string) {
		t.Helper()
		p.send(typeBulkPacket, id, bulkHdr(c, 0x82, 64), nil)
		if r := p.expect(typeBulkPacket, id, hl+len(want)); string(r.body[hl:]) != want {
			t.Errorf("IN %d got %q, want %q", id, r.body[hl:], want)
		}
	}
	p.send(typeBulkPacket, 1, bulkHdr(c, 0x03, 3), []byte("abc"))
	if r := p.expect(typeBulkPacket, 1, hl); r.body[1] != statusSuccess {
		t.Fatalf("OUT 1 status %d", r.body[1])
	}
	in(2, "re:abc")

	release := make(chan struct{})
	s.dev.mu.Lock()
	s.dev.blockOut = release
	s.dev.mu.Unlock()
	p.send(typeBulkPacket, 3, bulkHdr(c, 0x03, 3), []byte("def"))
	p.send(typeBulkPacket, 4, bulkHdr(c, 0x03, 3), []byte("ghi"))
	p.expectNothing(100 * time.Millisecond)
	close(release)
	for id := uint64(3); id <= 4; id++ {
		if r := p.expect(typeBulkPacket, id, hl); r.body[1] != statusSuccess {
			t.Fatalf("OUT %d status %d", id, r.body[1])
		}
	}
	in(5, "re:def")
	in(6, "re:ghi")

	s.dev.mu.Lock()
	defer s.dev.mu.Unlock()
	var got []string
	for _, o := range s.dev.outs {
		got = append(got, string(o))
	}
	if want := []string{"abc", "def", "ghi"}; !slices.Equal(got, want) {
		t.Errorf("device got %q, want %q", got, want)
	}
	// abc: taken at the first try; def: refused by the blocked device,
	// then from the worker; ghi: straight to the busy endpoint's worker.
	if want := []bool{true, true, false, false}; !slices.Equal(s.dev.outDone, want) {
		t.Errorf("Out calls with a done ctx: %v, want %v", s.dev.outDone, want)
	}
}

// An empty IN transfer from the device never reaches the guest as a
// message of its own (peers.md appendix, QEMU 7.2's 54-byte trap).
func TestEmptyInNotForwarded(t *testing.T) {
	s := start(t, qemuCaps)
	p := s.peer
	p.announce()
	hl := p.codec.bulkHeaderLen()
	s.dev.bulkIn <- []byte{}
	s.dev.bulkIn <- []byte("data")
	p.send(typeBulkPacket, 1, bulkHdr(p.codec, 0x82, 64), nil)
	if r := p.expect(typeBulkPacket, 1, hl+4); string(r.body[hl:]) != "data" {
		t.Errorf("got %q", r.body[hl:])
	}
}

var update = flag.Bool("update", false, "rewrite testdata golden files")

// TestAnnounceGolden pins the exact bytes of the announcement QEMU 7.2
// gets for a CCID-shaped device (protocols.md §6.4 step 2), in hex, one
// packet a line; regenerate with -update and check the diff by hand
// against protocols.md §6.3.
func TestAnnounceGolden(t *testing.T) {
	for _, tc := range []struct {
		file string
		caps caps
	}{
		{"announce-qemu72.hex", qemuCaps | capBulkStreams},
		{"announce-nocaps.hex", 0},
	} {
		t.Run(tc.file, func(t *testing.T) {
			s := start(t, tc.caps)
			var got strings.Builder
			for range 3 {
				r := s.peer.recv()
				got.WriteString(hex.EncodeToString(s.peer.codec.appendPacket(nil, r.typ, r.id, r.body, nil)))
				got.WriteString("\n")
			}
			path := filepath.Join("testdata", tc.file)
			if *update {
				if err := os.WriteFile(path, []byte(got.String()), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if got.String() != string(want) {
				t.Errorf("announcement differs from %s:\ngot\n%swant\n%s", path, got.String(), want)
			}
		})
	}
}

// Ending the session before the peer's hello sends nothing more and returns.
func TestCancelBeforeHello(t *testing.T) {
	server, client := net.Pipe()
	defer client.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, server, newFakeDev(), nil) }()
	p := &peer{t: t, c: client, br: bufio.NewReader(client)}
	p.expect(typeHello, 0, 68)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
	if r, err := p.tryRecv(); err == nil {
		t.Errorf("packet type %d after cancel before hello", r.typ)
	}
}

// A peer that never reads cannot hold Serve past ctx, not even in the
// hello.
func TestCancelPeerNeverReads(t *testing.T) {
	server, client := net.Pipe() // unbuffered: every write waits for a read
	defer client.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, server, newFakeDev(), nil) }()
	time.Sleep(20 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
}

// BenchmarkBulkRoundTrip measures one CCID-like exchange through Serve over
// loopback TCP: a 20-byte bulk OUT and the bulk IN that collects the
// device's answer, as QEMU sends them for one APDU.
func BenchmarkBulkRoundTrip(b *testing.B) {
	s := start(b, qemuCaps)
	p := s.peer
	p.announce()
	c := p.codec
	msg := bytes.Repeat([]byte{0x6F}, 20)
	var buf []byte
	b.ResetTimer()
	for i := range b.N {
		id := uint64(2 * i)
		buf = c.appendPacket(buf[:0], typeBulkPacket, id, bulkHdr(c, 0x82, 65546), nil)
		buf = c.appendPacket(buf, typeBulkPacket, id+1, bulkHdr(c, 0x03, len(msg)), msg)
		if _, err := p.c.Write(buf); err != nil {
			b.Fatal(err)
		}
		for range 2 {
			if _, err := p.tryRecv(); err != nil {
				b.Fatal(err)
			}
		}
	}
}
