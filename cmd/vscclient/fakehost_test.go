package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"
)

// A fakeHost plays QEMU 7.2's ccid-card-passthru on one connection, written
// from the wire format in protocols.md §1 independently of package vscard,
// so a shared misunderstanding cannot hide in both ends. It acknowledges
// ReaderRemove, ReaderAdd, ATR and CardRemove with Error(0) as QEMU does
// (protocols.md §1.5) and hands every message it got to the test.
type fakeHost struct {
	t    *testing.T
	conn net.Conn
	msgs chan hostMsg
}

type hostMsg struct {
	typ, reader uint32
	payload     []byte
	err         error // read error (io.EOF when the client closed)
}

const (
	tInit         = 1
	tError        = 2
	tReaderAdd    = 3
	tReaderRemove = 4
	tATR          = 5
	tCardRemove   = 6
	tAPDU         = 7
)

func writeVSC(w io.Writer, typ, reader uint32, payload []byte) error {
	b := binary.BigEndian.AppendUint32(nil, typ)
	b = binary.BigEndian.AppendUint32(b, reader)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	_, err := w.Write(append(b, payload...))
	return err
}

func readVSC(r io.Reader) (hostMsg, error) {
	var h [12]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return hostMsg{}, err
	}
	n := binary.BigEndian.Uint32(h[8:])
	if n > 65536 {
		return hostMsg{}, fmt.Errorf("payload length %d", n)
	}
	m := hostMsg{typ: binary.BigEndian.Uint32(h[:]), reader: binary.BigEndian.Uint32(h[4:]), payload: make([]byte, n)}
	_, err := io.ReadFull(r, m.payload)
	return m, err
}

var initPayload = []byte{'V', 'S', 'C', 'D', 0, 0, 0, 2, 0, 0, 0, 0}

// acceptHost accepts one connection on ln and serves it as QEMU would.
func acceptHost(t *testing.T, ln net.Listener) *fakeHost {
	t.Helper()
	if dl, ok := ln.(interface{ SetDeadline(time.Time) error }); ok {
		dl.SetDeadline(time.Now().Add(20 * time.Second))
	}
	c, err := ln.Accept()
	if err != nil {
		t.Fatalf("fake host: accept: %v", err)
	}
	return serveHost(t, c)
}

func serveHost(t *testing.T, c net.Conn) *fakeHost {
	h := &fakeHost{t: t, conn: c, msgs: make(chan hostMsg, 64)}
	t.Cleanup(func() { c.Close() })
	go func() {
		for {
			m, err := readVSC(c)
			if err != nil {
				h.msgs <- hostMsg{err: err}
				close(h.msgs)
				return
			}
			switch m.typ {
			case tInit:
				writeVSC(c, tInit, 0xFFFFFFFF, initPayload)
			case tReaderAdd:
				writeVSC(c, tError, 0, []byte{0, 0, 0, 0})
			case tReaderRemove, tATR, tCardRemove:
				writeVSC(c, tError, m.reader, []byte{0, 0, 0, 0})
			}
			h.msgs <- m
		}
	}()
	return h
}

// next returns the next message from the client.
func (h *fakeHost) next() hostMsg {
	h.t.Helper()
	select {
	case m, ok := <-h.msgs:
		if !ok {
			h.t.Fatal("fake host: connection already closed")
		}
		return m
	case <-time.After(20 * time.Second):
		h.t.Fatal("fake host: no message from the client within 20 s")
	}
	return hostMsg{}
}

// expect reads the next message and checks its type.
func (h *fakeHost) expect(typ uint32) hostMsg {
	h.t.Helper()
	m := h.next()
	if m.err != nil {
		h.t.Fatalf("fake host: want message type %d, got read error %v", typ, m.err)
	}
	if m.typ != typ {
		h.t.Fatalf("fake host: got message type %d (payload % x), want %d", m.typ, m.payload, typ)
	}
	return m
}

// handshake checks the client's opening sequence (protocols.md §2.3):
// Init, ReaderRemove, ReaderAdd with the reader name, ATR. It returns the
// ATR.
func (h *fakeHost) handshake(readerName string) []byte {
	h.t.Helper()
	m := h.expect(tInit)
	if !bytes.Equal(m.payload[:8], initPayload[:8]) || len(m.payload) < 12 {
		h.t.Fatalf("Init payload % x", m.payload)
	}
	h.expect(tReaderRemove)
	m = h.expect(tReaderAdd)
	if string(m.payload) != readerName {
		h.t.Errorf("ReaderAdd name %q, want %q", m.payload, readerName)
	}
	return h.expect(tATR).payload
}

// apdu sends a command APDU and returns the response.
func (h *fakeHost) apdu(cmd []byte) []byte {
	h.t.Helper()
	if err := writeVSC(h.conn, tAPDU, 0, cmd); err != nil {
		h.t.Fatal(err)
	}
	return h.expect(tAPDU).payload
}

// expectClose checks that the client closed the connection.
func (h *fakeHost) expectClose() {
	h.t.Helper()
	m := h.next()
	if m.err == nil {
		h.t.Fatalf("fake host: got message type %d, want the connection closed", m.typ)
	}
}

// selectACA is the SELECT of the CAC ACA applet, answered 61 0D by a
// libcacard card (peers.md §1.4).
var selectACA = []byte{0x00, 0xa4, 0x04, 0x00, 0x07, 0xa0, 0x00, 0x00, 0x00, 0x79, 0x03, 0x00}
