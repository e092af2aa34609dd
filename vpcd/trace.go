package vpcd

import (
	"io"
	"strconv"
	"time"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/internal/apdutrace"
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

// traceLine is the JSON form of a TraceEvent (internal/apdutrace): the
// members every vscard trace has, plus the event.
type traceLine struct {
	apdutrace.Fields
	Event string `json:"event"`
}

// JSONTrace returns a Trace function that writes one JSON object per event
// to w, for example
//
//	{"time":"2026-01-02T15:04:05.123456789Z","cmd":"00A4040007A0000000790100","rsp":"610D","us":41.2,"event":"apdu"}
//
// Calls are serialised, so several Serve loops (slots) may share one
// JSONTrace. Write errors are dropped: tracing must not take the card out
// of the reader.
func JSONTrace(w io.Writer) func(TraceEvent) {
	enc := apdutrace.Encoder(w)
	return func(e TraceEvent) {
		enc(&traceLine{Event: e.Event.String(),
			Fields: apdutrace.NewFields(e.Time, e.Command, e.Redacted, e.Response, e.Duration, e.Err)})
	}
}
