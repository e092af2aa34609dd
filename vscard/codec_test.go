package vscard

import (
	"bytes"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"
)

func TestReadMessage(t *testing.T) {
	tests := []struct {
		name    string
		in      string // hex
		want    Message
		wantErr error // errors.Is target; nil = success
	}{
		{"QEMU Init", "00000001ffffffff0000000c565343440000000200000000",
			Message{MsgInit, UndefinedReaderID, mustHex("565343440000000200000000")}, nil},
		{"Error ok", "00000002000000000000000400000000",
			Message{MsgError, 0, mustHex("00000000")}, nil},
		{"empty Flush", "000000080000000000000000", Message{MsgFlush, 0, []byte{}}, nil},
		{"unknown type", "0000002a00000003000000020102", Message{MsgType(42), 3, []byte{1, 2}}, nil},
		{"max payload, truncated", "0000000700000000000100000000", Message{}, io.ErrUnexpectedEOF},
		{"oversized length", "0000000700000000ffffffff", Message{}, ErrTooLarge},
		{"one past the limit", "000000070000000000010001", Message{}, ErrTooLarge},
		{"empty stream", "", Message{}, io.EOF},
		{"half header", "000000070000", Message{}, io.ErrUnexpectedEOF},
		{"half payload", "0000000700000000000000049000", Message{}, io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, r := range []struct {
				name string
				r    io.Reader
			}{
				{"whole", bytes.NewReader(mustHex(tt.in))},
				{"bytewise", iotest.OneByteReader(bytes.NewReader(mustHex(tt.in)))},
			} {
				m, buf, err := ReadMessage(r.r, nil)
				if tt.wantErr != nil {
					if !errors.Is(err, tt.wantErr) {
						t.Fatalf("%s: err %v, want %v", r.name, err, tt.wantErr)
					}
					if cap(buf) > HeaderSize+MaxPayload {
						t.Fatalf("%s: buffer grew to %d", r.name, cap(buf))
					}
					continue
				}
				if err != nil {
					t.Fatalf("%s: %v", r.name, err)
				}
				if m.Type != tt.want.Type || m.ReaderID != tt.want.ReaderID || !bytes.Equal(m.Payload, tt.want.Payload) {
					t.Fatalf("%s: got %+v, want %+v", r.name, m, tt.want)
				}
				if got := AppendMessage(nil, m); !bytes.Equal(got, mustHex(tt.in)) {
					t.Fatalf("%s: re-encoded %X", r.name, got)
				}
			}
		})
	}
}

// TestReadMessageLargeAndReuse checks the largest legal message, that the
// buffer is reused, and that a huge claimed length never allocates.
func TestReadMessageLargeAndReuse(t *testing.T) {
	big := Message{Type: MsgAPDU, Payload: bytes.Repeat([]byte{0xAB}, MaxPayload)}
	stream := AppendMessage(nil, big)
	stream = AppendMessage(stream, Message{Type: MsgFlush})
	r := bytes.NewReader(stream)
	m, buf, err := ReadMessage(r, make([]byte, 0, 16))
	if err != nil || len(m.Payload) != MaxPayload {
		t.Fatalf("big message: %v, %d bytes", err, len(m.Payload))
	}
	m, buf2, err := ReadMessage(r, buf)
	if err != nil || m.Type != MsgFlush {
		t.Fatalf("second message: %v %v", m.Type, err)
	}
	if &buf2[:1][0] != &buf[:1][0] {
		t.Error("buffer not reused")
	}

	// A claimed 4 GiB payload must cost a header's worth of work, not an
	// allocation of the claimed size.
	hdr := mustHex("0000000700000000ffffffff")
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range 100 {
		if _, _, err := ReadMessage(bytes.NewReader(hdr), nil); !errors.Is(err, ErrTooLarge) {
			t.Fatal(err)
		}
	}
	runtime.ReadMemStats(&after)
	if perCall := (after.TotalAlloc - before.TotalAlloc) / 100; perCall > 4096 {
		t.Errorf("oversized header allocated %d bytes per call", perCall)
	}
}

func TestInitPayload(t *testing.T) {
	p := InitPayload(0)
	// protocols.md §1.4: the Init both peers send.
	if want := mustHex("565343440000000200000000"); !bytes.Equal(p, want) {
		t.Fatalf("InitPayload(0) = %X, want %X", p, want)
	}
	tests := []struct {
		name      string
		in        string
		version   uint32
		caps      uint32
		malformed bool
	}{
		{"QEMU", "565343440000000200000000", 2, 0, false},
		{"two capability words", "5653434400000002000000070000000f", 2, 7, false},
		{"other version", "565343440000000300000000", 3, 0, false},
		{"11 bytes", "5653434400000002000000", 0, 0, true},
		{"empty", "", 0, 0, true},
		{"wrong magic", "444353560000000200000000", 0, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, c, err := ParseInit(mustHex(tt.in))
			if tt.malformed {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("err = %v, want ErrMalformed", err)
				}
				return
			}
			if err != nil || v != tt.version || c != tt.caps {
				t.Fatalf("got %d %d %v", v, c, err)
			}
		})
	}
}

func TestParseError(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want ErrorCode
		bad  bool
	}{
		{"QEMU ok", "00000000", CodeOK, false},
		{"QEMU general (big-endian)", "00000001", CodeGeneralError, false},
		{"vscclient general (host order, little-endian)", "01000000", CodeGeneralError, false},
		{"vscclient cannot add readers", "02000000", CodeCannotAddReaders, false},
		{"big-endian card already inserted", "00000003", CodeCardAlreadyInserted, false},
		{"neither order small", "12345678", ErrorCode(0x12345678), false},
		{"short", "000000", 0, true},
		{"long", "0000000000", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseError(mustHex(tt.in))
			if tt.bad {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("err = %v", err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %v %v, want %v", got, err, tt.want)
			}
		})
	}
	for c := range ErrorCode(4) {
		if got, _ := ParseError(ErrorPayload(c)); got != c {
			t.Errorf("round trip of %v gave %v", c, got)
		}
	}
}

func TestStrings(t *testing.T) {
	for _, tt := range []struct{ got, want string }{
		{MsgInit.String(), "Init"},
		{MsgFlushComplete.String(), "FlushComplete"},
		{MsgType(0).String(), "MsgType(0)"},
		{MsgType(10).String(), "MsgType(10)"},
		{CodeCardAlreadyInserted.String(), "card already inserted"},
		{ErrorCode(9).String(), "ErrorCode(9)"},
	} {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
}

// FuzzReadMessage feeds arbitrary streams to the decoder: it must never
// panic, never grow its buffer past HeaderSize+MaxPayload, and whatever it
// decodes must re-encode to the bytes it consumed.
func FuzzReadMessage(f *testing.F) {
	f.Add(mustHex("00000001ffffffff0000000c565343440000000200000000"))
	f.Add(mustHex("000000080000000000000000"))
	f.Add(mustHex("0000000700000000ffffffff"))
	f.Add(mustHex("00000002000000000000000401000000"))
	f.Add(mustHex("000000050000000000000000f3b7a18000073667465206364313434"[:40]))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		var buf []byte
		consumed := 0
		for {
			m, nb, err := ReadMessage(r, buf)
			buf = nb
			if cap(buf) > HeaderSize+MaxPayload {
				t.Fatalf("buffer grew to %d", cap(buf))
			}
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, ErrTooLarge) {
					t.Fatalf("unexpected error kind: %v", err)
				}
				return
			}
			enc := AppendMessage(nil, m)
			if !bytes.Equal(enc, data[consumed:consumed+len(enc)]) {
				t.Fatalf("re-encoding differs")
			}
			consumed += len(enc)
			// Payload parsers must not panic either.
			switch m.Type {
			case MsgInit:
				_, _, _ = ParseInit(m.Payload)
			case MsgError:
				_, _ = ParseError(m.Payload)
			case MsgATR:
				_ = validATR(m.Payload)
			}
			_ = strings.ToValidUTF8(string(m.Payload), "")
		}
	})
}
