package usbredir

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/vscard/vscard/usb"
)

// seedStream is a valid peer stream after the hello, in codec c: what
// QEMU sends while a guest enumerates and talks to the reader.
func seedStream(c codec) []byte {
	var b []byte
	b = c.appendPacket(b, typeControlPacket, 1, ctrlHdr(0x80, usb.ReqGetDescriptor, 0x0100, 0, 18), nil)
	b = c.appendPacket(b, typeSetConfiguration, 2, []byte{1}, nil)
	b = c.appendPacket(b, typeGetConfiguration, 3, nil, nil)
	b = c.appendPacket(b, typeSetAltSetting, 4, []byte{0, 0}, nil)
	b = c.appendPacket(b, typeGetAltSetting, 5, []byte{0}, nil)
	b = c.appendPacket(b, typeStartInterruptReceiving, 6, []byte{0x81}, nil)
	b = c.appendPacket(b, typeBulkPacket, 7, bulkHdr(c, 0x82, 65546), nil)
	b = c.appendPacket(b, typeBulkPacket, 8, bulkHdr(c, 0x03, 10), []byte{0x62, 0, 0, 0, 0, 0, 1, 0, 0, 0})
	b = c.appendPacket(b, typeCancelDataPacket, 7, nil, nil)
	b = c.appendPacket(b, typeControlPacket, 9, ctrlHdr(0x21, 0x7F, 0, 0, 2), []byte{1, 2})
	b = c.appendPacket(b, typeFilterFilter, 10, nil, []byte("-1,-1,-1,-1,1\x00"))
	b = c.appendPacket(b, typeReset, 11, nil, nil)
	b = c.appendPacket(b, typeStopInterruptReceiving, 12, []byte{0x81}, nil)
	b = c.appendPacket(b, typeAllocBulkStreams, 13, make([]byte, 8), nil)
	b = c.appendPacket(b, typeStartBulkReceiving, 14, make([]byte, 10), nil)
	b = c.appendPacket(b, typeDeviceDisconnectAck, 15, nil, nil)
	return b
}

// FuzzHeader decodes an arbitrary stream as packets from a peer under
// each framing: no panic, no allocation beyond the limits, and every
// packet accepted re-encodes to the bytes it came from.
func FuzzHeader(f *testing.F) {
	for _, c := range []caps{0, qemuCaps, cap64BitIDs, cap32BitBulkLength} {
		f.Add(uint32(c), seedStream(negotiate(c)))
	}
	f.Add(uint32(0), rawPacket(codec{}, typeBulkPacket, 1, 0xFFFFFFFF, nil))
	f.Add(uint32(qemuCaps), rawPacket(negotiate(qemuCaps), typeControlPacket, 1, 4, []byte{1, 2, 3, 4}))
	f.Fuzz(func(t *testing.T, peerCaps uint32, stream []byte) {
		c := negotiate(caps(peerCaps))
		br := bufio.NewReader(bytes.NewReader(stream))
		off := 0
		for {
			p, err := c.readPacket(br)
			var me *malformedError
			if err != nil && !errors.As(err, &me) {
				return
			}
			if err == nil {
				if len(p.data) > maxData {
					t.Fatalf("accepted %d data bytes", len(p.data))
				}
				if want := c.recvHeaderLen(p.typ); len(p.hdr) != want {
					t.Fatalf("type %d header %d bytes, want %d", p.typ, len(p.hdr), want)
				}
				enc := c.appendPacket(nil, p.typ, p.id, p.hdr, p.data)
				if len(stream) < off+len(enc) || !bytes.Equal(stream[off:off+len(enc)], enc) {
					t.Fatalf("type %d id %d does not re-encode to its input", p.typ, p.id)
				}
				q, err := c.readPacket(bufio.NewReader(bytes.NewReader(enc)))
				if err != nil || q.typ != p.typ || q.id != p.id || !bytes.Equal(q.hdr, p.hdr) || !bytes.Equal(q.data, p.data) {
					t.Fatalf("round trip of type %d: %v", p.typ, err)
				}
				off += len(enc)
			} else {
				off += c.headerLen() + int(binary.LittleEndian.Uint32(stream[off+4:]))
			}
		}
	})
}

// fuzzDev answers everything at once and never blocks except the
// interrupt endpoint, which waits for ctx like a reader with no slot
// change to report. Some bulk transfers (odd first byte or odd length)
// it refuses when offered with a done ctx, as a device that would have to
// wait does, so that both the reader's first try and the worker serve
// them (session.bulk).
type fuzzDev struct{ fakeDev }

func (d *fuzzDev) Out(ctx context.Context, ep uint8, data []byte) error {
	if ep != 0x03 {
		return usb.ErrStall
	}
	if ctx.Err() != nil && len(data) > 0 && data[0]&1 == 1 {
		return ctx.Err()
	}
	return nil
}

func (d *fuzzDev) In(ctx context.Context, ep uint8, max int) ([]byte, error) {
	switch ep {
	case 0x82:
		if ctx.Err() != nil && max&1 == 1 {
			return nil, ctx.Err()
		}
		return bytes.Repeat([]byte{0x80}, min(max, 10)), nil
	case 0x81:
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return nil, usb.ErrStall
}

// FuzzSession feeds an arbitrary peer stream after a valid hello: Serve
// must not panic, must not hang, and must return once the peer is gone.
func FuzzSession(f *testing.F) {
	for _, c := range []caps{0, qemuCaps, cap64BitIDs | cap32BitBulkLength} {
		f.Add(uint32(c), seedStream(negotiate(c)))
	}
	f.Add(uint32(qemuCaps), rawPacket(negotiate(qemuCaps), 12345, 1, 3, []byte{1, 2, 3}))
	f.Fuzz(func(t *testing.T, peerCaps uint32, stream []byte) {
		server, client := net.Pipe()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- Serve(ctx, server, &fuzzDev{}, nil) }()
		var out bytes.Buffer
		copied := make(chan struct{})
		go func() {
			// Bounded: a packet's worth of output per input packet at most.
			io.Copy(&out, io.LimitReader(client, 64<<20))
			close(copied)
		}()
		hello := codec{}.appendPacket(nil, typeHello, 0, make([]byte, 64), binary.LittleEndian.AppendUint32(nil, peerCaps))
		client.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if _, err := client.Write(append(hello, stream...)); err != nil && !errors.Is(err, io.ErrClosedPipe) {
			// Serve may close its end early on an unrecoverable stream.
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("Serve stopped reading")
			}
		}
		client.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("Serve did not return after the peer closed")
		}
		<-copied
		// Whatever the input, what Serve wrote is a well-formed stream.
		if err := checkHostStream(out.Bytes(), negotiate(caps(peerCaps))); err != nil {
			t.Fatal(err)
		}
	})
}

// checkHostStream checks a stream as a usb-guest's parser would read it
// from the usb-host: hello first in the 12-byte framing, then only types a
// host sends, each with its negotiated header size and the data direction
// rule (data only for IN endpoints, and then exactly the length field).
// A truncated last packet is allowed: the peer closed mid-write.
func checkHostStream(b []byte, c codec) error {
	first := true
	for len(b) > 0 {
		cc := c
		if first {
			cc = codec{}
		}
		hl := cc.headerLen()
		if len(b) < hl {
			return nil
		}
		typ := binary.LittleEndian.Uint32(b)
		n := int(binary.LittleEndian.Uint32(b[4:]))
		if len(b) < hl+n {
			return nil
		}
		body := b[hl : hl+n]
		b = b[hl+n:]
		if first != (typ == typeHello) {
			return fmt.Errorf("type %d where the hello must be first and only", typ)
		}
		first = false
		want := map[uint32]int{
			typeHello: 64, typeDeviceDisconnect: 0, typeInterfaceInfo: 132,
			typeConfigurationStatus: 2, typeAltSettingStatus: 3, typeIsoStreamStatus: 2,
			typeInterruptReceivingStatus: 2, typeBulkStreamsStatus: 9, typeBulkReceivingStatus: 6,
			typeControlPacket: 10, typeBulkPacket: c.bulkHeaderLen(), typeInterruptPacket: 4,
			typeDeviceConnect: 8, typeEPInfo: 96,
		}
		if c.both&capConnectDeviceVersion != 0 {
			want[typeDeviceConnect] = 10
		}
		if c.both&capEPInfoMaxPacketSize != 0 {
			want[typeEPInfo] = 160
		}
		th, ok := want[typ]
		if !ok {
			return fmt.Errorf("type %d is not one a usb-host sends", typ)
		}
		if len(body) < th || len(body) > th && !carriesData(typ) {
			return fmt.Errorf("type %d length %d, header %d", typ, len(body), th)
		}
		p := packet{typ: typ, hdr: body[:th], data: body[th:]}
		if ep, length, ok := c.endpointAndLength(p); ok {
			if ep&0x80 != 0 && len(p.data) != length {
				return fmt.Errorf("type %d IN ep %#x: %d data bytes for length %d", typ, ep, len(p.data), length)
			}
			if ep&0x80 == 0 && len(p.data) != 0 {
				return fmt.Errorf("type %d OUT ep %#x carries data", typ, ep)
			}
		}
	}
	return nil
}

// The stream checker FuzzSession relies on must itself reject bad streams.
func TestCheckHostStream(t *testing.T) {
	c := negotiate(qemuCaps)
	hello := codec{}.appendPacket(nil, typeHello, 0, make([]byte, 64), []byte{0x7E, 0, 0, 0})
	tests := []struct {
		name string
		b    []byte
		ok   bool
	}{
		{"hello only", hello, true},
		{"no hello", c.appendPacket(nil, typeDeviceDisconnect, 0, nil, nil), false},
		{"bulk IN with data", c.appendPacket(hello, typeBulkPacket, 1, bulkHdr(c, 0x82, 2), []byte{1, 2}), true},
		{"bulk IN data short", c.appendPacket(hello, typeBulkPacket, 1, bulkHdr(c, 0x82, 3), []byte{1, 2}), false},
		{"bulk OUT with data", c.appendPacket(hello, typeBulkPacket, 1, bulkHdr(c, 0x03, 2), []byte{1, 2}), false},
		{"guest-only type", c.appendPacket(hello, typeSetConfiguration, 1, []byte{1}, nil), false},
		{"ep_info short", c.appendPacket(hello, typeEPInfo, 0, make([]byte, 96), nil), false},
		{"second hello", c.appendPacket(hello, typeHello, 0, make([]byte, 64), nil), false},
	}
	for _, tt := range tests {
		if err := checkHostStream(tt.b, c); (err == nil) != tt.ok {
			t.Errorf("%s: err %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
}
