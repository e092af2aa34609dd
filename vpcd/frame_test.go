package vpcd

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"testing/iotest"
)

func TestFrameReader(t *testing.T) {
	big := pattern(MaxPayload)
	tests := []struct {
		name    string
		stream  []byte
		want    [][]byte
		wantErr error // after the frames
	}{
		{"empty stream", nil, nil, io.EOF},
		{"one control", []byte{0, 1, 4}, [][]byte{{4}}, io.EOF},
		{"empty frame", []byte{0, 0, 0, 1, 1}, [][]byte{{}, {1}}, io.EOF},
		{"back to back", []byte{0, 1, 1, 0, 4, 0, 0xA4, 0, 0}, [][]byte{{1}, {0, 0xA4, 0, 0}}, io.EOF},
		{"largest frame", append([]byte{0xFF, 0xFF}, big...), [][]byte{big}, io.EOF},
		{"largest frame twice", append(append([]byte{0xFF, 0xFF}, big...), append([]byte{0xFF, 0xFF}, big...)...),
			[][]byte{big, big}, io.EOF},
		{"one header byte", []byte{0}, nil, io.ErrUnexpectedEOF},
		{"header only", []byte{0, 5}, nil, io.ErrUnexpectedEOF},
		{"short payload", []byte{0, 1, 4, 0, 5, 0, 0xA4}, [][]byte{{4}}, io.ErrUnexpectedEOF},
		{"short largest frame", append([]byte{0xFF, 0xFF}, big[:1000]...), nil, io.ErrUnexpectedEOF},
	}
	readers := []struct {
		name string
		wrap func(io.Reader) io.Reader
	}{
		{"whole", func(r io.Reader) io.Reader { return r }},
		{"one byte at a time", iotest.OneByteReader},
		{"half reads", iotest.HalfReader},
		{"data with EOF", iotest.DataErrReader},
	}
	for _, tc := range tests {
		for _, rd := range readers {
			t.Run(tc.name+"/"+rd.name, func(t *testing.T) {
				fr := newFrameReader(rd.wrap(bytes.NewReader(tc.stream)))
				for i, w := range tc.want {
					got, err := fr.next()
					if err != nil {
						t.Fatalf("frame %d: %v", i, err)
					}
					if !bytes.Equal(got, w) {
						t.Fatalf("frame %d: %d bytes %.20X, want %d bytes %.20X", i, len(got), got, len(w), w)
					}
				}
				_, err := fr.next()
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("after frames: err %v, want %v", err, tc.wantErr)
				}
				if tc.wantErr == io.EOF && err != io.EOF {
					t.Errorf("clean end should be io.EOF itself, got %v", err)
				}
				if len(fr.buf) > 2+MaxPayload {
					t.Errorf("buffer grew to %d bytes", len(fr.buf))
				}
			})
		}
	}
}

// stutterReader returns one read per entry of sizes (cycling), so that the
// fuzzer controls where TCP splits the stream.
type stutterReader struct {
	r     io.Reader
	sizes []byte
	i     int
}

func (s *stutterReader) Read(p []byte) (int, error) {
	if len(s.sizes) > 0 {
		n := int(s.sizes[s.i%len(s.sizes)])
		s.i++
		if n < len(p) {
			p = p[:n] // n may be 0: a (0, nil) read is allowed
		}
	}
	return s.r.Read(p)
}

func TestFrameReaderNoProgress(t *testing.T) {
	fr := newFrameReader(&stutterReader{r: bytes.NewReader([]byte{0, 1, 4}), sizes: []byte{0}})
	if _, err := fr.next(); !errors.Is(err, io.ErrNoProgress) {
		t.Fatalf("reader that never makes progress: err %v, want io.ErrNoProgress", err)
	}
}

func TestAppendFrame(t *testing.T) {
	for _, n := range []int{0, 1, 255, 256, 4096, MaxPayload} {
		b, err := appendFrame([]byte{0xAA}, pattern(n))
		if err != nil {
			t.Fatalf("%d bytes: %v", n, err)
		}
		if len(b) != 3+n || b[0] != 0xAA || int(b[1])<<8|int(b[2]) != n || !bytes.Equal(b[3:], pattern(n)) {
			t.Errorf("%d bytes: bad frame %.10X", n, b)
		}
	}
	if _, err := appendFrame(nil, make([]byte, MaxPayload+1)); !errors.Is(err, errFrameTooLong) {
		t.Errorf("oversized payload: err %v", err)
	}
}

// FuzzFrame feeds arbitrary byte streams, split at arbitrary points, to the
// frame decoder: it must never panic or over-allocate, and the frames it
// returns re-encode to exactly the bytes it consumed.
func FuzzFrame(f *testing.F) {
	f.Add([]byte{0, 1, 4, 0, 1, 1, 0, 4, 0, 0xA4, 0, 0}, []byte{1})
	f.Add([]byte{0, 0, 0, 2, 0x90, 0x00}, []byte{3, 0, 2})
	f.Add([]byte{0xFF, 0xFF, 1, 2, 3}, []byte{})
	f.Add([]byte{0x01, 0x07, 0, 0xD6, 0, 0, 0, 1, 0}, []byte{2, 7})
	f.Fuzz(func(t *testing.T, stream, splits []byte) {
		fr := newFrameReader(&stutterReader{r: bytes.NewReader(stream), sizes: splits})
		var again []byte
		for {
			p, err := fr.next()
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.ErrNoProgress) {
					t.Fatalf("unexpected error kind: %v", err)
				}
				if err == io.EOF && !bytes.Equal(again, stream) {
					t.Fatalf("clean EOF but frames re-encode to %X, stream %X", again, stream)
				}
				break
			}
			if again, err = appendFrame(again, p); err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(stream, again) {
				t.Fatalf("frames re-encode to %X, not a prefix of %X", again, stream)
			}
		}
		if len(fr.buf) > 2+MaxPayload {
			t.Fatalf("buffer grew to %d bytes", len(fr.buf))
		}
	})
}

// streamConn is a net.Conn whose peer is a fixed byte stream; what the card
// side writes is collected.
type streamConn struct {
	net.Conn // nil: only the methods below are used
	r        io.Reader
	out      bytes.Buffer
}

func (c *streamConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *streamConn) Write(p []byte) (int, error) { return c.out.Write(p) }
func (c *streamConn) Close() error                { return nil }

// FuzzServeConn runs whole sessions from arbitrary vpcd byte streams: no
// panic, and exactly one well-formed reply per GetATR and per APDU, so the
// stream never falls out of step.
func FuzzServeConn(f *testing.F) {
	f.Add([]byte{0, 1, 4, 0, 1, 4, 0, 1, 1, 0, 1, 4, 0, 4, 0, 0xA4, 0, 0, 0, 1, 0, 0, 1, 4})
	f.Add([]byte{0, 0, 0, 1, 3, 0, 2, 0xEE, 0})
	f.Add([]byte{0, 7, 0, 0xB0, 0x10, 0, 0, 0x10, 0})
	f.Fuzz(func(t *testing.T, stream []byte) {
		conn := &streamConn{r: bytes.NewReader(stream)}
		c := lenCard()
		err := ServeConn(context.Background(), conn, c, nil)
		if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("ServeConn = %v", err)
		}
		answered := 0
		for _, call := range c.Calls() {
			if call == "atr" || strings.HasPrefix(call, "tx:") {
				answered++
			}
		}
		fr := newFrameReader(&conn.out)
		replies := 0
		for {
			_, err := fr.next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("card side wrote a bad frame: %v", err)
			}
			replies++
		}
		if replies != answered {
			t.Fatalf("%d replies for %d messages needing one", replies, answered)
		}
	})
}
