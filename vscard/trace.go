package vscard

import (
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"time"
)

// A TraceEvent records one message exchange on a VSCard link: for an APDU,
// the command from the host and the response the client sent back; for
// other messages, the message alone. Its slices are copies owned by the
// receiver.
type TraceEvent struct {
	Time     time.Time // when the message was read (or, for Dir "out", written)
	Dir      string    // "in" (host to client) or "out" (client to host)
	Type     MsgType
	ReaderID uint32

	// Command is the command APDU (or the payload of a non-APDU message).
	// For commands that carry PINs — VERIFY (INS 20), CHANGE REFERENCE DATA
	// (24), RESET RETRY COUNTER (2C), under any CLA — only the 4 header
	// bytes are kept and Redacted counts the bytes removed, as vpcd's trace
	// does (project rule: never log PINs).
	Command  []byte
	Redacted int

	// Response is the response APDU as sent on the wire (after the QEMU
	// 54-byte workaround, if it applied).
	Response []byte
	Duration time.Duration // time taken to produce the response
	Err      error         // the card's error, if any
}

// traceLine is the JSON form of a TraceEvent: byte strings in upper-case
// hex, as APDUs are written in pcscd, OpenSC and vpcd traces.
type traceLine struct {
	Time     string  `json:"time"`
	Dir      string  `json:"dir"`
	Type     string  `json:"type"`
	ReaderID uint32  `json:"reader"`
	Command  string  `json:"cmd,omitempty"`
	Redacted int     `json:"redacted,omitempty"`
	Response string  `json:"rsp,omitempty"`
	Micros   float64 `json:"us"`
	Err      string  `json:"err,omitempty"`
}

// JSONTrace returns a Trace function that writes one JSON object per event
// to w, for example
//
//	{"time":"2026-01-02T15:04:05.123456789Z","dir":"in","type":"APDU","reader":0,"cmd":"00A4040007A0000000790100","rsp":"610D","us":41.2}
//
// Calls are serialised. Write errors are dropped: tracing must not take
// the card away from the guest.
func JSONTrace(w io.Writer) func(TraceEvent) {
	var mu sync.Mutex
	enc := json.NewEncoder(w)
	return func(e TraceEvent) {
		l := traceLine{
			Time:     e.Time.UTC().Format(time.RFC3339Nano),
			Dir:      e.Dir,
			Type:     e.Type.String(),
			ReaderID: e.ReaderID,
			Command:  fmt.Sprintf("%X", e.Command),
			Redacted: e.Redacted,
			Response: fmt.Sprintf("%X", e.Response),
			Micros:   float64(e.Duration.Nanoseconds()) / 1e3,
		}
		if e.Err != nil {
			l.Err = e.Err.Error()
		}
		mu.Lock()
		defer mu.Unlock()
		_ = enc.Encode(&l)
	}
}
