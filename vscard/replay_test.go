package vscard

import (
	"bytes"
	"context"
	"net"
	"slices"
	"sync/atomic"
	"testing"
	"time"
)

// TestReplayQEMUCapture plays QEMU's side of the byte-exact captures in
// peers.md §1.3 and §1.4 and checks that the client writes exactly what
// vscclient wrote, message by message, with QEMU's split header/payload
// writes and both orders of the ReaderRemove ack.
func TestReplayQEMUCapture(t *testing.T) {
	steps := loadScript(t, "testdata/qemu72-session.txt")
	responses := scriptResponses(t, steps)
	if len(responses) < 8 {
		t.Fatalf("script has only %d APDU exchanges", len(responses))
	}
	for _, variant := range []struct {
		name       string
		ackAfterRA bool
	}{
		{"readerremove-ack-before-readeradd", false},
		{"readerremove-ack-after-readeradd", true},
	} {
		t.Run(variant.name, func(t *testing.T) {
			script := slices.Clone(steps)
			if variant.ackAfterRA {
				i := slices.IndexFunc(script, func(s step) bool { return s.dir == "Q@rr" })
				script[i], script[i+1] = script[i+1], script[i]
			}
			cd := &fakeCard{respond: func(_ context.Context, cmd []byte) ([]byte, error) {
				r, ok := responses[string(cmd)]
				if !ok {
					return []byte{0x6D, 0x00}, nil
				}
				return slices.Clone(r), nil
			}}
			ln, dial := listen(t)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			// read counts the host messages the client has read, so that an
			// action waits until the client has seen everything QEMU sent
			// before it: an Error QEMU sent just before "! cancel" must not
			// be read after the shutdown began and taken for a shutdown ack.
			var read atomic.Int64
			trace := func(e TraceEvent) {
				if e.Dir == "in" {
					read.Add(1)
				}
			}
			cl := NewClient(dial, cd, &ClientOptions{QEMU54Workaround: true, MinBackoff: time.Hour, Trace: trace})
			done := make(chan error, 1)
			go func() { done <- cl.Run(ctx) }()

			conn := accept(t, ln)
			// QEMU's chardev without nodelay=on (peers.md §1.3).
			conn.(*net.TCPConn).SetNoDelay(false)
			var sent int64
			for _, s := range script {
				switch s.dir {
				case "C":
					want := s.joined()
					got := readExactly(t, conn, len(want))
					if !bytes.Equal(got, want) {
						t.Fatalf("line %d: client wrote\n%X\nwant\n%X", s.line, got, want)
					}
				case "Q", "Q@rr":
					for _, w := range s.writes {
						if _, err := conn.Write(w); err != nil {
							t.Fatalf("line %d: %v", s.line, err)
						}
					}
					sent++
				case "!":
					for deadline := time.Now().Add(5 * time.Second); read.Load() < sent; time.Sleep(time.Millisecond) {
						if time.Now().After(deadline) {
							t.Fatalf("line %d: client read %d of %d host messages", s.line, read.Load(), sent)
						}
					}
					var err error
					switch s.action {
					case "remove":
						err = cl.Remove()
					case "insert":
						err = cl.Insert(nil)
					case "cancel":
						cancel()
					default:
						t.Fatalf("line %d: unknown action %q", s.line, s.action)
					}
					if err != nil {
						t.Fatalf("line %d: %s: %v", s.line, s.action, err)
					}
				case "EOF":
					expectEOF(t, conn)
				}
			}
			expectEOF(t, conn)
			waitRun(t, done)
			if got, want := cd.powerCalls(), []string{"on", "off", "on", "off"}; !slices.Equal(got, want) {
				t.Errorf("card power events %v, want %v", got, want)
			}
			apdus := 0
			for _, s := range script {
				if s.dir == "Q" && MsgType(be32(s.joined())) == MsgAPDU {
					apdus++
				}
			}
			if st := cl.Status(); st.APDUs != uint64(apdus) || st.Connected || st.Connects != 1 {
				t.Errorf("status after run: %+v, want %d APDUs, 1 connect, not connected", st, apdus)
			}
		})
	}
}
