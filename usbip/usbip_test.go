package usbip

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vscard/vscard/usb"
)

func TestAdd(t *testing.T) {
	s := NewServer(nil)
	for i, tc := range []struct {
		busid  string
		nilDev bool
		ok     bool
	}{
		{"1-1", false, true},
		{"reader", false, true},
		{"1-1", false, false},
		{"", false, false},
		{strings.Repeat("x", 32), false, false},
		{strings.Repeat("x", 31), false, true},
		{"a/b", false, false},
		{"a b", false, false},
		{"2-2", true, false},
	} {
		var d usb.Device
		if !tc.nilDev {
			d = newFakeDev()
		}
		err := s.Add(tc.busid, d)
		if (err == nil) != tc.ok {
			t.Errorf("row %d Add(%q): err %v, want ok=%v", i, tc.busid, err, tc.ok)
		}
	}
}

func TestDevlist(t *testing.T) {
	s := NewServer(nil)
	d1 := newFakeDev()
	d2 := newFakeDev()
	d2.info.VendorID, d2.info.ProductID = 0x1234, 0x5678
	d2.info.Interfaces = []usb.Interface{{Number: 0, Class: 0xFF, SubClass: 1, Protocol: 2}, {Number: 0, AltSetting: 1, Class: 0xFF}, {Number: 1, Class: 0x0B}}
	if err := s.Add("3-2", d1); err != nil {
		t.Fatal(err)
	}
	if err := s.Add("reader", d2); err != nil {
		t.Fatal(err)
	}
	cl := dial(t, startServer(t, s))
	cl.write(opHeader{Version: version, Code: opReqDevlist}.append(nil))
	hdr := cl.read(12)
	if be16(hdr, 0) != 0x0111 || be16(hdr, 2) != 0x0005 || be32(hdr, 4) != 0 || be32(hdr, 8) != 2 {
		t.Fatalf("devlist header % x", hdr)
	}
	// Offsets from protocols.md §5's table, read raw.
	type want struct {
		path, busid           string
		busnum, devnum, speed uint32
		vid, pid              uint16
		nif                   int
		ifs                   []byte
	}
	for i, w := range []want{
		{"/sys/devices/platform/vscard/usb3/3-2", "3-2", 3, 2, 2, 0x08E6, 0x4433, 1, []byte{0x0B, 0, 0, 0}},
		{"/sys/devices/platform/vscard/usb1/reader", "reader", 1, 3, 2, 0x1234, 0x5678, 2, []byte{0xFF, 1, 2, 0, 0x0B, 0, 0, 0}},
	} {
		r := cl.read(deviceLen)
		if got := cString(r[:256]); got != w.path {
			t.Errorf("dev %d path %q, want %q", i, got, w.path)
		}
		if got := cString(r[0x100:0x120]); got != w.busid {
			t.Errorf("dev %d busid %q, want %q", i, got, w.busid)
		}
		if be32(r, 0x120) != w.busnum || be32(r, 0x124) != w.devnum || be32(r, 0x128) != w.speed {
			t.Errorf("dev %d busnum/devnum/speed %d/%d/%d, want %d/%d/%d", i, be32(r, 0x120), be32(r, 0x124), be32(r, 0x128), w.busnum, w.devnum, w.speed)
		}
		if be16(r, 0x12C) != w.vid || be16(r, 0x12E) != w.pid || be16(r, 0x130) != 0x0101 {
			t.Errorf("dev %d ids %04x:%04x bcd %04x", i, be16(r, 0x12C), be16(r, 0x12E), be16(r, 0x130))
		}
		if r[0x135] != 1 || r[0x136] != 1 || int(r[0x137]) != w.nif {
			t.Errorf("dev %d config %d nconf %d nif %d, want 1 1 %d", i, r[0x135], r[0x136], r[0x137], w.nif)
		}
		if ifs := cl.read(4 * w.nif); !bytes.Equal(ifs, w.ifs) {
			t.Errorf("dev %d interfaces % x, want % x", i, ifs, w.ifs)
		}
	}
	cl.expectClosed()
}

func TestImport(t *testing.T) {
	s := NewServer(nil)
	d := newFakeDev()
	if err := s.Add("1-1", d); err != nil {
		t.Fatal(err)
	}
	addr := startServer(t, s)

	first := dial(t, addr)
	st, rec := first.importDev("1-1")
	if st != stOK || rec.BusID != "1-1" || rec.Speed != uint32(usb.SpeedFull) || rec.VendorID != 0x08E6 || rec.NumInterfaces != 1 {
		t.Fatalf("import: status %d record %+v", st, rec)
	}
	for _, tc := range []struct {
		busid string
		want  uint32
	}{
		{"1-2", stNoDev},
		{"", stNoDev},
		{"1-1", stBusy},
	} {
		cl := dial(t, addr)
		if st, _ := cl.importDev(tc.busid); st != tc.want {
			t.Errorf("import %q while imported: status %d, want %d", tc.busid, st, tc.want)
		}
		cl.expectClosed()
	}
	// Detach by closing; the device is reset and importable again.
	first.c.Close()
	waitFor(t, func() bool { r, _, _, _ := d.snapshot(); return r == 1 })
	again := dial(t, addr)
	if st, _ := again.importDev("1-1"); st != stOK {
		t.Fatalf("re-import after detach: status %d", st)
	}
}

func TestBadOperation(t *testing.T) {
	s := NewServer(nil)
	_ = s.Add("1-1", newFakeDev())
	addr := startServer(t, s)
	for _, tc := range []struct {
		name string
		req  []byte
	}{
		{"old version", opHeader{Version: 0x0106, Code: opReqDevlist}.append(nil)},
		{"unknown code", opHeader{Version: version, Code: 0x8001}.append(nil)},
		{"reply code", opHeader{Version: version, Code: opRepImport}.append(nil)},
		{"short import", opHeader{Version: version, Code: opReqImport}.append([]byte{})[:8]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cl := dial(t, addr)
			cl.write(tc.req)
			if tc.name == "short import" {
				cl.write([]byte("1-1"))
				cl.c.(interface{ CloseWrite() error }).CloseWrite()
			}
			cl.expectClosed()
		})
	}
	// Still serving.
	if st, _ := dial(t, addr).importDev("1-1"); st != stOK {
		t.Fatalf("import after bad requests: %d", st)
	}
}

// imported starts a server with one fake device and imports it.
func imported(t *testing.T) (*fakeDev, *client, string) {
	t.Helper()
	s := NewServer(nil)
	d := newFakeDev()
	if err := s.Add("1-1", d); err != nil {
		t.Fatal(err)
	}
	addr := startServer(t, s)
	cl := dial(t, addr)
	if st, _ := cl.importDev("1-1"); st != stOK {
		t.Fatalf("import: %d", st)
	}
	return d, cl, addr
}

func TestControl(t *testing.T) {
	d, cl, _ := imported(t)
	for i, tc := range []struct {
		name   string
		dir    uint32
		length uint32
		setup  []byte
		data   []byte
		status int32
		want   []byte
		actual uint32
	}{
		{"GET_DESCRIPTOR device", dirIn, 18, setupBytes(0x80, 6, 0x0100, 0, 18), nil, 0, fakeDeviceDescriptor, 18},
		{"GET_DESCRIPTOR first 8", dirIn, 64, setupBytes(0x80, 6, 0x0100, 0, 8), nil, 0, fakeDeviceDescriptor[:8], 8},
		{"buffer shorter than wLength", dirIn, 4, setupBytes(0x80, 6, 0x0100, 0, 18), nil, 0, fakeDeviceDescriptor[:4], 4},
		{"SET_CONFIGURATION", dirOut, 0, setupBytes(0x00, 9, 1, 0, 0), nil, 0, nil, 0},
		{"class OUT with data", dirOut, 3, setupBytes(0x21, 0x01, 0, 0, 3), []byte{1, 2, 3}, 0, nil, 3},
		{"unsupported: stall", dirIn, 2, setupBytes(0x80, 0, 0, 0, 2), nil, errEPIPE, nil, 0},
		{"direction mismatch: stall", dirOut, 4, setupBytes(0x80, 6, 0x0100, 0, 4), []byte{0, 0, 0, 0}, errEPIPE, nil, 0},
		{"SET_ADDRESS answered here", dirOut, 0, setupBytes(0x00, 5, 7, 0, 0), nil, 0, nil, 0},
		{"port reset resets the device", dirOut, 0, setupBytes(0x23, 3, 4, 1, 0), nil, 0, nil, 0},
	} {
		seq := uint32(100 + i)
		cl.submit(seq, tc.dir, 0, tc.length, tc.setup, tc.data)
		h, data := cl.reply()
		if h.Command != retSubmit || h.Seqnum != seq || h.Status != tc.status || h.ActualLength != tc.actual || !bytes.Equal(data, tc.want) {
			t.Errorf("%s: reply %+v data % x; want status %d actual %d data % x", tc.name, h, data, tc.status, tc.actual, tc.want)
		}
	}
	resets, _, _, controls := d.snapshot()
	if resets != 1 {
		t.Errorf("device resets %d after SET_FEATURE(PORT_RESET), want 1", resets)
	}
	for _, c := range controls {
		if c.Request == usb.ReqSetAddress {
			t.Error("SET_ADDRESS reached the device")
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if !bytes.Contains(bytes.Join(d.ctlData, nil), []byte{1, 2, 3}) {
		t.Errorf("class OUT data stage not delivered: %x", d.ctlData)
	}
}

func TestBulkPipelined(t *testing.T) {
	d, cl, _ := imported(t)
	d.echo = true
	// usbip clients queue IN URBs ahead of the OUT that provokes them.
	cl.submit(1, dirIn, 2, 512, nil, nil)
	cl.submit(2, dirIn, 2, 512, nil, nil)
	cl.submit(3, dirOut, 3, 5, nil, []byte("cmd-1"))
	cl.submit(4, dirOut, 3, 5, nil, []byte("cmd-2"))
	cl.submit(5, dirIn, 2, 4, nil, nil) // shorter than the response
	cl.submit(6, dirIn, 2, 512, nil, nil)
	cl.submit(7, dirOut, 3, 5, nil, []byte("cmd-3"))
	got := map[uint32]string{}
	for range 7 {
		h, data := cl.reply()
		if h.Status != 0 {
			t.Errorf("seq %d status %d", h.Seqnum, h.Status)
		}
		if h.Seqnum >= 3 && h.Seqnum != 5 && h.Seqnum != 6 && h.ActualLength != 5 {
			t.Errorf("OUT seq %d actual_length %d, want 5", h.Seqnum, h.ActualLength)
		}
		got[h.Seqnum] = string(data)
	}
	want := map[uint32]string{1: "re:cmd-1", 2: "re:cmd-2", 3: "", 4: "", 5: "re:c", 6: "md-3", 7: ""}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("IN data by seqnum %v, want %v", got, want)
	}
	_, _, outs, _ := d.snapshot()
	if string(bytes.Join(outs, []byte(","))) != "cmd-1,cmd-2,cmd-3" {
		t.Errorf("OUT transfers in device order: %q", outs)
	}
}

func TestInterruptPending(t *testing.T) {
	d, cl, _ := imported(t)
	cl.submit(10, dirIn, 1, 8, nil, nil)
	cl.expectSilent(150 * time.Millisecond) // a NAKing endpoint stays pending
	// A control transfer still goes through while the interrupt URB waits.
	cl.submit(11, dirIn, 0, 18, setupBytes(0x80, 6, 0x0100, 0, 18), nil)
	if h, _ := cl.reply(); h.Seqnum != 11 || h.Status != 0 {
		t.Fatalf("control behind a pending interrupt URB: %+v", h)
	}
	d.feed(0x81, []byte{0x50, 0x03})
	h, data := cl.reply()
	if h.Seqnum != 10 || !bytes.Equal(data, []byte{0x50, 0x03}) {
		t.Fatalf("interrupt completion %+v % x", h, data)
	}
}

func TestUnlink(t *testing.T) {
	d, cl, _ := imported(t)

	// Pending: cancelled, answered by RET_UNLINK -ECONNRESET only.
	cl.submit(20, dirIn, 1, 8, nil, nil)
	cl.expectSilent(50 * time.Millisecond)
	cl.unlink(21, 20)
	h, _ := cl.reply()
	if h.Command != retUnlink || h.Seqnum != 21 || h.Status != errECONNRESET {
		t.Fatalf("unlink of pending URB: %+v", h)
	}
	waitFor(t, func() bool { _, c, _, _ := d.snapshot(); return c == 1 })
	// The next URB on the endpoint gets the next data; RET_SUBMIT for 20
	// never comes (the client's reply() fails the test on an unknown seq).
	cl.submit(22, dirIn, 1, 8, nil, nil)
	d.feed(0x81, []byte{0x50, 0x02})
	if h, data := cl.reply(); h.Seqnum != 22 || !bytes.Equal(data, []byte{0x50, 0x02}) {
		t.Fatalf("URB after unlink: %+v % x", h, data)
	}

	// Completed: status 0.
	d.feed(0x82, []byte("resp"))
	cl.submit(23, dirIn, 2, 64, nil, nil)
	if h, _ := cl.reply(); h.Seqnum != 23 {
		t.Fatalf("bulk IN: %+v", h)
	}
	cl.unlink(24, 23)
	if h, _ := cl.reply(); h.Command != retUnlink || h.Seqnum != 24 || h.Status != 0 {
		t.Fatalf("unlink of completed URB: %+v", h)
	}

	// Queued behind a pending URB on the same endpoint: removed unserved.
	cl.submit(25, dirIn, 2, 64, nil, nil)
	cl.submit(26, dirIn, 2, 64, nil, nil)
	cl.unlink(27, 26)
	if h, _ := cl.reply(); h.Seqnum != 27 || h.Status != errECONNRESET {
		t.Fatalf("unlink of queued URB: %+v", h)
	}
	d.feed(0x82, []byte("a"))
	d.feed(0x82, []byte("b"))
	cl.submit(28, dirIn, 2, 64, nil, nil)
	for _, w := range []struct {
		seq  uint32
		data string
	}{{25, "a"}, {28, "b"}} {
		if h, data := cl.reply(); h.Seqnum != w.seq || string(data) != w.data {
			t.Fatalf("after queued unlink: %+v %q, want seq %d %q", h, data, w.seq, w.data)
		}
	}
}

func TestStallAndErrors(t *testing.T) {
	d, cl, _ := imported(t)
	d.outErr = usb.ErrStall
	cl.submit(1, dirOut, 3, 2, nil, []byte{1, 2})
	if h, _ := cl.reply(); h.Status != errEPIPE || h.ActualLength != 0 {
		t.Errorf("stalled OUT: %+v", h)
	}
	d.mu.Lock()
	d.outErr = errors.New("card gone")
	d.mu.Unlock()
	cl.submit(2, dirOut, 3, 2, nil, []byte{1, 2})
	if h, _ := cl.reply(); h.Status != errEPROTO {
		t.Errorf("failed OUT: %+v", h)
	}
	// Endpoints the device lacks stall and the connection goes on.
	cl.submit(3, dirIn, 5, 64, nil, nil)
	cl.submit(4, dirOut, 2, 1, nil, []byte{9}) // 0x02 OUT does not exist
	for range 2 {
		if h, _ := cl.reply(); h.Status != errEPIPE {
			t.Errorf("unknown endpoint: %+v", h)
		}
	}
	cl.submit(5, dirIn, 0, 18, setupBytes(0x80, 6, 0x0100, 0, 18), nil)
	if h, _ := cl.reply(); h.Seqnum != 5 || h.Status != 0 {
		t.Errorf("after stalls: %+v", h)
	}
}

func TestMalformedPDU(t *testing.T) {
	hdr := func(h urbHeader) []byte { return h.append(nil) }
	for _, tc := range []struct {
		name string
		pdu  func(devid uint32) []byte
	}{
		{"unknown command", func(id uint32) []byte { return hdr(urbHeader{Command: 9, DevID: id}) }},
		{"RET_SUBMIT from client", func(id uint32) []byte { return hdr(urbHeader{Command: retSubmit, DevID: id}) }},
		{"wrong devid", func(id uint32) []byte {
			return hdr(urbHeader{Command: cmdSubmit, DevID: id + 1, Direction: dirIn, EP: 1, TransferBufferLength: 8})
		}},
		{"endpoint 16", func(id uint32) []byte { return hdr(urbHeader{Command: cmdSubmit, DevID: id, Direction: dirIn, EP: 16}) }},
		{"direction 2", func(id uint32) []byte { return hdr(urbHeader{Command: cmdSubmit, DevID: id, Direction: 2, EP: 1}) }},
		{"OUT of 4 GiB", func(id uint32) []byte {
			return hdr(urbHeader{Command: cmdSubmit, DevID: id, EP: 3, TransferBufferLength: 0xFFFFFFFF})
		}},
		{"OUT just over 1 MiB", func(id uint32) []byte {
			return hdr(urbHeader{Command: cmdSubmit, DevID: id, EP: 3, TransferBufferLength: maxTransfer + 1})
		}},
		{"truncated OUT data", func(id uint32) []byte {
			return append(hdr(urbHeader{Command: cmdSubmit, DevID: id, EP: 3, TransferBufferLength: 100}), 1, 2, 3)
		}},
		{"truncated header", func(id uint32) []byte { return hdr(urbHeader{Command: cmdSubmit, DevID: id})[:20] }},
		{"duplicate seqnum", func(id uint32) []byte {
			u := hdr(urbHeader{Command: cmdSubmit, Seqnum: 5, DevID: id, Direction: dirIn, EP: 1, TransferBufferLength: 8})
			return append(u, u...)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, cl, addr := imported(t)
			cl.submit(1, dirIn, 1, 8, nil, nil) // pending when the bad PDU comes
			cl.expectSilent(30 * time.Millisecond)
			cl.write(tc.pdu(cl.devid))
			if tc.name == "truncated OUT data" || tc.name == "truncated header" {
				cl.c.(interface{ CloseWrite() error }).CloseWrite()
			}
			cl.expectClosed()
			// Detached: pending In cancelled, device reset, importable again.
			waitFor(t, func() bool { r, c, _, _ := d.snapshot(); return r == 1 && c >= 1 })
			if st, _ := dial(t, addr).importDev("1-1"); st != stOK {
				t.Fatalf("re-import: %d", st)
			}
		})
	}
}

func TestQueueLimit(t *testing.T) {
	_, cl, _ := imported(t)
	var buf []byte
	for i := range maxQueued + 10 { // one is in service, not queued
		buf = urbHeader{Command: cmdSubmit, Seqnum: uint32(i + 1), DevID: cl.devid, Direction: dirIn, EP: 2, TransferBufferLength: 64}.append(buf)
	}
	cl.write(buf)
	cl.expectClosed()
}

func TestServeStops(t *testing.T) {
	s := NewServer(nil)
	d := newFakeDev()
	_ = s.Add("1-1", d)
	ln, err := netListen()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := contextWithCancel()
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	cl := dial(t, ln.Addr().String())
	if st, _ := cl.importDev("1-1"); st != stOK {
		t.Fatal(st)
	}
	cl.submit(1, dirIn, 1, 8, nil, nil)
	cl.expectSilent(30 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve after cancel: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
	cl.expectClosed()
	if r, c, _, _ := d.snapshot(); r != 1 || c != 1 {
		t.Errorf("after stop: resets %d, cancelled Ins %d; want 1, 1", r, c)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 5 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// failingListener accepts one connection, then fails when told to.
type failingListener struct {
	net.Listener
	calls int
	fail  chan struct{}
}

func (l *failingListener) Accept() (net.Conn, error) {
	l.calls++
	if l.calls == 1 {
		return l.Listener.Accept()
	}
	<-l.fail
	return nil, errors.New("listener broke")
}

func TestServeAcceptError(t *testing.T) {
	s := NewServer(nil)
	d := newFakeDev()
	_ = s.Add("1-1", d)
	inner, err := netListen()
	if err != nil {
		t.Fatal(err)
	}
	defer inner.Close()
	ln := &failingListener{Listener: inner, fail: make(chan struct{})}
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background(), ln) }()
	cl := dial(t, inner.Addr().String())
	if st, _ := cl.importDev("1-1"); st != stOK {
		t.Fatal(st)
	}
	close(ln.fail)
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "listener broke") {
			t.Fatalf("Serve: %v, want the accept error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after its listener failed while a device was imported")
	}
	cl.expectClosed()
	if r, _, _, _ := d.snapshot(); r != 1 {
		t.Errorf("device resets %d, want 1 (detached)", r)
	}
}
