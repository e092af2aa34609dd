package usbip

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/vscard/vscard/usb"
)

// fakeDev is an in-test usb.Device shaped like a CCID reader: interrupt IN
// 0x81, bulk IN 0x82, bulk OUT 0x03. What the test pushes with feed comes
// out of In; Out records transfers (and may echo them to 0x82).
type fakeDev struct {
	info usb.Info

	mu       sync.Mutex
	cond     *sync.Cond
	inq      map[uint8][][]byte
	outs     [][]byte
	controls []usb.Setup
	ctlData  [][]byte
	resets   int
	cancels  int // In calls that ended by ctx
	echo     bool
	outErr   error
}

func newFakeDev() *fakeDev {
	d := &fakeDev{
		info: usb.Info{
			Speed: usb.SpeedFull, VendorID: 0x08E6, ProductID: 0x4433, BCDDevice: 0x0101,
			ConfigurationValue: 1, NumConfigurations: 1,
			Interfaces: []usb.Interface{{Number: 0, Class: 0x0B}},
			Endpoints: []usb.Endpoint{
				{Address: 0x81, Type: usb.Interrupt, MaxPacketSize: 8, Interval: 255},
				{Address: 0x82, Type: usb.Bulk, MaxPacketSize: 64},
				{Address: 0x03, Type: usb.Bulk, MaxPacketSize: 64},
			},
		},
		inq: make(map[uint8][][]byte),
	}
	d.cond = sync.NewCond(&d.mu)
	return d
}

var fakeDeviceDescriptor = []byte{18, 1, 0x10, 0x01, 0, 0, 0, 64, 0xE6, 0x08, 0x33, 0x44, 0x01, 0x01, 1, 2, 3, 1}

func (d *fakeDev) Info() usb.Info { return d.info }

func (d *fakeDev) Control(ctx context.Context, s usb.Setup, data []byte) ([]byte, error) {
	d.mu.Lock()
	d.controls = append(d.controls, s)
	d.ctlData = append(d.ctlData, append([]byte(nil), data...))
	d.mu.Unlock()
	switch {
	case s.RequestType == 0x80 && s.Request == usb.ReqGetDescriptor && s.Value == 0x0100:
		return fakeDeviceDescriptor[:min(len(fakeDeviceDescriptor), int(s.Length))], nil
	case s.RequestType == 0x00 && s.Request == usb.ReqSetConfiguration:
		return nil, nil
	case s.RequestType == 0x21: // class OUT: accepted
		return nil, nil
	}
	return nil, usb.ErrStall
}

func (d *fakeDev) Out(ctx context.Context, ep uint8, data []byte) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.outErr != nil {
		return d.outErr
	}
	d.outs = append(d.outs, append([]byte(nil), data...))
	if d.echo {
		d.inq[0x82] = append(d.inq[0x82], append([]byte("re:"), data...))
		d.cond.Broadcast()
	}
	return nil
}

func (d *fakeDev) feed(ep uint8, b []byte) {
	d.mu.Lock()
	d.inq[ep] = append(d.inq[ep], b)
	d.cond.Broadcast()
	d.mu.Unlock()
}

func (d *fakeDev) In(ctx context.Context, ep uint8, max int) ([]byte, error) {
	stop := context.AfterFunc(ctx, func() {
		d.mu.Lock()
		d.cond.Broadcast()
		d.mu.Unlock()
	})
	defer stop()
	d.mu.Lock()
	defer d.mu.Unlock()
	for len(d.inq[ep]) == 0 {
		if ctx.Err() != nil {
			d.cancels++
			return nil, ctx.Err()
		}
		d.cond.Wait()
	}
	b := d.inq[ep][0]
	if len(b) > max {
		d.inq[ep][0] = b[max:] // the rest is the next transfer's
		return b[:max], nil
	}
	d.inq[ep] = d.inq[ep][1:]
	return b, nil
}

func (d *fakeDev) Reset() {
	d.mu.Lock()
	d.resets++
	d.cond.Broadcast()
	d.mu.Unlock()
}

func (d *fakeDev) snapshot() (resets, cancels int, outs [][]byte, controls []usb.Setup) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.resets, d.cancels, append([][]byte(nil), d.outs...), append([]usb.Setup(nil), d.controls...)
}

// startServer serves srv on a loopback port until the test ends.
func startServer(t testing.TB, srv *Server) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Serve did not return after cancel")
		}
	})
	return ln.Addr().String()
}

// client is an in-test USB/IP client, playing usbip(8) and vhci-hcd.
type client struct {
	t     testing.TB
	c     net.Conn
	devid uint32
	dirs  map[uint32]uint32 // seqnum -> direction, to frame RET_SUBMIT
}

func dial(t testing.TB, addr string) *client {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return &client{t: t, c: c, dirs: make(map[uint32]uint32)}
}

func (cl *client) write(b []byte) {
	cl.t.Helper()
	if _, err := cl.c.Write(b); err != nil {
		cl.t.Fatalf("client write: %v", err)
	}
}

func (cl *client) read(n int) []byte {
	cl.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(cl.c, b); err != nil {
		cl.t.Fatalf("client read %d bytes: %v", n, err)
	}
	return b
}

// importDev runs OP_REQ_IMPORT and returns the reply status and record.
func (cl *client) importDev(busid string) (uint32, deviceRecord) {
	cl.t.Helper()
	req := opHeader{Version: version, Code: opReqImport}.append(nil)
	req = appendFixed(req, busid, busIDLen)
	cl.write(req)
	h, err := parseOpHeader(cl.read(opHeaderLen))
	if err != nil {
		cl.t.Fatal(err)
	}
	if h.Version != version || h.Code != opRepImport {
		cl.t.Fatalf("import reply header %+v", h)
	}
	if h.Status != stOK {
		return h.Status, deviceRecord{}
	}
	rec, err := parseDeviceRecord(cl.read(deviceLen))
	if err != nil {
		cl.t.Fatal(err)
	}
	cl.devid = rec.BusNum<<16 | rec.DevNum
	return stOK, rec
}

func (cl *client) submit(seq uint32, dir uint32, ep uint32, length uint32, setup []byte, data []byte) {
	cl.t.Helper()
	h := urbHeader{Command: cmdSubmit, Seqnum: seq, DevID: cl.devid, Direction: dir, EP: ep, TransferBufferLength: length}
	copy(h.Setup[:], setup)
	cl.dirs[seq] = dir
	cl.write(append(h.append(nil), data...))
}

func (cl *client) unlink(seq, target uint32) {
	cl.t.Helper()
	cl.write(urbHeader{Command: cmdUnlink, Seqnum: seq, DevID: cl.devid, UnlinkSeqnum: target}.append(nil))
}

// reply reads one RET_SUBMIT or RET_UNLINK and the data after it.
func (cl *client) reply() (urbHeader, []byte) {
	cl.t.Helper()
	h, err := parseURBHeader(cl.read(urbHeaderLen))
	if err != nil {
		cl.t.Fatal(err)
	}
	if h.DevID != 0 || h.Direction != 0 || h.EP != 0 {
		cl.t.Errorf("reply %d: devid/direction/ep %d/%d/%d, want 0", h.Seqnum, h.DevID, h.Direction, h.EP)
	}
	var data []byte
	switch h.Command {
	case retSubmit:
		dir, ok := cl.dirs[h.Seqnum]
		if !ok {
			cl.t.Fatalf("RET_SUBMIT for unknown seqnum %d", h.Seqnum)
		}
		delete(cl.dirs, h.Seqnum)
		if dir == dirIn && h.ActualLength > 0 {
			data = cl.read(int(h.ActualLength))
		}
	case retUnlink:
	default:
		cl.t.Fatalf("server sent command %d", h.Command)
	}
	return h, data
}

// expectClosed checks that the server closes the connection.
func (cl *client) expectClosed() {
	cl.t.Helper()
	_ = cl.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(cl.c)
	if err != nil && !errors.Is(err, net.ErrClosed) {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			cl.t.Fatalf("server did not close the connection (read %x)", b)
		}
	}
}

// expectSilent checks that nothing arrives for d.
func (cl *client) expectSilent(d time.Duration) {
	cl.t.Helper()
	_ = cl.c.SetReadDeadline(time.Now().Add(d))
	var b [1]byte
	n, err := cl.c.Read(b[:])
	var ne net.Error
	if n > 0 || !errors.As(err, &ne) || !ne.Timeout() {
		cl.t.Fatalf("expected no reply, got %d bytes, err %v", n, err)
	}
	_ = cl.c.SetReadDeadline(time.Now().Add(10 * time.Second))
}

func setupBytes(rt, req uint8, value, index, length uint16) []byte {
	return usb.Setup{RequestType: rt, Request: req, Value: value, Index: index, Length: length}.Bytes()
}

func be32(b []byte, off int) uint32 { return binary.BigEndian.Uint32(b[off:]) }
func be16(b []byte, off int) uint16 { return binary.BigEndian.Uint16(b[off:]) }

func netListen() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }

func contextWithCancel() (context.Context, context.CancelFunc) {
	return context.WithCancel(context.Background())
}
