package vscard

import (
	"io"
	"time"

	"github.com/vscard/vscard/internal/apdutrace"
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

// traceLine is the JSON form of a TraceEvent (internal/apdutrace): the
// members every vscard trace has, plus the VSCard message.
type traceLine struct {
	apdutrace.Fields
	Dir      string `json:"dir"`
	Type     string `json:"type"`
	ReaderID uint32 `json:"reader"`
}

// JSONTrace returns a Trace function that writes one JSON object per event
// to w, for example
//
//	{"time":"2026-01-02T15:04:05.123456789Z","cmd":"00A4040007A0000000790100","rsp":"610D","us":41.2,"dir":"in","type":"APDU","reader":0}
//
// Calls are serialised. Write errors are dropped: tracing must not take
// the card away from the guest.
func JSONTrace(w io.Writer) func(TraceEvent) {
	enc := apdutrace.Encoder(w)
	return func(e TraceEvent) {
		enc(&traceLine{Dir: e.Dir, Type: e.Type.String(), ReaderID: e.ReaderID,
			Fields: apdutrace.NewFields(e.Time, e.Command, e.Redacted, e.Response, e.Duration, e.Err)})
	}
}
