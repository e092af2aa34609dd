package vpcd

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"sync"
	"time"

	"github.com/vscard/vscard/apdu"
)

// Event is the kind of message a TraceEvent records.
type Event uint8

const (
	EventAPDU     Event = iota // a command APDU and the card's response
	EventPowerOff              // control 00
	EventPowerOn               // control 01
	EventReset                 // control 02
	EventGetATR                // control 04; Response is the ATR
	EventUnknown               // a control byte with no defined meaning; ignored
)

var eventNames = [...]string{"apdu", "power-off", "power-on", "reset", "get-atr", "unknown"}

func (e Event) String() string {
	if int(e) < len(eventNames) {
		return eventNames[e]
	}
	return "Event(" + strconv.Itoa(int(e)) + ")"
}

// A TraceEvent describes one message from vpcd and how the card answered.
// Its slices are copies owned by the receiver.
type TraceEvent struct {
	Time     time.Time     // when the message was read
	Event    Event         // what it was
	Duration time.Duration // time the card took to answer

	// Command is the command APDU (EventAPDU) or the unknown control byte.
	// For commands that carry PINs — VERIFY (INS 20), CHANGE REFERENCE DATA
	// (24), RESET RETRY COUNTER (2C), under any CLA — only the 4 header
	// bytes are kept and Redacted counts the bytes removed.
	Command  []byte
	Redacted int

	Response []byte // the response APDU, or the ATR for EventGetATR
	Err      error  // the card's Transmit error, if any
}

func newAPDUEvent(start time.Time, cmd, resp []byte, err error) TraceEvent {
	e := TraceEvent{
		Time:     start,
		Event:    EventAPDU,
		Duration: time.Since(start),
		Response: append([]byte(nil), resp...),
		Err:      err,
	}
	e.Command, e.Redacted = apdu.Redact(cmd)
	return e
}

// traceLine is the JSON form of a TraceEvent: byte strings in upper-case
// hex, as APDUs are written everywhere else (pcscd -a, OpenSC logs, peers.md traces).
type traceLine struct {
	Time     string  `json:"time"`
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
//	{"time":"2026-01-02T15:04:05.123456789Z","event":"apdu","cmd":"00A4040007A0000000790100","rsp":"610D","us":41.2}
//
// Calls are serialised, so several Serve loops (slots) may share one
// JSONTrace. Write errors are dropped: tracing must not take the card out
// of the reader.
func JSONTrace(w io.Writer) func(TraceEvent) {
	var mu sync.Mutex
	enc := json.NewEncoder(w)
	return func(e TraceEvent) {
		l := traceLine{
			Time:     e.Time.UTC().Format(time.RFC3339Nano),
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
