package ccid

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vscard/vscard/usb"
)

var update = flag.Bool("update", false, "rewrite golden files")

func getDesc(t *testing.T, r *Reader, value, length uint16) []byte {
	t.Helper()
	b, err := r.Control(context.Background(), usb.Setup{RequestType: 0x80, Request: usb.ReqGetDescriptor, Value: value, Length: length}, nil)
	if err != nil {
		t.Fatalf("GET_DESCRIPTOR %04X: %v", value, err)
	}
	return b
}

// TestDescriptorsGolden pins the descriptor bytes libccid parses
// (protocols.md §4.1); -update rewrites testdata/descriptors.golden.
func TestDescriptorsGolden(t *testing.T) {
	var out strings.Builder
	for _, slots := range []int{1, 2} {
		r := New(&Options{Slots: slots, Serial: "VS0001"})
		fmt.Fprintf(&out, "slots %d device %X\n", slots, getDesc(t, r, 0x0100, 255))
		fmt.Fprintf(&out, "slots %d config %X\n", slots, getDesc(t, r, 0x0200, 0xFFFF))
		for i := range uint16(4) {
			fmt.Fprintf(&out, "slots %d string%d %X\n", slots, i, getDesc(t, r, 0x0300|i, 255))
		}
	}
	path := filepath.Join("testdata", "descriptors.golden")
	if *update {
		if err := os.WriteFile(path, []byte(out.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if out.String() != string(want) {
		t.Errorf("descriptors differ from %s:\n%s\nwant:\n%s", path, out.String(), want)
	}
}

// TestDescriptorShape checks the fields libccid relies on independently of
// the golden bytes.
func TestDescriptorShape(t *testing.T) {
	r := New(&Options{Slots: 3, VendorID: 0x1234, ProductID: 0x5678})
	dev := getDesc(t, r, 0x0100, 18)
	if len(dev) != 18 || dev[7] != 64 || binary.LittleEndian.Uint16(dev[8:]) != 0x1234 || binary.LittleEndian.Uint16(dev[10:]) != 0x5678 || dev[16] != 0 {
		t.Errorf("device descriptor % X", dev)
	}
	cfg := getDesc(t, r, 0x0200, 0xFFFF)
	if int(binary.LittleEndian.Uint16(cfg[2:])) != len(cfg) || len(cfg) != 9+9+54+3*7 {
		t.Fatalf("wTotalLength %d, len %d", binary.LittleEndian.Uint16(cfg[2:]), len(cfg))
	}
	if cfg[9+5] != 0x0B || cfg[9+4] != 3 {
		t.Errorf("interface % X", cfg[9:18])
	}
	cd := cfg[18 : 18+54]
	le := binary.LittleEndian
	if cd[0] != 54 || cd[1] != 0x21 || cd[4] != 2 || le.Uint32(cd[6:]) != 3 || cd[52] != 0 || cd[53] != 1 {
		t.Errorf("class descriptor % X", cd)
	}
	if f := le.Uint32(cd[40:]); f&0x70000 != 0x40000 || f&0x40 == 0 || f&0x0C == 0 {
		t.Errorf("dwFeatures %08X: want extended APDU level, automatic negotiation and activation", f)
	}
	if m := le.Uint32(cd[44:]); m < 10+4+3+65535+2 {
		t.Errorf("dwMaxCCIDMessageLength %d cannot carry an extended APDU", m)
	}
	// Class requests agree with bNumClockSupported/bNumDataRatesSupported
	// = 0: the default values are the only ones.
	for _, tc := range []struct {
		req  uint8
		want uint32
		off  int
	}{{reqGetClockFrequencies, le.Uint32(cd[10:]), 10}, {reqGetDataRates, le.Uint32(cd[19:]), 19}} {
		b, err := r.Control(context.Background(), usb.Setup{RequestType: 0xA1, Request: tc.req, Length: 256}, nil)
		if err != nil || len(b) != 4 || le.Uint32(b) != tc.want || le.Uint32(cd[tc.off+4:]) != tc.want {
			t.Errorf("class request %d = % X, %v; want %d (default = maximum)", tc.req, b, err, tc.want)
		}
	}
	info := r.Info()
	if info.Speed != usb.SpeedFull || len(info.Endpoints) != 3 || info.Interfaces[0].Class != 0x0B {
		t.Errorf("Info %+v", info)
	}
	// Endpoints in the configuration match Info.
	for i, e := range info.Endpoints {
		d := cfg[18+54+7*i:]
		if d[2] != e.Address || d[3] != byte(e.Type) || le.Uint16(d[4:]) != e.MaxPacketSize || d[6] != e.Interval {
			t.Errorf("endpoint %d descriptor % X, Info %+v", i, d[:7], e)
		}
	}
}

func TestControl(t *testing.T) {
	r := New(&Options{Product: "Prod"})
	ctx := context.Background()
	tests := []struct {
		name  string
		setup usb.Setup
		want  []byte // nil: stall
	}{
		{"config header", usb.Setup{RequestType: 0x80, Request: 6, Value: 0x0200, Length: 9}, r.config[:9]},
		{"device short", usb.Setup{RequestType: 0x80, Request: 6, Value: 0x0100, Length: 8}, r.deviceDescriptor()[:8]},
		{"langid", usb.Setup{RequestType: 0x80, Request: 6, Value: 0x0300, Length: 255}, []byte{4, 3, 9, 4}},
		{"product", usb.Setup{RequestType: 0x80, Request: 6, Value: 0x0302, Length: 255}, []byte{10, 3, 'P', 0, 'r', 0, 'o', 0, 'd', 0}},
		{"no serial", usb.Setup{RequestType: 0x80, Request: 6, Value: 0x0303, Length: 255}, nil},
		{"string 9", usb.Setup{RequestType: 0x80, Request: 6, Value: 0x0309, Length: 255}, nil},
		{"qualifier", usb.Setup{RequestType: 0x80, Request: 6, Value: 0x0600, Length: 10}, nil},
		{"bos", usb.Setup{RequestType: 0x80, Request: 6, Value: 0x0F00, Length: 5}, nil},
		{"config 1", usb.Setup{RequestType: 0x80, Request: 6, Value: 0x0201, Length: 9}, nil},
		{"set config 1", usb.Setup{RequestType: 0x00, Request: 9, Value: 1}, []byte{}},
		{"get config", usb.Setup{RequestType: 0x80, Request: 8, Length: 1}, []byte{1}},
		{"set config 2", usb.Setup{RequestType: 0x00, Request: 9, Value: 2}, nil},
		{"set interface", usb.Setup{RequestType: 0x01, Request: 11}, []byte{}},
		{"set alt 1", usb.Setup{RequestType: 0x01, Request: 11, Value: 1}, nil},
		{"get interface", usb.Setup{RequestType: 0x81, Request: 10, Length: 1}, []byte{0}},
		{"get interface 1", usb.Setup{RequestType: 0x81, Request: 10, Index: 1, Length: 1}, nil},
		{"status device", usb.Setup{RequestType: 0x80, Request: 0, Length: 2}, []byte{0, 0}},
		{"status interface", usb.Setup{RequestType: 0x81, Request: 0, Length: 2}, []byte{0, 0}},
		{"halt bulk in", usb.Setup{RequestType: 0x02, Request: 3, Index: 0x82}, []byte{}},
		{"status halted", usb.Setup{RequestType: 0x82, Request: 0, Index: 0x82, Length: 2}, []byte{1, 0}},
		{"clear halt", usb.Setup{RequestType: 0x02, Request: 1, Index: 0x82}, []byte{}},
		{"status cleared", usb.Setup{RequestType: 0x82, Request: 0, Index: 0x82, Length: 2}, []byte{0, 0}},
		{"clear halt bad ep", usb.Setup{RequestType: 0x02, Request: 1, Index: 0x05}, nil},
		{"status bad ep", usb.Setup{RequestType: 0x82, Request: 0, Index: 0x84, Length: 2}, nil},
		{"abort", usb.Setup{RequestType: 0x21, Request: 1, Value: 0x0700}, []byte{}},
		{"abort bad slot", usb.Setup{RequestType: 0x21, Request: 1, Value: 0x0701}, nil},
		{"clock truncated", usb.Setup{RequestType: 0xA1, Request: 2, Length: 2}, []byte{0xA0, 0x0F}},
		{"class to interface 1", usb.Setup{RequestType: 0xA1, Request: 3, Index: 1, Length: 4}, nil},
		{"vendor", usb.Setup{RequestType: 0xC0, Request: 1, Length: 4}, nil},
		{"class unknown", usb.Setup{RequestType: 0xA1, Request: 9, Length: 4}, nil},
	}
	for _, tc := range tests {
		got, err := r.Control(ctx, tc.setup, nil)
		if tc.want == nil {
			if !errors.Is(err, usb.ErrStall) {
				t.Errorf("%s: got % X, %v; want stall", tc.name, got, err)
			}
			continue
		}
		if err != nil || !bytes.Equal(got, tc.want) {
			t.Errorf("%s: got % X, %v; want % X", tc.name, got, err, tc.want)
		}
	}
}

// TestCommands runs every PC_to_RDR command against each slot state.
func TestCommands(t *testing.T) {
	const (
		absent = iota
		inserted
		powered
	)
	t1 := paramsFromATR(atrT1)
	tests := []struct {
		name   string
		state  int
		atr    []byte
		typ    byte
		slot   byte
		b7     byte
		data   []byte
		rtyp   byte
		status byte
		bErr   byte
		b9     byte
		rdata  []byte
	}{
		{"status absent", absent, nil, cmdGetSlotStatus, 0, 0, nil, rspSlotStatus, 2, 0, 0, nil},
		{"status inserted", inserted, atrT0, cmdGetSlotStatus, 0, 0, nil, rspSlotStatus, 1, 0, 0, nil},
		{"status powered", powered, atrT0, cmdGetSlotStatus, 0, 0, nil, rspSlotStatus, 0, 0, 0, nil},
		{"status bad length", powered, atrT0, cmdGetSlotStatus, 0, 0, []byte{1}, rspSlotStatus, 0x40, 1, 0, nil},
		{"status bad slot", powered, atrT0, cmdGetSlotStatus, 1, 0, nil, rspSlotStatus, 0x42, 5, 0, nil},
		{"power on absent", absent, nil, cmdIccPowerOn, 0, 0, nil, rspDataBlock, 0x42, 0xFE, 0, nil},
		{"power on", inserted, atrT0, cmdIccPowerOn, 0, 0, nil, rspDataBlock, 0, 0, 0, atrT0},
		{"power on 1.8V", inserted, atrT1, cmdIccPowerOn, 0, 3, nil, rspDataBlock, 0, 0, 0, atrT1},
		{"warm reset", powered, atrT0, cmdIccPowerOn, 0, 0, nil, rspDataBlock, 0, 0, 0, atrT0},
		{"power on bad select", inserted, atrT0, cmdIccPowerOn, 0, 4, nil, rspDataBlock, 0x41, 7, 0, nil},
		{"power on bad slot", inserted, atrT0, cmdIccPowerOn, 9, 0, nil, rspDataBlock, 0x42, 5, 0, nil},
		{"power on long ATR", inserted, make([]byte, 34), cmdIccPowerOn, 0, 0, nil, rspDataBlock, 0x41, 0xFB, 0, nil},
		{"power off", powered, atrT0, cmdIccPowerOff, 0, 0, nil, rspSlotStatus, 1, 0, 0, nil},
		{"power off inactive", inserted, atrT0, cmdIccPowerOff, 0, 0, nil, rspSlotStatus, 1, 0, 0, nil},
		{"power off absent", absent, nil, cmdIccPowerOff, 0, 0, nil, rspSlotStatus, 2, 0, 0, nil},
		{"xfr", powered, atrT0, cmdXfrBlock, 0, 0, []byte{0, 0xCA, 0, 0, 0}, rspDataBlock, 0, 0, 0, []byte{0, 0xCA, 0, 0, 0, 0x90, 0}},
		{"xfr inactive", inserted, atrT0, cmdXfrBlock, 0, 0, []byte{0, 0xCA, 0, 0, 0}, rspDataBlock, 0x41, 0xFE, 0, nil},
		{"xfr absent", absent, nil, cmdXfrBlock, 0, 0, []byte{0, 0xCA, 0, 0, 0}, rspDataBlock, 0x42, 0xFE, 0, nil},
		{"xfr empty", powered, atrT0, cmdXfrBlock, 0, 0, nil, rspDataBlock, 0x40, 1, 0, nil},
		{"get params T=0", powered, atrT0, cmdGetParameters, 0, 0, nil, rspParameters, 0, 0, 0, []byte{0x11, 0, 0, 10, 0}},
		{"get params T=1", inserted, atrT1, cmdGetParameters, 0, 0, nil, rspParameters, 1, 0, 1, t1.data},
		{"get params absent", absent, nil, cmdGetParameters, 0, 0, nil, rspParameters, 0x42, 0xFE, 0, nil},
		{"reset params", powered, atrT1, cmdResetParameters, 0, 0, nil, rspParameters, 0, 0, 1, t1.data},
		{"set params T=0", powered, atrT0, cmdSetParameters, 0, 0, []byte{0x11, 0, 2, 10, 0}, rspParameters, 0, 0, 0, []byte{0x11, 0, 2, 10, 0}},
		{"set params T=1", powered, atrT0, cmdSetParameters, 0, 1, []byte{0x11, 0x10, 0, 0x4D, 0, 0x20, 0}, rspParameters, 0, 0, 1, []byte{0x11, 0x10, 0, 0x4D, 0, 0x20, 0}},
		{"set params T=1 short", powered, atrT0, cmdSetParameters, 0, 1, []byte{0x11, 0, 0, 10, 0}, rspParameters, 0x40, 1, 0, nil},
		{"set params T=2", powered, atrT0, cmdSetParameters, 0, 2, []byte{0x11, 0, 0, 10, 0}, rspParameters, 0x40, 7, 0, nil},
		{"set params bad TCCKS", powered, atrT0, cmdSetParameters, 0, 0, []byte{0x11, 0x10, 0, 10, 0}, rspParameters, 0x40, 11, 0, nil},
		{"set params bad IFSC", powered, atrT0, cmdSetParameters, 0, 1, []byte{0x11, 0x10, 0, 0x4D, 0, 0, 0}, rspParameters, 0x40, 15, 0, nil},
		{"escape", powered, atrT0, cmdEscape, 0, 0, []byte{0x6A}, rspEscape, 0x40, 0, 0, nil},
		{"secure", powered, atrT0, cmdSecure, 0, 0, []byte{0, 0, 0}, rspDataBlock, 0x40, 0, 0, nil},
		{"t0apdu", powered, atrT0, cmdT0APDU, 0, 0, nil, rspSlotStatus, 0x40, 0, 0, nil},
		{"mechanical", powered, atrT0, cmdMechanical, 0, 0, nil, rspSlotStatus, 0x40, 0, 0, nil},
		{"clock stop", powered, atrT0, cmdIccClock, 0, 1, nil, rspSlotStatus, 0, 0, 3, nil},
		{"clock restart", powered, atrT0, cmdIccClock, 0, 0, nil, rspSlotStatus, 0, 0, 0, nil},
		{"clock bad", powered, atrT0, cmdIccClock, 0, 2, nil, rspSlotStatus, 0x40, 7, 0, nil},
		{"clock absent", absent, nil, cmdIccClock, 0, 0, nil, rspSlotStatus, 0x42, 0xFE, 0, nil},
		{"abort idle", powered, atrT0, cmdAbort, 0, 0, nil, rspSlotStatus, 0, 0, 0, nil},
		{"abort bad length", powered, atrT0, cmdAbort, 0, 0, []byte{1}, rspSlotStatus, 0x40, 1, 0, nil},
		{"data rate", powered, atrT0, cmdSetDataRate, 0, 0, make([]byte, 8), rspDataRate, 0, 0, 0, []byte{0xA0, 0x0F, 0, 0, 0, 0x2A, 0, 0}},
		{"data rate short", powered, atrT0, cmdSetDataRate, 0, 0, make([]byte, 4), rspDataRate, 0x40, 1, 0, nil},
		{"unknown", powered, atrT0, 0x50, 0, 0, nil, rspSlotStatus, 0x40, 0, 0, nil},
		{"unknown bad slot", powered, atrT0, 0x7F, 3, 0, nil, rspSlotStatus, 0x42, 0, 0, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHost(t, nil)
			var c *fakeCard
			if tc.state != absent {
				c = newFake(tc.atr)
				if err := h.r.Insert(0, c); err != nil {
					t.Fatal(err)
				}
			}
			if tc.state == powered {
				h.powerOn(0)
			}
			got := h.cmd(tc.typ, tc.slot, tc.b7, tc.data)
			want := rsp{tc.rtyp, tc.slot, h.seq, tc.status, tc.bErr, tc.b9, tc.rdata}
			if got.typ != want.typ || got.status != want.status || got.err != want.err || got.b9 != want.b9 || !bytes.Equal(got.data, want.data) {
				t.Errorf("got %+v\nwant %+v", got, want)
			}
			h.noRead()
			if c == nil {
				return
			}
			// The card saw what the command implies.
			on, off, reset, _ := c.counts()
			switch tc.name {
			case "power on", "power on 1.8V":
				if on != 1 || reset != 0 {
					t.Errorf("PowerOn %d Reset %d", on, reset)
				}
			case "warm reset":
				if on != 1 || reset != 1 {
					t.Errorf("PowerOn %d Reset %d, want a warm reset", on, reset)
				}
			case "power off":
				if off != 1 {
					t.Errorf("PowerOff %d", off)
				}
			case "power on long ATR":
				if off != 1 {
					t.Errorf("a card with an unusable ATR is left powered")
				}
			}
		})
	}
}

// TestParametersFollowPowerOn: a set parameter survives until the next
// IccPowerOn or ResetParameters.
func TestParametersFollowPowerOn(t *testing.T) {
	h := newHost(t, nil)
	h.r.Insert(0, newFake(atrT1))
	h.powerOn(0)
	if r := h.cmd(cmdSetParameters, 0, 0, []byte{0x13, 0, 0, 10, 0}); r.status != 0 || r.b9 != 0 {
		t.Fatalf("SetParameters %+v", r)
	}
	if r := h.cmd(cmdGetParameters, 0, 0, nil); r.b9 != 0 || !bytes.Equal(r.data, []byte{0x13, 0, 0, 10, 0}) {
		t.Fatalf("GetParameters after set %+v", r)
	}
	h.powerOn(0)
	if r := h.cmd(cmdGetParameters, 0, 0, nil); r.b9 != 1 || len(r.data) != 7 {
		t.Fatalf("GetParameters after power on %+v, want the ATR's T=1", r)
	}
}

// TestLargeExchange: an extended APDU goes in whole and a response the
// size of RSA-3072 and RSA-4096 signatures, and the longest possible one,
// comes back in one DataBlock, readable in 64-byte pieces.
func TestLargeExchange(t *testing.T) {
	for _, n := range []int{384, 512, 1 << 12, 65536} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			h := newHost(t, nil)
			c := newFake(atrT0)
			var got []byte
			c.answer = func(cmd []byte) ([]byte, error) {
				got = append([]byte(nil), cmd...)
				out := make([]byte, n+2)
				for i := range n {
					out[i] = byte(i * 7)
				}
				out[n], out[n+1] = 0x90, 0
				return out, nil
			}
			h.r.Insert(0, c)
			h.powerOn(0)
			// Extended case 4: 00 2A 9E 9A 00 Lc(2) data Le(2).
			data := bytes.Repeat([]byte{0xA5}, 1000)
			cmd := append([]byte{0, 0x2A, 0x9E, 0x9A, 0, 0x03, 0xE8}, data...)
			cmd = append(cmd, 0, 0)
			h.seq++
			if err := h.r.Out(context.Background(), epBulkOut, frame(cmdXfrBlock, 0, h.seq, 0, 0, 0, cmd)); err != nil {
				t.Fatal(err)
			}
			var m []byte
			for len(m) < 10 || len(m) < 10+int(binary.LittleEndian.Uint32(m[1:])) {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				b, err := h.r.In(ctx, epBulkIn, 64)
				cancel()
				if err != nil || len(b) == 0 || len(b) > 64 {
					t.Fatalf("In(64) = %d bytes, %v", len(b), err)
				}
				m = append(m, b...)
			}
			r := parseRsp(t, m)
			if !bytes.Equal(got, cmd) {
				t.Errorf("card got %d bytes, want the %d-byte APDU", len(got), len(cmd))
			}
			if r.status != 0 || len(r.data) != n+2 || r.data[n] != 0x90 || r.data[n-1] != byte((n-1)*7) {
				t.Errorf("answer status %02X, %d bytes", r.status, len(r.data))
			}
			h.noRead()
		})
	}
}

// TestPartialReadSurvivesCancel: a response read in part, then an In that
// is cancelled, loses nothing.
func TestPartialReadSurvivesCancel(t *testing.T) {
	h := newHost(t, nil)
	h.r.Insert(0, newFake(atrT0))
	h.seq++
	h.r.Out(context.Background(), epBulkOut, frame(cmdIccPowerOn, 0, h.seq, 0, 0, 0, nil))
	first, err := h.r.In(context.Background(), epBulkIn, 5)
	if err != nil || len(first) != 5 {
		t.Fatal(len(first), err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := h.r.In(ctx, epBulkIn, 64); err == nil {
		// Data was ready, so a cancelled ctx may still be served;
		// then it must be the rest.
		t.Skip("In served a cancelled ctx")
	}
	rest := h.read()
	r := parseRsp(t, append(first, rest...))
	if !bytes.Equal(r.data, atrT0) {
		t.Errorf("ATR % X", r.data)
	}
}

// TestReassembly: a command delivered as 64-byte packets (and a trailing
// zero-length packet) is reassembled by dwLength.
func TestReassembly(t *testing.T) {
	h := newHost(t, nil)
	c := newFake(atrT0)
	h.r.Insert(0, c)
	h.powerOn(0)
	for _, n := range []int{54, 118, 300} { // 64-byte multiples and not
		apduBytes := bytes.Repeat([]byte{0x11}, n)
		h.seq++
		f := frame(cmdXfrBlock, 0, h.seq, 0, 0, 0, apduBytes)
		for len(f) > 0 {
			k := min(64, len(f))
			if err := h.r.Out(context.Background(), epBulkOut, f[:k]); err != nil {
				t.Fatal(err)
			}
			f = f[k:]
		}
		h.r.Out(context.Background(), epBulkOut, nil) // ZLP
		r := parseRsp(t, h.read())
		if r.seq != h.seq || len(r.data) != n+2 {
			t.Errorf("n=%d: answer seq %d with %d bytes", n, r.seq, len(r.data))
		}
	}
	h.noRead()
}

// TestMalformed: broken frames get a failed answer or a STALL, and the
// reader keeps serving.
func TestMalformed(t *testing.T) {
	tests := []struct {
		name  string
		frame []byte
		stall bool
		rtyp  byte
		bErr  byte
	}{
		{"short header", []byte{0x65, 0, 0, 0, 0, 0}, true, 0, 0},
		{"one byte", []byte{0x6F}, true, 0, 0},
		{"dwLength too big for data", append(frame(cmdXfrBlock, 0, 9, 0, 0, 0, nil)[:1], 5, 0, 0, 0, 0, 9, 0, 0, 0, 1, 2), false, rspDataBlock, 1},
		{"dwLength too small", append(frame(cmdGetSlotStatus, 0, 9, 0, 0, 0, nil), 1, 2, 3), false, rspSlotStatus, 1},
		{"dwLength huge", []byte{0x6F, 0xFF, 0xFF, 0xFF, 0xFF, 0, 9, 0, 0, 0}, false, rspDataBlock, 1},
		{"unknown type", frame(0x00, 0, 9, 0, 0, 0, nil), false, rspSlotStatus, 0},
		{"response type as command", frame(0x80, 0, 9, 0, 0, 0, nil), false, rspSlotStatus, 0},
		{"chained xfr", frame(cmdXfrBlock, 0, 9, 0, 1, 0, []byte{0, 0xCA, 0, 0}), false, rspDataBlock, 8},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHost(t, nil)
			h.r.Insert(0, newFake(atrT0))
			h.powerOn(0)
			err := h.r.Out(context.Background(), epBulkOut, tc.frame)
			if tc.stall {
				if !errors.Is(err, usb.ErrStall) {
					t.Fatalf("Out = %v, want stall", err)
				}
				h.noRead()
			} else {
				if err != nil {
					t.Fatal(err)
				}
				r := parseRsp(t, h.read())
				if r.typ != tc.rtyp || r.status&0xC0 != cmdFailed || r.err != tc.bErr || r.seq != 9 {
					t.Errorf("got %+v, want type %02X failed bError %d", r, tc.rtyp, tc.bErr)
				}
			}
			// Still serving.
			if r := h.cmd(cmdXfrBlock, 0, 0, []byte{0, 0xB0, 0, 0, 1}); r.status != 0 || len(r.data) != 7 {
				t.Errorf("after malformed frame: %+v", r)
			}
		})
	}
}

func TestMultiSlot(t *testing.T) {
	h := newHost(t, &Options{Slots: 2})
	a, b := newFake(atrT0), newFake(atrT1)
	a.answer = func([]byte) ([]byte, error) { return []byte{0xAA, 0x90, 0}, nil }
	b.answer = func([]byte) ([]byte, error) { return []byte{0xBB, 0x90, 0}, nil }
	if err := h.r.Insert(0, a); err != nil {
		t.Fatal(err)
	}
	if err := h.r.Insert(1, b); err != nil {
		t.Fatal(err)
	}
	if err := h.r.Insert(2, b); err == nil {
		t.Error("Insert into slot 2 of a 2-slot reader succeeded")
	}
	if err := h.r.Insert(1, a); !errors.Is(err, ErrSlotFull) {
		t.Errorf("Insert into a full slot: %v", err)
	}
	if r := h.powerOn(1); !bytes.Equal(r.data, atrT1) {
		t.Errorf("slot 1 ATR % X", r.data)
	}
	if r := h.cmd(cmdGetSlotStatus, 0, 0, nil); r.status != 1 {
		t.Errorf("slot 0 powered by slot 1's IccPowerOn: %+v", r)
	}
	h.powerOn(0)
	for slot, want := range []byte{0xAA, 0xBB} {
		if r := h.cmd(cmdXfrBlock, byte(slot), 0, []byte{0, 0xCA, 0, 0, 0}); r.data[0] != want {
			t.Errorf("slot %d answered % X", slot, r.data)
		}
	}
	if r := h.cmd(cmdGetParameters, 1, 0, nil); r.b9 != 1 {
		t.Errorf("slot 1 protocol T=%d, want T=1", r.b9)
	}
	if err := h.r.Remove(0); err != nil {
		t.Fatal(err)
	}
	if r := h.cmd(cmdGetSlotStatus, 0, 0, nil); r.status != 2 {
		t.Errorf("slot 0 after Remove: %+v", r)
	}
	if r := h.cmd(cmdGetSlotStatus, 1, 0, nil); r.status != 0 {
		t.Errorf("slot 1 after removing slot 0: %+v", r)
	}
	if _, off, _, _ := a.counts(); off != 1 {
		t.Errorf("removed powered card got %d PowerOff", off)
	}
	if err := h.r.Remove(0); !errors.Is(err, ErrNoCard) {
		t.Errorf("second Remove: %v", err)
	}
}

func intr(t *testing.T, r *Reader, timeout time.Duration) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return r.In(ctx, epIntrIn, 8)
}

func TestNotifySlotChange(t *testing.T) {
	r := New(&Options{Slots: 5})
	r.Insert(1, newFake(atrT0))
	r.Control(context.Background(), usb.Setup{RequestType: 0, Request: usb.ReqSetConfiguration, Value: 1}, nil)
	steps := []struct {
		name string
		do   func()
		want []byte // nil: nothing to report
	}{
		// First poll: the current picture, present slots marked changed.
		{"first poll", nil, []byte{0x50, 0x0C, 0x00}},
		{"idle", nil, nil},
		{"insert 0", func() { r.Insert(0, newFake(atrT0)) }, []byte{0x50, 0x07, 0x00}},
		{"remove 1", func() { r.Remove(1) }, []byte{0x50, 0x09, 0x00}},
		{"insert 4", func() { r.Insert(4, newFake(atrT0)) }, []byte{0x50, 0x01, 0x03}},
		{"insert+remove before poll", func() { r.Insert(2, newFake(atrT0)); r.Remove(2) }, []byte{0x50, 0x21, 0x01}},
		{"reset", func() { r.Reset() }, []byte{0x50, 0x03, 0x03}},
		{"idle again", nil, nil},
	}
	for _, s := range steps {
		if s.do != nil {
			s.do()
		}
		got, err := intr(t, r, 50*time.Millisecond)
		if s.want == nil {
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("%s: got % X, %v; want no report", s.name, got, err)
			}
			continue
		}
		if err != nil || !bytes.Equal(got, s.want) {
			t.Errorf("%s: got % X, %v; want % X", s.name, got, err, s.want)
		}
	}
	// A poll waiting when the change happens is woken.
	done := make(chan []byte)
	go func() { b, _ := intr(t, r, 5*time.Second); done <- b }()
	time.Sleep(20 * time.Millisecond)
	r.Remove(4)
	if b := <-done; !bytes.Equal(b, []byte{0x50, 0x01, 0x02}) {
		t.Errorf("woken poll got % X", b)
	}
}

// TestTimeExtension: a slow card makes the reader send time extension
// requests with the command's bSeq before the answer, and none after.
func TestTimeExtension(t *testing.T) {
	h := newHost(t, nil)
	h.r.timeExt, h.r.timeExtEvery = 20*time.Millisecond, 30*time.Millisecond
	c := newFake(atrT0)
	h.r.Insert(0, c)
	h.powerOn(0)
	c.delay = 300 * time.Millisecond
	h.seq++
	h.r.Out(context.Background(), epBulkOut, frame(cmdXfrBlock, 0, h.seq, 0, 0, 0, []byte{0, 0x47, 0, 0x9A, 0}))
	ext := 0
	for {
		r := parseRsp(t, h.read())
		if r.seq != h.seq || r.typ != rspDataBlock {
			t.Fatalf("message %+v for another command", r)
		}
		if r.status&0xC0 == cmdTimeExt {
			if r.err == 0 || len(r.data) != 0 {
				t.Errorf("time extension %+v: want a multiplier and no data", r)
			}
			ext++
			continue
		}
		if r.status != 0 || len(r.data) != 7 {
			t.Errorf("final answer %+v", r)
		}
		break
	}
	if ext < 2 {
		t.Errorf("%d time extensions in 300 ms at 20+30 ms, want several", ext)
	}
	time.Sleep(60 * time.Millisecond)
	h.noRead()

	// A slow IccPowerOn gets none: libccid's CmdPowerOn would read one
	// as the ATR answer.
	c.powerDelay = 100 * time.Millisecond
	if r := h.powerOn(0); !bytes.Equal(r.data, atrT0) {
		t.Errorf("slow power on answered %+v", r)
	}
	h.noRead()
}

// TestBusyAndAbort: a second command while one runs gets CMD_SLOT_BUSY;
// Abort cancels the running one, which answers CMD_ABORTED, and Abort is
// answered after it.
func TestBusyAndAbort(t *testing.T) {
	h := newHost(t, nil)
	c := newFake(atrT0)
	h.r.Insert(0, c)
	h.powerOn(0)
	c.delay = time.Hour
	ctx := context.Background()
	h.r.Out(ctx, epBulkOut, frame(cmdXfrBlock, 0, 20, 0, 0, 0, []byte{0, 0xCA, 0, 0, 0}))
	h.r.Out(ctx, epBulkOut, frame(cmdGetSlotStatus, 0, 21, 0, 0, 0, nil))
	if r := parseRsp(t, h.read()); r.seq != 21 || r.status != 0x40 || r.err != errSlotBusy {
		t.Fatalf("command during XfrBlock: %+v, want slot busy", r)
	}
	// The ABORT request and the bulk Abort carry the Abort's own bSeq.
	h.r.Control(ctx, usb.Setup{RequestType: 0x21, Request: reqAbort, Value: 22 << 8}, nil)
	h.r.Out(ctx, epBulkOut, frame(cmdAbort, 0, 22, 0, 0, 0, nil))
	if r := parseRsp(t, h.read()); r.seq != 20 || r.typ != rspDataBlock || r.err != errAborted || r.status != 0x40 {
		t.Errorf("aborted XfrBlock answered %+v", r)
	}
	if r := parseRsp(t, h.read()); r.seq != 22 || r.typ != rspSlotStatus || r.status != 0 {
		t.Errorf("Abort answered %+v", r)
	}
	c.delay = 0
	if r := h.cmd(cmdXfrBlock, 0, 0, []byte{1, 2, 3, 4}); r.status != 0 {
		t.Errorf("after abort: %+v", r)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.overlap {
		t.Error("card called concurrently")
	}
}

// TestRemoveDuringCommand: Remove cancels and waits for the running
// command, which fails with ICC mute and slot empty.
func TestRemoveDuringCommand(t *testing.T) {
	h := newHost(t, nil)
	c := newFake(atrT0)
	h.r.Insert(0, c)
	h.powerOn(0)
	c.delay = time.Hour
	h.r.Out(context.Background(), epBulkOut, frame(cmdXfrBlock, 0, 7, 0, 0, 0, []byte{0, 0xCA, 0, 0, 0}))
	time.Sleep(10 * time.Millisecond)
	done := make(chan error)
	go func() { done <- h.r.Remove(0) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Remove hangs on a running command")
	}
	if r := parseRsp(t, h.read()); r.seq != 7 || r.status != 0x42 || r.err != errICCMute {
		t.Errorf("interrupted command answered %+v", r)
	}
	if _, off, _, _ := c.counts(); off != 1 {
		t.Errorf("PowerOff %d", off)
	}
	h.seq = 7
	if r := h.cmd(cmdGetSlotStatus, 0, 0, nil); r.status != 2 {
		t.Errorf("status after remove %+v", r)
	}
}

// TestCardErrorRemovesCard: a Transmit error takes the card out
// (card.Card's contract) and the host is told.
func TestCardErrorRemovesCard(t *testing.T) {
	h := newHost(t, nil)
	c := newFake(atrT0)
	c.answer = func([]byte) ([]byte, error) { return nil, errors.New("token gone") }
	h.r.Insert(0, c)
	h.r.Control(context.Background(), usb.Setup{Request: usb.ReqSetConfiguration, Value: 1}, nil)
	intr(t, h.r, time.Second) // first picture
	h.powerOn(0)
	if r := h.cmd(cmdXfrBlock, 0, 0, []byte{0, 0xCA, 0, 0, 0}); r.status != 0x42 || r.err != errICCMute {
		t.Errorf("failed card answered %+v", r)
	}
	if b, err := intr(t, h.r, time.Second); err != nil || !bytes.Equal(b, []byte{0x50, 0x02}) {
		t.Errorf("slot change % X, %v", b, err)
	}
}

func TestReset(t *testing.T) {
	h := newHost(t, nil)
	c := newFake(atrT0)
	h.r.Insert(0, c)
	h.powerOn(0)
	h.r.Control(context.Background(), usb.Setup{Request: usb.ReqSetConfiguration, Value: 1}, nil)
	// An unread answer and a pending In are dropped by Reset.
	h.r.Out(context.Background(), epBulkOut, frame(cmdGetSlotStatus, 0, 1, 0, 0, 0, nil))
	time.Sleep(10 * time.Millisecond)
	h.r.Reset()
	h.noRead()
	errc := make(chan error)
	go func() {
		_, err := h.r.In(context.Background(), epBulkIn, 64)
		errc <- err
	}()
	time.Sleep(10 * time.Millisecond)
	h.r.Reset()
	if err := <-errc; !errors.Is(err, ErrReset) {
		t.Errorf("pending In after Reset: %v", err)
	}
	if b, _ := h.r.Control(context.Background(), usb.Setup{RequestType: 0x80, Request: usb.ReqGetConfiguration, Length: 1}, nil); !bytes.Equal(b, []byte{0}) {
		t.Errorf("configuration after reset % X", b)
	}
	if _, off, _, _ := c.counts(); off != 1 {
		t.Errorf("powered card got %d PowerOff on reset", off)
	}
	if r := h.cmd(cmdGetSlotStatus, 0, 0, nil); r.status != 1 {
		t.Errorf("slot after reset %+v, want present and inactive", r)
	}

	// Reset during a command: its answer is dropped and the card ends
	// powered off.
	h.powerOn(0)
	c.delay = time.Hour
	h.r.Out(context.Background(), epBulkOut, frame(cmdXfrBlock, 0, 50, 0, 0, 0, []byte{1, 2, 3, 4}))
	time.Sleep(10 * time.Millisecond)
	h.r.Reset()
	c.delay = 0
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, off, _, _ := c.counts(); off == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("card left powered after a reset during a command")
		}
		time.Sleep(time.Millisecond)
	}
	h.noRead()
	if r := h.cmd(cmdGetSlotStatus, 0, 0, nil); r.status != 1 {
		t.Errorf("slot after reset %+v", r)
	}
}

// TestBackpressure: a host that sends without reading is held in Out, and
// released when it reads.
func TestBackpressure(t *testing.T) {
	h := newHost(t, nil)
	h.r.maxQueued = 4
	for i := range 4 {
		if err := h.r.Out(context.Background(), epBulkOut, frame(cmdGetSlotStatus, 0, byte(i), 0, 0, 0, nil)); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if err := h.r.Out(ctx, epBulkOut, frame(cmdGetSlotStatus, 0, 4, 0, 0, 0, nil)); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("fifth Out with four unread answers: %v", err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := h.r.Out(context.Background(), epBulkOut, frame(cmdGetSlotStatus, 0, 5, 0, 0, 0, nil)); err != nil {
			t.Error(err)
		}
	}()
	for i := range []byte{0, 1, 2, 3, 5} {
		_ = i
		h.read()
	}
	wg.Wait()
}

func TestBadEndpoints(t *testing.T) {
	r := New(nil)
	ctx := context.Background()
	if err := r.Out(ctx, 0x02, frame(cmdGetSlotStatus, 0, 0, 0, 0, 0, nil)); !errors.Is(err, usb.ErrStall) {
		t.Errorf("Out to 0x02: %v", err)
	}
	if _, err := r.In(ctx, 0x83, 64); !errors.Is(err, usb.ErrStall) {
		t.Errorf("In from 0x83: %v", err)
	}
	r.Control(ctx, usb.Setup{RequestType: 0x02, Request: usb.ReqSetFeature, Index: epBulkOut}, nil)
	if err := r.Out(ctx, epBulkOut, frame(cmdGetSlotStatus, 0, 0, 0, 0, 0, nil)); !errors.Is(err, usb.ErrStall) {
		t.Errorf("Out to a halted endpoint: %v", err)
	}
	r.Control(ctx, usb.Setup{RequestType: 0x02, Request: usb.ReqClearFeature, Index: epBulkOut}, nil)
	if err := r.Out(ctx, epBulkOut, frame(cmdGetSlotStatus, 0, 0, 0, 0, 0, nil)); err != nil {
		t.Errorf("Out after CLEAR_FEATURE: %v", err)
	}
}

// TestConcurrentStress: a host sending commands on two slots while other
// goroutines insert, remove and reset. No deadlock, no data race (run
// with -race), every card called by one goroutine at a time.
func TestConcurrentStress(t *testing.T) {
	r := New(&Options{Slots: 2})
	r.timeExt = time.Millisecond
	r.timeExtEvery = time.Millisecond
	cards := []*fakeCard{newFake(atrT0), newFake(atrT1)}
	for _, c := range cards {
		c.delay = 100 * time.Microsecond
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	// Reader of bulk IN and interrupt IN.
	for _, ep := range []uint8{epBulkIn, epIntrIn} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				b, err := r.In(ctx, ep, 64)
				if err == nil && len(b) == 0 {
					t.Errorf("empty read from %02X", ep)
					return
				}
			}
		}()
	}
	// Host.
	wg.Add(1)
	go func() {
		defer wg.Done()
		cmds := []byte{cmdIccPowerOn, cmdXfrBlock, cmdXfrBlock, cmdGetSlotStatus, cmdIccPowerOff, cmdGetParameters}
		for i := 0; ctx.Err() == nil; i++ {
			typ := cmds[i%len(cmds)]
			var data []byte
			if typ == cmdXfrBlock {
				data = []byte{0, 0xCA, 0, 0, 0}
			}
			r.Out(ctx, epBulkOut, frame(typ, byte(i/len(cmds)%2), byte(i), 0, 0, 0, data))
			if i%50 == 0 {
				r.Control(ctx, usb.Setup{RequestType: 0x21, Request: reqAbort, Value: uint16(i%2) | uint16(i)<<8}, nil)
				r.Out(ctx, epBulkOut, frame(cmdAbort, byte(i%2), byte(i), 0, 0, 0, nil))
			}
		}
	}()
	// Card events.
	for slot, c := range cards {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				r.Insert(slot, c)
				time.Sleep(time.Millisecond)
				r.Remove(slot)
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			time.Sleep(7 * time.Millisecond)
			r.Reset()
		}
	}()
	wg.Wait()
	for i, c := range cards {
		c.mu.Lock()
		if c.overlap {
			t.Errorf("card %d called concurrently", i)
		}
		c.mu.Unlock()
	}
}

// TestLibccidOpenSequence plays libccid 1.5's open and first transaction
// as protocols.md §4.2 lists them, with its read timeouts: the 100 ms
// interrupt drain, GetSlotStatus answered well within 100 ms, the Gemalto
// GET_FIRMWARE_FEATURES Escape failing cleanly, presence, power on with
// automatic voltage and an APDU.
func TestLibccidOpenSequence(t *testing.T) {
	h := newHost(t, nil)
	r := h.r
	ctx := context.Background()
	for _, s := range []usb.Setup{
		{RequestType: 0x80, Request: usb.ReqGetDescriptor, Value: 0x0100, Length: 18},
		{RequestType: 0x80, Request: usb.ReqGetDescriptor, Value: 0x0200, Length: 9},
		{RequestType: 0x80, Request: usb.ReqGetDescriptor, Value: 0x0200, Length: 93},
		{RequestType: 0x00, Request: usb.ReqSetConfiguration, Value: 1},
	} {
		if _, err := r.Control(ctx, s, nil); err != nil {
			t.Fatalf("%+v: %v", s, err)
		}
	}
	// 1. Interrupt drain: the first poll answers at once, empty reader.
	if b, err := intr(t, r, 100*time.Millisecond); err != nil || !bytes.Equal(b, []byte{0x50, 0}) {
		t.Fatalf("first interrupt read % X, %v", b, err)
	}
	// 2. GetSlotStatus three times, each under libccid's 100 ms.
	for range 3 {
		start := time.Now()
		if a := h.cmd(cmdGetSlotStatus, 0, 0, nil); a.status != iccAbsent || a.err != 0 {
			t.Fatalf("GetSlotStatus %+v", a)
		}
		if d := time.Since(start); d > 100*time.Millisecond {
			t.Errorf("GetSlotStatus took %v", d)
		}
	}
	// 3. Escape 6A: failed, type Escape, nothing stuck behind it.
	if a := h.cmd(cmdEscape, 0, 0, []byte{0x6A}); a.status&cmdFailed == 0 || a.err != errNotSupported {
		t.Fatalf("Escape %+v", a)
	}
	// A card arrives: the poll wakes, GetSlotStatus says present.
	r.Insert(0, newFake(atrT0))
	if b, err := intr(t, r, time.Second); err != nil || !bytes.Equal(b, []byte{0x50, 0x03}) {
		t.Fatalf("insert notification % X, %v", b, err)
	}
	if a := h.cmd(cmdGetSlotStatus, 0, 0, nil); a.status != iccInactive {
		t.Fatalf("presence %+v", a)
	}
	// 5. IccPowerOn with bPowerSelect 0 (AUTO_VOLTAGE): ATR ≤ 33 bytes
	// fits libccid's 10+33-byte buffer.
	if a := h.powerOn(0); len(a.data) > 33 {
		t.Fatalf("ATR of %d bytes", len(a.data))
	}
	// No SetParameters (AUTO_PPS_PROP); the APDU goes raw.
	if a := h.cmd(cmdXfrBlock, 0, 0, []byte{0, 0xA4, 4, 0, 2, 0x3F, 0}); a.status != 0 || len(a.data) != 9 {
		t.Fatalf("XfrBlock %+v", a)
	}
	h.noRead()
}
