package ccid

import (
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"time"
)

// traceLine is the JSON form of a TraceEvent: byte strings in upper-case
// hex, as vpcd's and vscard's traces write them.
type traceLine struct {
	Time     string  `json:"time"`
	Slot     int     `json:"slot"`
	Event    string  `json:"event"`
	Command  string  `json:"cmd,omitempty"`
	Redacted int     `json:"redacted,omitempty"`
	Response string  `json:"rsp,omitempty"`
	Micros   float64 `json:"us"`
	Err      string  `json:"err,omitempty"`
}

// JSONTrace returns a Trace function that writes one JSON object per event
// to w, for example
//
//	{"time":"2026-01-02T15:04:05.123456789Z","slot":0,"event":"apdu","cmd":"00A4040007A0000000790100","rsp":"610D","us":41.2}
//
// Calls are serialised, so several Readers may share one JSONTrace. Write
// errors are dropped: tracing must not take the card out of the reader.
func JSONTrace(w io.Writer) func(TraceEvent) {
	var mu sync.Mutex
	enc := json.NewEncoder(w)
	return func(e TraceEvent) {
		l := traceLine{
			Time:     e.Time.UTC().Format(time.RFC3339Nano),
			Slot:     e.Slot,
			Event:    e.Event.String(),
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
