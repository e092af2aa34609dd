package ccid

import (
	"context"
	"encoding/binary"
	"errors"
	"testing"
	"time"

	"github.com/vscard/vscard/usb"
)

// idle waits until no command goroutine runs.
func (r *Reader) idle(t testing.TB) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		r.mu.Lock()
		n := r.running
		r.mu.Unlock()
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("commands still running after 10 s")
		}
		time.Sleep(50 * time.Microsecond)
	}
}

// drain returns every queued bulk IN message.
func (r *Reader) drain() [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out [][]byte
	for _, m := range r.queue {
		out = append(out, m.b[m.off:])
	}
	r.queue = nil
	r.broadcast()
	return out
}

// FuzzBulkOut feeds arbitrary bulk OUT transfers to a two-slot reader
// (slot 0 holds a card, slot 1 is empty). The input is a sequence of
// transfers, each a 2-byte little-endian length and its bytes. It checks
// that nothing panics, that a transfer too short for a header STALLs, and
// that every complete message — reassembled by dwLength from pieces that
// are multiples of 64 bytes, as a USB device would — gets exactly one
// well-formed answer echoing bSlot and bSeq.
func FuzzBulkOut(f *testing.F) {
	f.Add(seedTransfers(frame(cmdIccPowerOn, 0, 1, 0, 0, 0, nil), frame(cmdXfrBlock, 0, 2, 0, 0, 0, []byte{0, 0xA4, 4, 0, 0})))
	f.Add(seedTransfers(frame(cmdGetSlotStatus, 1, 1, 0, 0, 0, nil), frame(cmdSetParameters, 0, 2, 1, 0, 0, []byte{0x11, 0x10, 0, 0x4D, 0, 0x20, 0})))
	f.Add(seedTransfers(frame(cmdXfrBlock, 0, 3, 0, 0, 0, make([]byte, 54))[:64], make([]byte, 10)))
	f.Add(seedTransfers([]byte{0x6F, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0, 0}, []byte{0x62}, nil))
	f.Add(seedTransfers(frame(cmdAbort, 0, 4, 0, 0, 0, nil), frame(cmdSetDataRate, 7, 5, 0, 0, 0, make([]byte, 8)), frame(0x99, 0, 6, 0, 0, 0, []byte{1})))
	f.Fuzz(func(t *testing.T, in []byte) {
		r := New(&Options{Slots: 2})
		r.timeExt = time.Hour
		r.Insert(0, newFake(atrT1))
		ctx := context.Background()
		var pend []byte
		for len(in) >= 2 {
			n := int(binary.LittleEndian.Uint16(in))
			in = in[2:]
			n = min(n, len(in))
			data := in[:n]
			in = in[n:]

			// What a CCID device must do with this transfer.
			var (
				want  int
				hdr   []byte
				stall bool
			)
			switch {
			case len(data) == 0:
			case len(pend) == 0 && len(data) < 10:
				stall = true
			default:
				buf := append(append([]byte(nil), pend...), data...)
				pend = nil
				dw := binary.LittleEndian.Uint32(buf[1:])
				if dw <= maxMessage-10 && len(buf) < 10+int(dw) && len(data)%64 == 0 {
					pend = buf
				} else {
					want, hdr = 1, buf[:10]
				}
			}

			err := r.Out(ctx, epBulkOut, data)
			if stall != errors.Is(err, usb.ErrStall) || (!stall && err != nil) {
				t.Fatalf("Out(%d bytes) = %v, stall expected: %v", len(data), err, stall)
			}
			r.idle(t)
			got := r.drain()
			if len(got) != want {
				t.Fatalf("transfer of %d bytes got %d answers, want %d", len(data), len(got), want)
			}
			for _, m := range got {
				if len(m) < 10 || int(binary.LittleEndian.Uint32(m[1:])) != len(m)-10 {
					t.Fatalf("malformed answer % X", m)
				}
				if m[0] < rspDataBlock || m[0] > rspDataRate {
					t.Fatalf("answer type %02X", m[0])
				}
				if m[5] != hdr[5] || m[6] != hdr[6] {
					t.Fatalf("answer slot %d seq %d to command slot %d seq %d", m[5], m[6], hdr[5], hdr[6])
				}
				if m[7]&0xC0 == 0xC0 || m[7]&3 == 3 {
					t.Fatalf("bStatus %02X", m[7])
				}
				if m[7]&0x40 == 0 && m[8] != 0 {
					t.Fatalf("successful answer with bError %02X", m[8])
				}
			}
		}
	})
}

func seedTransfers(fs ...[]byte) []byte {
	var b []byte
	for _, f := range fs {
		b = binary.LittleEndian.AppendUint16(b, uint16(len(f)))
		b = append(b, f...)
	}
	return b
}

// FuzzBulkOutPipelined sends whole frames back to back without waiting for
// answers, as a host that pipelines would, so commands meet busy slots and
// Aborts meet running commands. Every frame must still get exactly one
// answer with its bSlot and bSeq.
func FuzzBulkOutPipelined(f *testing.F) {
	f.Add(seedTransfers(frame(cmdIccPowerOn, 0, 1, 0, 0, 0, nil), frame(cmdXfrBlock, 0, 2, 0, 0, 0, []byte{0, 0xA4, 4, 0, 0}), frame(cmdGetSlotStatus, 0, 3, 0, 0, 0, nil)))
	f.Add(seedTransfers(frame(cmdIccPowerOn, 0, 1, 0, 0, 0, nil), frame(cmdXfrBlock, 0, 2, 0, 0, 0, []byte{1, 2, 3, 4}), frame(cmdAbort, 0, 3, 0, 0, 0, nil), frame(cmdAbort, 0, 4, 0, 0, 0, nil)))
	f.Add(seedTransfers(frame(cmdIccPowerOn, 1, 1, 0, 0, 0, nil), frame(cmdIccPowerOff, 1, 2, 0, 0, 0, nil), frame(cmdIccPowerOn, 0, 3, 0, 0, 0, nil)))
	f.Fuzz(func(t *testing.T, in []byte) {
		r := New(&Options{Slots: 2})
		r.timeExt = time.Hour
		r.maxQueued = 1 << 20
		c := newFake(atrT1)
		c.delay = 50 * time.Microsecond
		r.Insert(0, c)
		r.Insert(1, newFake(atrT0))
		ctx := context.Background()
		want := map[[2]byte]int{}
		for len(in) >= 2 {
			n := min(int(binary.LittleEndian.Uint16(in)), len(in)-2)
			data := in[2 : 2+n]
			in = in[2+n:]
			// Whole frames only: make dwLength agree and avoid the
			// multiple-of-64 continuation rule.
			if len(data) < 10 || len(data)%64 == 0 {
				continue
			}
			binary.LittleEndian.PutUint32(data[1:], uint32(len(data)-10))
			want[[2]byte{data[5], data[6]}]++
			if err := r.Out(ctx, epBulkOut, data); err != nil {
				t.Fatalf("Out: %v", err)
			}
		}
		r.idle(t)
		got := map[[2]byte]int{}
		for _, m := range r.drain() {
			if len(m) < 10 || int(binary.LittleEndian.Uint32(m[1:])) != len(m)-10 {
				t.Fatalf("malformed answer % X", m)
			}
			got[[2]byte{m[5], m[6]}]++
		}
		for k, n := range want {
			if got[k] != n {
				t.Fatalf("slot %d seq %d: %d answers for %d commands", k[0], k[1], got[k], n)
			}
		}
		if len(got) != len(want) {
			t.Fatalf("answers for commands never sent: %v vs %v", got, want)
		}
	})
}
