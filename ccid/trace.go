package ccid

import (
	"io"

	"github.com/vscard/vscard/internal/apdutrace"
)

// traceLine is the JSON form of a TraceEvent (internal/apdutrace): the
// members every vscard trace has, plus the slot.
type traceLine struct {
	apdutrace.Fields
	Slot  int    `json:"slot"`
	Event string `json:"event"`
}

// JSONTrace returns a Trace function that writes one JSON object per event
// to w, for example
//
//	{"time":"2026-01-02T15:04:05.123456789Z","cmd":"00A4040007A0000000790100","rsp":"610D","us":41.2,"slot":0,"event":"apdu"}
//
// Calls are serialised, so several Readers may share one JSONTrace. Write
// errors are dropped: tracing must not take the card out of the reader.
func JSONTrace(w io.Writer) func(TraceEvent) {
	enc := apdutrace.Encoder(w)
	return func(e TraceEvent) {
		enc(&traceLine{Slot: e.Slot, Event: e.Event.String(),
			Fields: apdutrace.NewFields(e.Time, e.Command, e.Redacted, e.Response, e.Duration, e.Err)})
	}
}
