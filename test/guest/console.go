package guest

import (
	"strconv"
	"strings"
	"time"
)

// Kinds of console events (the "@@" protocol in the package comment).
const (
	evMark  = "T"     // @@T UPTIME LABEL
	evExit  = "EXIT"  // @@T UPTIME EXIT STATUS
	evBegin = "BEGIN" // @@BEGIN NAME
	evEnd   = "END"   // @@END NAME STATUS
	evWait  = "WAIT"  // @@WAIT NAME
)

// event is one parsed protocol line from the guest's console.
type event struct {
	kind   string
	name   string        // milestone label or step name
	uptime time.Duration // guest uptime, for milestones
	status int           // for END and EXIT
}

// maxName bounds names and labels: the console is untrusted text and a
// runaway line must not become a huge map key.
const maxName = 200

// parseEvent recognises a protocol line. Other lines (the script's output,
// stray kernel messages) are not events.
func parseEvent(line string) (event, bool) {
	rest, ok := strings.CutPrefix(line, "@@")
	if !ok {
		return event{}, false
	}
	kind, rest, _ := strings.Cut(rest, " ")
	rest = strings.TrimSpace(rest)
	switch kind {
	case evMark:
		up, label, ok := strings.Cut(rest, " ")
		if !ok {
			return event{}, false
		}
		secs, err := strconv.ParseFloat(up, 64)
		if err != nil || secs < 0 || secs > 1e6 || label == "" || len(label) > maxName {
			return event{}, false
		}
		ev := event{kind: evMark, name: label, uptime: time.Duration(secs * float64(time.Second))}
		if s, ok := strings.CutPrefix(label, "EXIT "); ok {
			n, err := strconv.Atoi(s)
			if err != nil {
				return event{}, false
			}
			ev.kind, ev.name, ev.status = evExit, "EXIT", n
		}
		return ev, true
	case evBegin, evWait:
		if rest == "" || len(rest) > maxName || strings.Contains(rest, " ") {
			return event{}, false
		}
		return event{kind: kind, name: rest}, true
	case evEnd:
		name, s, ok := strings.Cut(rest, " ")
		if !ok || name == "" || len(name) > maxName {
			return event{}, false
		}
		n, err := strconv.Atoi(s)
		if err != nil {
			return event{}, false
		}
		return event{kind: evEnd, name: name, status: n}, true
	}
	return event{}, false
}

// Section is the output of one guest step, between "@@BEGIN NAME" and
// "@@END NAME STATUS".
type Section struct {
	Name   string
	Output string // the lines in between, each ending in "\n"
	Status int    // the step's exit status
}

// Mark is a milestone the guest printed ("@@T UPTIME LABEL").
type Mark struct {
	Label  string
	Uptime time.Duration // guest clock
	Host   time.Duration // host clock, since QEMU started
}

// sections splits console lines into the steps they report. A step that
// began but never ended (the guest died) is returned with Status -1.
func sections(lines []string) []Section {
	var out []Section
	var cur *Section
	for _, l := range lines {
		ev, ok := parseEvent(l)
		switch {
		case ok && ev.kind == evBegin:
			if cur != nil {
				cur.Status = -1
				out = append(out, *cur)
			}
			cur = &Section{Name: ev.name}
		case ok && ev.kind == evEnd && cur != nil && ev.name == cur.Name:
			cur.Status = ev.status
			out = append(out, *cur)
			cur = nil
		case cur != nil && !ok:
			cur.Output += l + "\n"
		}
	}
	if cur != nil {
		cur.Status = -1
		out = append(out, *cur)
	}
	return out
}
