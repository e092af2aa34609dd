package vpcd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// MaxPayload is the largest payload a vpcd frame can carry: the length
// prefix is 16 bits (peers.md §2.1). vpcd itself refuses to send more
// (sendToVICC rejects length > 0xFFFF), so a receive buffer never needs to
// grow beyond 2+MaxPayload bytes, whatever a peer claims.
const MaxPayload = 0xFFFF

// errFrameTooLong is returned when a message to vpcd does not fit the 16-bit
// length prefix.
var errFrameTooLong = errors.New("vpcd: message longer than 65535 bytes")

// appendFrame appends the 2-byte big-endian length and payload to dst, so
// that the whole message can go out in a single write (peers.md §4.1).
func appendFrame(dst, payload []byte) ([]byte, error) {
	if len(payload) > MaxPayload {
		return dst, errFrameTooLong
	}
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(payload)))
	return append(dst, payload...), nil
}

// frameReader splits a byte stream into vpcd frames without bufio, so that
// every read of the underlying reader is one the caller (netutil's
// quick-ACK wrapper) sees, and without allocating per frame: it reuses one
// buffer, grown at most to 2+MaxPayload bytes.
type frameReader struct {
	r          io.Reader
	buf        []byte
	start, end int // unread bytes are buf[start:end]
}

// initialBufSize covers every short APDU and the CAC's 255-byte reads; an
// extended APDU grows the buffer once for the life of the connection.
const initialBufSize = 4096

func newFrameReader(r io.Reader) *frameReader {
	return &frameReader{r: r, buf: make([]byte, initialBufSize)}
}

// next returns the next frame's payload. The slice is valid until the next
// call. A stream that ends between frames gives io.EOF; one that ends inside
// a frame gives an error wrapping io.ErrUnexpectedEOF.
func (fr *frameReader) next() ([]byte, error) {
	if fr.start == fr.end {
		// The common case between request/response messages: nothing is
		// buffered, so start over at the front instead of compacting later.
		fr.start, fr.end = 0, 0
	}
	if err := fr.fill(2); err != nil {
		if fr.end == fr.start {
			// Nothing of a next frame arrived: a clean close (io.EOF) or
			// the connection's own error, unwrapped.
			return nil, err
		}
		return nil, fmt.Errorf("vpcd: truncated frame header: %w", unexpected(err))
	}
	n := int(binary.BigEndian.Uint16(fr.buf[fr.start:]))
	if err := fr.fill(2 + n); err != nil {
		return nil, fmt.Errorf("vpcd: truncated frame (want %d payload bytes, have %d): %w",
			n, fr.end-fr.start-2, unexpected(err))
	}
	p := fr.buf[fr.start+2 : fr.start+2+n : fr.start+2+n]
	fr.start += 2 + n
	return p, nil
}

func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// fill reads until at least n unread bytes are buffered (n <= 2+MaxPayload).
func (fr *frameReader) fill(n int) error {
	if fr.end-fr.start >= n {
		return nil
	}
	if fr.start+n > len(fr.buf) {
		// Move the partial frame to the front, growing only if the frame
		// itself is larger than the buffer.
		if n > len(fr.buf) {
			nb := make([]byte, max(n, 2*len(fr.buf)))
			nb = nb[:min(len(nb), 2+MaxPayload)]
			fr.end = copy(nb, fr.buf[fr.start:fr.end])
			fr.buf = nb
		} else {
			fr.end = copy(fr.buf, fr.buf[fr.start:fr.end])
		}
		fr.start = 0
	}
	for empty := 0; fr.end-fr.start < n; {
		m, err := fr.r.Read(fr.buf[fr.end:])
		fr.end += m
		if fr.end-fr.start >= n {
			// Data that arrived together with an error is still a frame; the
			// error resurfaces on the next read.
			return nil
		}
		if err != nil {
			return err
		}
		if m == 0 {
			// io.Reader allows (0, nil); a net.Conn never returns it, but
			// do not spin forever on a reader that keeps doing so.
			if empty++; empty >= 100 {
				return io.ErrNoProgress
			}
		} else {
			empty = 0
		}
	}
	return nil
}
