// Package apdutrace writes the JSON APDU traces of vscard's transports
// (vpcd, VSCard, the CCID reader): one JSON object per line, byte strings
// in upper-case hex as pcscd -a, OpenSC and peers.md write APDUs, and the
// same member names everywhere, so one jq filter reads them all. Each
// transport embeds Fields in its own line type and adds what only it knows
// (a slot, a VSCard message type).
package apdutrace

import (
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"time"
)

// Fields are the members every trace line has.
type Fields struct {
	Time     string  `json:"time"`
	Command  string  `json:"cmd,omitempty"`
	Redacted int     `json:"redacted,omitempty"` // PIN bytes blanked in Command (apdu.Redact)
	Response string  `json:"rsp,omitempty"`
	Micros   float64 `json:"us"`
	Err      string  `json:"err,omitempty"`
}

// NewFields fills Fields from an exchange. cmd must already be redacted.
func NewFields(t time.Time, cmd []byte, redacted int, rsp []byte, d time.Duration, err error) Fields {
	f := Fields{
		Time:     t.UTC().Format(time.RFC3339Nano),
		Command:  fmt.Sprintf("%X", cmd),
		Redacted: redacted,
		Response: fmt.Sprintf("%X", rsp),
		Micros:   float64(d.Nanoseconds()) / 1e3,
	}
	if err != nil {
		f.Err = err.Error()
	}
	return f
}

// Encoder returns a function that writes v to w as one JSON line. Calls
// are serialised, so several slots or links may share one trace file, and
// write errors are dropped: tracing must never take a card away.
func Encoder(w io.Writer) func(v any) {
	var mu sync.Mutex
	enc := json.NewEncoder(w)
	return func(v any) {
		mu.Lock()
		defer mu.Unlock()
		_ = enc.Encode(v)
	}
}
