package usbip

import (
	"bytes"
	"context"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// FuzzPDU checks the decoders: no panic on any input, and what decodes
// re-encodes to the same bytes (padding aside).
func FuzzPDU(f *testing.F) {
	f.Add(urbHeader{Command: cmdSubmit, Seqnum: 1, DevID: 0x10002, Direction: dirIn, EP: 2, TransferBufferLength: 512}.append(nil))
	f.Add(urbHeader{Command: retSubmit, Seqnum: 1, Status: errEPIPE, ActualLength: 3}.append(nil))
	f.Add(urbHeader{Command: cmdUnlink, Seqnum: 2, UnlinkSeqnum: 1}.append(nil))
	f.Add(urbHeader{Command: retUnlink, Seqnum: 2, Status: errECONNRESET}.append(nil))
	f.Add(opHeader{Version: version, Code: opReqImport}.append(nil))
	f.Add(deviceRecord{Path: "/sys/x", BusID: "1-1", BusNum: 1, DevNum: 2, Speed: 2}.append(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) >= opHeaderLen {
			h, err := parseOpHeader(b[:opHeaderLen])
			if err != nil {
				t.Fatal(err)
			}
			if got := h.append(nil); !bytes.Equal(got, b[:opHeaderLen]) {
				t.Fatalf("op header round trip % x -> % x", b[:opHeaderLen], got)
			}
		} else if _, err := parseOpHeader(b); err == nil {
			t.Fatal("short op header accepted")
		}

		h, err := parseURBHeader(b)
		known := len(b) == urbHeaderLen && be32(b, 0) >= cmdSubmit && be32(b, 0) <= retUnlink
		if (err == nil) != known {
			t.Fatalf("parseURBHeader(% x): err %v, want ok=%v", b, err, known)
		}
		if err == nil {
			got := h.append(nil)
			// The bytes a command uses must survive; padding is zeroed.
			used := map[uint32]int{cmdSubmit: 48, retSubmit: 40, cmdUnlink: 24, retUnlink: 24}[h.Command]
			if !bytes.Equal(got[:used], b[:used]) {
				t.Fatalf("URB header round trip\n% x\n% x", b[:used], got[:used])
			}
			if h2, err := parseURBHeader(got); err != nil || h2 != h {
				t.Fatalf("re-decode: %+v %v, want %+v", h2, err, h)
			}
		}

		if d, err := parseDeviceRecord(b); err == nil {
			got := d.append(nil)
			if len(got) != deviceLen {
				t.Fatalf("record encodes to %d bytes", len(got))
			}
			d2, err := parseDeviceRecord(got)
			// An unterminated field loses its last byte: the encoder always
			// keeps the NUL the C tool relies on.
			d.Path = d.Path[:min(len(d.Path), pathLen-1)]
			d.BusID = d.BusID[:min(len(d.BusID), busIDLen-1)]
			if err != nil || d2 != d {
				t.Fatalf("record round trip %+v -> %+v (%v)", d, d2, err)
			}
		}
	})
}

// importPrefix is a valid OP_REQ_IMPORT of "1-1", which FuzzServe puts in
// front of inputs whose first byte is odd so that most inputs reach the
// URB phase.
func importPrefix() []byte {
	return appendFixed(opHeader{Version: version, Code: opReqImport}.append(nil), "1-1", busIDLen)
}

// FuzzServe feeds an arbitrary client byte stream to a connection and
// checks that the server neither panics nor hangs, and detaches cleanly.
func FuzzServe(f *testing.F) {
	const devid = 1<<16 | 2
	sub := func(seq, dir, ep, n uint32, setup []byte, data []byte) []byte {
		h := urbHeader{Command: cmdSubmit, Seqnum: seq, DevID: devid, Direction: dir, EP: ep, TransferBufferLength: n}
		copy(h.Setup[:], setup)
		return append(h.append(nil), data...)
	}
	var urbs []byte
	urbs = append(urbs, sub(1, dirIn, 0, 18, setupBytes(0x80, 6, 0x0100, 0, 18), nil)...)
	urbs = append(urbs, sub(2, dirIn, 1, 8, nil, nil)...)
	urbs = append(urbs, sub(3, dirIn, 2, 64, nil, nil)...)
	urbs = append(urbs, sub(4, dirOut, 3, 4, nil, []byte{0x62, 0, 0, 0})...)
	urbs = append(urbs, urbHeader{Command: cmdUnlink, Seqnum: 5, DevID: devid, UnlinkSeqnum: 2}.append(nil)...)
	urbs = append(urbs, urbHeader{Command: cmdUnlink, Seqnum: 6, DevID: devid, UnlinkSeqnum: 4}.append(nil)...)
	f.Add(append([]byte{1}, urbs...))
	f.Add(append(append([]byte{0}, importPrefix()...), urbs...))
	f.Add(append([]byte{0}, opHeader{Version: version, Code: opReqDevlist}.append(nil)...))
	f.Add([]byte{1})
	f.Add(append([]byte{1}, sub(1, dirOut, 3, 0xFFFFFFF0, nil, nil)...))

	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) == 0 {
			return
		}
		stream := in[1:]
		if in[0]&1 == 1 {
			stream = append(importPrefix(), stream...)
		}
		s := NewServer(nil)
		d := newFakeDev()
		d.echo = true
		d.feed(0x82, bytes.Repeat([]byte{0xAB}, 100))
		if err := s.Add("1-1", d); err != nil {
			t.Fatal(err)
		}
		cli, srv := net.Pipe()
		rec := &recConn{Conn: srv}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		done := make(chan struct{})
		go func() { s.serveConn(ctx, rec); close(done) }()
		drained := make(chan struct{})
		go func() { io.Copy(io.Discard, cli); close(drained) }()
		_, _ = cli.Write(stream) // fails early if the server closed
		cli.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("server did not finish after the client closed")
		}
		<-drained
		s.mu.Lock()
		busy := s.devs[0].inUse
		s.mu.Unlock()
		if busy {
			t.Fatal("device still imported after the connection ended")
		}
		checkWrites(t, rec.writes)
	})
}

// recConn records each Write: the server promises one write per PDU.
type recConn struct {
	net.Conn
	mu     sync.Mutex
	writes [][]byte
}

func (c *recConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	c.writes = append(c.writes, append([]byte(nil), b...))
	c.mu.Unlock()
	return c.Conn.Write(b)
}

// checkWrites checks what the server wrote: after a successful import,
// whole RET_SUBMIT / RET_UNLINK PDUs only, each in one write, with the
// fields vhci-hcd relies on.
func checkWrites(t *testing.T, writes [][]byte) {
	if len(writes) == 0 {
		return
	}
	first := writes[0]
	if len(first) < opHeaderLen || be16(first, 0) != version {
		t.Fatalf("first write % x is no operation reply", first)
	}
	if be16(first, 2) != opRepImport || be32(first, 4) != stOK {
		if len(writes) > 1 {
			t.Fatalf("%d writes after a reply that ends the connection", len(writes)-1)
		}
		return
	}
	if len(first) != opHeaderLen+deviceLen {
		t.Fatalf("import reply of %d bytes", len(first))
	}
	for _, w := range writes[1:] {
		if len(w) < urbHeaderLen {
			t.Fatalf("write of %d bytes: not a whole PDU", len(w))
		}
		h, err := parseURBHeader(w[:urbHeaderLen])
		if err != nil {
			t.Fatal(err)
		}
		if h.DevID != 0 || h.Direction != 0 || h.EP != 0 {
			t.Fatalf("reply with devid/direction/ep %d/%d/%d", h.DevID, h.Direction, h.EP)
		}
		switch h.Command {
		case retSubmit:
			if n := len(w) - urbHeaderLen; n != 0 && n != int(h.ActualLength) {
				t.Fatalf("RET_SUBMIT with %d data bytes, actual_length %d", n, h.ActualLength)
			}
			if h.ActualLength > maxTransfer {
				t.Fatalf("actual_length %d", h.ActualLength)
			}
			if h.Status != 0 && (h.Status != errEPIPE && h.Status != errEPROTO || h.ActualLength != 0) {
				t.Fatalf("RET_SUBMIT status %d actual_length %d", h.Status, h.ActualLength)
			}
		case retUnlink:
			if len(w) != urbHeaderLen || (h.Status != 0 && h.Status != errECONNRESET) {
				t.Fatalf("RET_UNLINK of %d bytes, status %d", len(w), h.Status)
			}
		default:
			t.Fatalf("server wrote command %d", h.Command)
		}
	}
}
