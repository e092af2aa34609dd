package vscard

import (
	"errors"
	"testing"
)

// okAck is QEMU's acknowledgement of ReaderAdd, ReaderRemove, ATR and
// CardRemove (protocols.md §1.5).
var okAck = msg(MsgError, 0, ErrorPayload(CodeOK))

// TestClientStartsWithoutReader: with NoReader the host only gets the
// stale-reader ReaderRemove; AddReader then adds the reader and, once
// acknowledged, inserts the held card.
func TestClientStartsWithoutReader(t *testing.T) {
	cd := &fakeCard{}
	r := startClient(t, cd, &ClientOptions{NoReader: true, ReaderName: "Virtual PCD 00 00"})
	expectMsg(t, r.conn, MsgInit, 0, InitPayload(0))
	r.conn.Write(msg(MsgInit, UndefinedReaderID, InitPayload(0)))
	expectMsg(t, r.conn, MsgReaderRemove, 0, nil)
	r.conn.Write(okAck)
	if st := r.cl.Status(); st.Reader || !st.CardInserted {
		t.Fatalf("status %+v: want no reader, a card held", st)
	}
	// Without a reader an APDU has no card to go to.
	r.conn.Write(msg(MsgAPDU, 0, mustHex("00a4040000")))
	expectMsg(t, r.conn, MsgError, 0, ErrorPayload(CodeGeneralError))

	if err := r.cl.AddReader(); err != nil {
		t.Fatal(err)
	}
	if err := r.cl.AddReader(); !errors.Is(err, ErrReaderPresent) {
		t.Errorf("second AddReader: %v, want ErrReaderPresent", err)
	}
	expectMsg(t, r.conn, MsgReaderAdd, 0, []byte("Virtual PCD 00 00"))
	r.conn.Write(okAck)
	expectMsg(t, r.conn, MsgATR, 0, cacATR)
	r.conn.Write(okAck)
	r.conn.Write(msg(MsgAPDU, 0, mustHex("00a4040000")))
	expectMsg(t, r.conn, MsgAPDU, 0, []byte{0x90, 0x00})
	if st := r.cl.Status(); !st.Reader || !st.Connected {
		t.Errorf("status %+v: want reader present and connected", st)
	}
}

// TestClientRemoveReader: RemoveReader takes the card out first, keeps it
// held, and AddReader puts both back.
func TestClientRemoveReader(t *testing.T) {
	cd := &fakeCard{}
	r := startClient(t, cd, nil)
	handshake(t, r.conn, true, cacATR)

	if err := r.cl.RemoveReader(); err != nil {
		t.Fatal(err)
	}
	if err := r.cl.RemoveReader(); !errors.Is(err, ErrNoReader) {
		t.Errorf("second RemoveReader: %v, want ErrNoReader", err)
	}
	expectMsg(t, r.conn, MsgCardRemove, 0, nil)
	expectMsg(t, r.conn, MsgReaderRemove, 0, nil)
	r.conn.Write(okAck)
	r.conn.Write(okAck)
	if st := r.cl.Status(); st.Reader || !st.CardInserted {
		t.Errorf("status %+v: want no reader and the card still held", st)
	}

	// A card removed and inserted while the reader is away goes out with
	// the reader.
	if err := r.cl.Remove(); err != nil {
		t.Fatal(err)
	}
	if err := r.cl.Insert(nil); err != nil {
		t.Fatal(err)
	}
	if err := r.cl.AddReader(); err != nil {
		t.Fatal(err)
	}
	expectMsg(t, r.conn, MsgReaderAdd, 0, nil)
	r.conn.Write(okAck)
	expectMsg(t, r.conn, MsgATR, 0, cacATR)
	r.conn.Write(okAck)
	r.conn.Write(msg(MsgAPDU, 0, mustHex("00a4040000")))
	expectMsg(t, r.conn, MsgAPDU, 0, []byte{0x90, 0x00})
}

// TestClientReaderFlapping: remove and add again before the host answered
// anything: one ATR only, after the last ReaderAdd's ack.
func TestClientReaderFlapping(t *testing.T) {
	cd := &fakeCard{}
	r := startClient(t, cd, nil)
	expectMsg(t, r.conn, MsgInit, 0, InitPayload(0))
	r.conn.Write(msg(MsgInit, UndefinedReaderID, InitPayload(0)))
	expectMsg(t, r.conn, MsgReaderRemove, 0, nil)
	expectMsg(t, r.conn, MsgReaderAdd, 0, nil)
	if err := r.cl.RemoveReader(); err != nil {
		t.Fatal(err)
	}
	if err := r.cl.AddReader(); err != nil {
		t.Fatal(err)
	}
	expectMsg(t, r.conn, MsgReaderRemove, 0, nil)
	expectMsg(t, r.conn, MsgReaderAdd, 0, nil)
	for range 4 {
		r.conn.Write(okAck)
	}
	expectMsg(t, r.conn, MsgATR, 0, cacATR)
	r.conn.Write(okAck)
	// The next message is the answer to this APDU, not a second ATR.
	r.conn.Write(msg(MsgAPDU, 0, mustHex("00a4040000")))
	expectMsg(t, r.conn, MsgAPDU, 0, []byte{0x90, 0x00})
}

// TestClientNoReaderAcrossReconnect: the reader state survives a dropped
// connection, and while it is absent the new connection adds no reader.
func TestClientNoReaderAcrossReconnect(t *testing.T) {
	cd := &fakeCard{}
	r := startClient(t, cd, nil)
	handshake(t, r.conn, true, cacATR)
	if err := r.cl.RemoveReader(); err != nil {
		t.Fatal(err)
	}
	expectMsg(t, r.conn, MsgCardRemove, 0, nil)
	expectMsg(t, r.conn, MsgReaderRemove, 0, nil)
	r.conn.Close()
	c2 := accept(t, r.ln)
	expectMsg(t, c2, MsgInit, 0, InitPayload(0))
	c2.Write(msg(MsgInit, UndefinedReaderID, InitPayload(0)))
	expectMsg(t, c2, MsgReaderRemove, 0, nil)
	c2.Write(okAck)
	if err := r.cl.AddReader(); err != nil {
		t.Fatal(err)
	}
	expectMsg(t, c2, MsgReaderAdd, 0, nil)
	c2.Write(okAck)
	expectMsg(t, c2, MsgATR, 0, cacATR)
}

// TestClientShutdownWithoutReader: quitting with no reader still clears
// the host's reader and exits cleanly.
func TestClientShutdownWithoutReader(t *testing.T) {
	r := startClient(t, nil, &ClientOptions{NoReader: true})
	expectMsg(t, r.conn, MsgInit, 0, InitPayload(0))
	r.conn.Write(msg(MsgInit, UndefinedReaderID, InitPayload(0)))
	expectMsg(t, r.conn, MsgReaderRemove, 0, nil)
	r.conn.Write(okAck)
	r.cancel()
	expectMsg(t, r.conn, MsgReaderRemove, 0, nil)
	r.conn.Write(okAck)
	expectEOF(t, r.conn)
	waitRun(t, r.done)
}
