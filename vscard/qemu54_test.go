package vscard

import (
	"bytes"
	"context"
	"math/rand/v2"
	"slices"
	"testing"
)

// resp54 is a 54-byte response APDU: 52 data bytes and 90 00, the size of
// libcacard's CCC T-buffer read that desynchronises QEMU 7.2 (peers.md
// appendix).
func resp54() []byte {
	r := make([]byte, 52, 54)
	for i := range r {
		r[i] = byte(0x10 + i)
	}
	return append(r, 0x90, 0x00)
}

func TestQEMU54Workaround(t *testing.T) {
	full := resp54()
	data, sw := full[:52], full[52:]
	type exchange struct {
		cmd  string // hex
		want []byte // response on the wire
	}
	tests := []struct {
		name      string
		on        bool
		exchanges []exchange
		toCard    int // commands the card must see
	}{
		{"off: 54 bytes pass through", false, []exchange{
			{"00b0000034", full},
		}, 1},
		{"on: split, then GET RESPONSE as told", true, []exchange{
			{"00b0000034", append([]byte{data[0]}, 0x61, 51)},
			{"00c0000033", append(slices.Clone(data[1:]), sw...)},
		}, 1},
		{"on: GET RESPONSE with Le 00 returns everything", true, []exchange{
			{"00c0000034", append([]byte{data[0]}, 0x61, 51)},
			{"80c0000000", append(slices.Clone(data[1:]), sw...)},
		}, 1},
		{"on: shorter Le chains with 61 xx", true, []exchange{
			{"00b0000034", append([]byte{data[0]}, 0x61, 51)},
			{"00c0000010", append(slices.Clone(data[1:17]), 0x61, 35)},
			{"00c0000023", append(slices.Clone(data[17:]), sw...)},
		}, 1},
		{"on: another command drops the held rest", true, []exchange{
			{"00b0000034", append([]byte{data[0]}, 0x61, 51)},
			{"00a4040000", []byte{0x90, 0x00}},
			{"00c0000033", []byte{0x90, 0x00}}, // now the card's own answer
		}, 3},
		{"on: other sizes untouched", true, []exchange{
			{"00b0000035", append(slices.Clone(data), 0xAA, 0x90, 0x00)},
			{"00b0000033", append(slices.Clone(data[:51]), 0x90, 0x00)},
		}, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cd := &fakeCard{respond: func(_ context.Context, cmd []byte) ([]byte, error) {
				switch {
				case bytes.Equal(cmd, mustHex("00b0000035")):
					return append(slices.Clone(data), 0xAA, 0x90, 0x00), nil
				case bytes.Equal(cmd, mustHex("00b0000033")):
					return append(slices.Clone(data[:51]), 0x90, 0x00), nil
				case cmd[1] == 0xb0 || (cmd[1] == 0xc0 && cmd[4] == 0x34):
					return resp54(), nil
				}
				return []byte{0x90, 0x00}, nil
			}}
			r := startClient(t, cd, &ClientOptions{QEMU54Workaround: tt.on})
			handshake(t, r.conn, true, cacATR)
			for _, ex := range tt.exchanges {
				r.conn.Write(msg(MsgAPDU, 0, mustHex(ex.cmd)))
				m := readMsg(t, r.conn)
				if m.Type != MsgAPDU || !bytes.Equal(m.Payload, ex.want) {
					t.Fatalf("%s: got %v %X, want %X", ex.cmd, m.Type, m.Payload, ex.want)
				}
			}
			if n := len(cd.calls) - len(cd.powerCalls()); n != tt.toCard {
				t.Errorf("card saw %d commands, want %d: %v", n, tt.toCard, cd.calls)
			}
		})
	}
}

// TestQEMU54NeverSends54 drives the workaround with random GET RESPONSE
// lengths: whatever the host asks, no answer is 54 bytes, and the data and
// status word put together are the card's response.
func TestQEMU54NeverSends54(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 2000 {
		s := &session{c: &Client{}}
		full := resp54()
		full[52], full[53] = byte(rng.IntN(256)), byte(rng.IntN(256))
		out := s.split54(full)
		var got []byte
		for steps := 0; ; steps++ {
			if len(out) == qemuBadLen {
				t.Fatalf("case %d: sent a 54-byte answer", i)
			}
			if steps > 60 {
				t.Fatalf("case %d: chain does not end", i)
			}
			got = append(got, out[:len(out)-2]...)
			if s.held == nil {
				got = append(got, out[len(out)-2:]...)
				break
			}
			if out[len(out)-2] != 0x61 || int(out[len(out)-1]) != len(s.held)-2 {
				t.Fatalf("case %d: %X does not announce the %d held bytes", i, out[len(out)-2:], len(s.held)-2)
			}
			out = s.fromHeld(byte(rng.IntN(256)))
		}
		if !bytes.Equal(got, full) {
			t.Fatalf("case %d: reassembled %X, want %X", i, got, full)
		}
	}
}
