package card

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/vscard/vscard/apdu"
)

// testApplet answers INS 01 with size bytes of data and defers the rest.
type testApplet struct {
	aid      []byte
	selected int
	size     int
}

func (a *testApplet) AID() []byte { return a.aid }
func (a *testApplet) Select(int) []byte {
	a.selected++
	return []byte{0x6F, 0x00}
}
func (a *testApplet) Handle(_ context.Context, ch int, cmd apdu.Command) (apdu.Response, bool, error) {
	switch cmd.INS {
	case 0x01, 0x04:
		d := make([]byte, a.size)
		for i := range d {
			d[i] = byte(i)
		}
		return apdu.OK(d), true, nil
	case 0x02:
		return apdu.Status(apdu.SW(0x9100 + ch)), true, nil
	case 0x03:
		return apdu.Response{}, true, errors.New("token gone")
	}
	return apdu.Response{}, false, nil
}

func newTestEngine() (*Engine, *testApplet, *int) {
	a := &testApplet{aid: []byte{0xA0, 0x01}, size: 300}
	powered := 0
	e := NewEngine(Config{
		ATR:     []byte{0x3B, 0x00},
		Applets: []Applet{a, &testApplet{aid: []byte{0xA0, 0x02}, size: 5}},
		Generic: func(_ context.Context, ch int, cmd apdu.Command) (apdu.Response, bool, error) {
			if cmd.INS == 0x20 {
				return apdu.Status(0x9000), true, nil
			}
			return apdu.Response{}, false, nil
		},
		OnPower: func() { powered++ },
	})
	return e, a, &powered
}

func run(t *testing.T, e *Engine, cmd string) string {
	t.Helper()
	b, err := apdu.ParseHex(cmd)
	if err != nil {
		t.Fatal(err)
	}
	out, err := e.Transmit(context.Background(), b)
	if err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
	s := strings.ToUpper(hex.EncodeToString(out))
	if len(s) > 12 {
		// Long data: report length and the SW only.
		return fmt.Sprintf("len%03d:%s", len(out), s[len(s)-4:])
	}
	return s
}

// TestEngineSequences walks the engine through the rules of cac.md §2.
func TestEngineSequences(t *testing.T) {
	for _, tc := range []struct {
		name  string
		steps [][2]string // command, expected answer
	}{
		{"no applet", [][2]string{
			{"00010000", "6900"}, {"00200000", "9000"}, {"00C0000000", "6A88"},
			{"E0A4040002A001", "6900"}, // proprietary class
			{"1020000000", "6900"},     // RFU class
			{"0C20000000", "6882"},     // secure messaging bits
		}},
		{"select and rule A", [][2]string{
			{"00A4040002A001", "6102"}, // no Le: 61 02
			{"00C0000002", "6F009000"},
			{"00A4040002A00100", "6F009000"}, // Le 256
			{"0001000000", "6100"},           // 300 bytes, Le 256 < 300: buffered
			{"00C0000010", "len018:6100"},    // 16 bytes, 284 left -> 61 00
			{"00C0123400", "len258:611C"},    // 256 bytes, 28 left
			{"00C00000FF", "len030:9000"},    // rest, fewer than Le
			{"00C0000000", "6A88"},
		}},
		{"other INS discards", [][2]string{
			{"00A4040002A001", "6102"},
			{"0002000000", "9100"},
			{"00C0000002", "6A88"},
		}},
		{"failed select deselects", [][2]string{
			{"00A4040002A00100", "6F009000"},
			{"00A4040002A00300", "6A82"},
			{"0001000000", "6900"},
			{"00A4040002A002", "6102"},
			{"00A40400", "6A82"}, // empty AID
			{"0001000000", "6900"},
			{"00A4000002A001", "6A81"}, // P1 != 04
		}},
		{"exact AID match only", [][2]string{
			{"00A4040001A000", "6A82"},
			{"00A4040003A00100", "6A82"},
			{"00A4040C02A00100", "6F009000"}, // P2 ignored
		}},
		{"channels", [][2]string{
			{"01A4040002A00100", "6F009000"},
			{"0102000000", "9101"},
			{"0002000000", "6900"}, // channel 0 has none
			{"8102000000", "9101"},
			{"02A4040002A00100", "6882"}, // channel 2 implies SM bits
			{"C102000000", "6900"},       // class C means channel 0
		}},
		{"applet ignores CLA", [][2]string{
			{"00A4040002A00100", "6F009000"},
			{"FF02000000", "9100"},
			{"E002000000", "9100"},
			{"1002000000", "9100"},
		}},
		{"malformed keeps state", [][2]string{
			{"00A4040002A001", "6102"},
			{"00A4", "6700"},
			{"00A40400050102", "6700"},
			{"00C0000002", "6F009000"},
		}},
		{"extended Le", [][2]string{
			{"00A4040002A00100", "6F009000"},
			{"00010000000000", "len302:9000"}, // Ne 65536
			{"0001000000012C", "len302:9000"}, // Ne 300
			{"0001000000012B", "6100"},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, _, _ := newTestEngine()
			for i, s := range tc.steps {
				if got := run(t, e, s[0]); got != s[1] {
					t.Fatalf("step %d %s: got %s, want %s", i, s[0], got, s[1])
				}
			}
		})
	}
}

func TestEnginePower(t *testing.T) {
	for _, ev := range []struct {
		name string
		do   func(*Engine)
	}{
		{"PowerOff", (*Engine).PowerOff}, {"PowerOn", (*Engine).PowerOn}, {"Reset", (*Engine).Reset},
	} {
		t.Run(ev.name, func(t *testing.T) {
			e, a, powered := newTestEngine()
			run(t, e, "01A4040002A00100")
			run(t, e, "00A4040002A001") // leaves 61 02 pending
			ev.do(e)
			if *powered != 1 {
				t.Fatalf("OnPower ran %d times", *powered)
			}
			if e.Current(0) != nil || e.Current(1) != nil {
				t.Fatal("applet still selected")
			}
			if got := run(t, e, "00C0000002"); got != "6A88" {
				t.Fatalf("buffer survived: %s", got)
			}
			if a.selected != 2 {
				t.Fatalf("Select ran %d times", a.selected)
			}
			if !bytes.Equal(e.ATR(), []byte{0x3B, 0x00}) {
				t.Fatal("ATR")
			}
		})
	}
}

func TestEngineErrors(t *testing.T) {
	e, _, _ := newTestEngine()
	run(t, e, "00A4040002A00100")
	if _, err := e.Transmit(context.Background(), []byte{0, 3, 0, 0}); err == nil {
		t.Fatal("applet error not passed on")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := e.Transmit(ctx, []byte{0, 2, 0, 0}); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled context: %v", err)
	}
	if e.Current(-1) != nil || e.Current(Channels) != nil {
		t.Fatal("Current out of range")
	}
}

// FuzzEngine checks that no APDU sequence panics the engine or returns a
// response shorter than a status word or longer than the largest datum.
func FuzzEngine(f *testing.F) {
	f.Add([]byte{7, 0x00, 0xA4, 0x04, 0x00, 0x02, 0xA0, 0x01, 4, 0x00, 0x01, 0x00, 0x00, 5, 0x00, 0xC0, 0x00, 0x00, 0x10})
	f.Add([]byte{5, 0x01, 0xA4, 0x04, 0x00, 0x00, 2, 0x00, 0xA4})
	f.Fuzz(func(t *testing.T, in []byte) {
		e, _, _ := newTestEngine()
		for len(in) > 0 {
			n := min(int(in[0]), len(in)-1)
			cmd := in[1 : 1+n]
			in = in[1+n:]
			if n == 0xFF {
				e.Reset()
				continue
			}
			if len(cmd) >= 2 && cmd[1] == 0x03 {
				continue // the deliberate error instruction
			}
			out, err := e.Transmit(context.Background(), cmd)
			if err != nil {
				t.Fatal(err)
			}
			if len(out) < 2 || len(out) > 302 {
				t.Fatalf("%X: %d-byte response", cmd, len(out))
			}
		}
	})
}

// TestEngineAbsentLe256 checks Config.AbsentLe256: no Le reads as 256
// for the commands it picks (here all but INS 04), an explicit Le is
// still honoured, and data past 256 bytes is still buffered.
func TestEngineAbsentLe256(t *testing.T) {
	a := &testApplet{aid: []byte{0xA0, 0x01}, size: 300}
	small := &testApplet{aid: []byte{0xA0, 0x02}, size: 256}
	e := NewEngine(Config{ATR: []byte{0x3B, 0x00}, Applets: []Applet{a, small},
		AbsentLe256: func(cmd apdu.Command) bool { return cmd.INS != 0x04 }})
	for i, s := range [][2]string{
		{"00A4040002A001", "6F009000"}, // case 3: data at once
		{"00A4040002A00101", "6102"},   // explicit Le 1 < 2
		{"00010000", "6100"},           // case 1, 300 bytes > 256
		{"00C0000000", "len258:612C"},  // GET RESPONSE unchanged
		{"00C0000000", "len046:9000"},  // the rest
		{"00A4040002A002", "6F009000"}, // the 256-byte applet
		{"00010000", "len258:9000"},    // exactly 256 fit
		{"0001000001", "6100"},         // explicit Le 1
		{"00040000", "6100"},           // not picked: 61 xx as before
		{"00C0000000", "len258:9000"},
		{"00A4", "6700"},           // malformed unchanged
		{"00A4040002A003", "6A82"}, // miss unchanged
	} {
		if got := run(t, e, s[0]); got != s[1] {
			t.Fatalf("step %d %s: got %s, want %s", i, s[0], got, s[1])
		}
	}
}

// TestEngineDefault checks Config.Default: the default applet is current
// on channel 0 from the start, after power events and after a failed
// SELECT, and sees CLA 10 commands; other channels start empty.
func TestEngineDefault(t *testing.T) {
	def := &testApplet{aid: []byte{0xA0, 0x01}, size: 3}
	other := &testApplet{aid: []byte{0xA0, 0x02}, size: 5}
	e := NewEngine(Config{ATR: []byte{0x3B, 0x00}, Applets: []Applet{def, other}, Default: def})
	for i, s := range [][2]string{
		{"0001000000", "0001029000"},     // default answers before any SELECT
		{"1002000000", "9100"},           // chaining CLA reaches it
		{"0102000000", "6900"},           // channel 1 has nothing
		{"00A4040002A00200", "6F009000"}, // select the other applet
		{"0001000000", "len007:9000"},    // 5 bytes: the other one
		{"00A4040002A00300", "6A82"},     // miss: back to the default
		{"0001000000", "0001029000"},
		{"00A4040002A00200", "6F009000"},
	} {
		if got := run(t, e, s[0]); got != s[1] {
			t.Fatalf("step %d %s: got %s, want %s", i, s[0], got, s[1])
		}
	}
	for _, ev := range []func(){e.PowerOff, e.PowerOn, e.Reset} {
		ev()
		if got := e.Current(0); got != def {
			t.Fatalf("after power event: current applet %v, want the default", got)
		}
		if got := run(t, e, "0001000000"); got != "0001029000" {
			t.Fatalf("after power event: got %s", got)
		}
	}
}
