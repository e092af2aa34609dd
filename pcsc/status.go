package pcsc

// This file turns pcscd's reader table into SCARD_STATE_* flags the way
// libpcsclite's SCardGetStatusChange does (winscard_clnt.c), so callers
// see the same EventState from this client as from the C library.

// findReader is the index of name in t, or -1.
func findReader(t []readerEntry, name string) int {
	for i, e := range t {
		if e.name == name {
			return i
		}
	}
	return -1
}

// evalReader computes a known reader's event state and ATR from its table
// entry e, given what the caller believes (cur), and whether they differ.
func evalReader(cur State, e readerEntry) (ev State, atr []byte, changed bool) {
	mark := func() {
		ev |= StateChanged
		changed = true
	}
	// The reader has come back after being away.
	if cur&StateUnknown != 0 {
		mark()
	}
	// The caller's event counter (upper 16 bits) is stale: a card was
	// inserted or removed since its last look, even if the state matches.
	if cur&0xFFFF0000 != 0 && uint32(cur)>>16 != e.eventCounter&0xFFFF {
		mark()
	}
	ev = ev&0xFFFF | State(e.eventCounter<<16)

	if e.state&cardUnknown != 0 {
		// Reader in a bad state; libpcsclite drops the counter here too.
		ev = StateUnavailable
		if cur&StateUnavailable == 0 {
			mark()
		}
	} else if cur&StateUnavailable != 0 {
		mark()
	}

	present := e.state&cardPresent != 0
	if present {
		atr = e.atr
	}
	switch {
	case e.state&cardAbsent != 0:
		ev |= StateEmpty
		ev &^= StatePresent | StateIgnore | StateUnknown | StateUnavailable | StateATRMatch | StateMute | StateInUse
		if cur&StatePresent != 0 {
			mark()
		}
	case present:
		ev |= StatePresent
		ev &^= StateEmpty | StateIgnore | StateUnknown | StateUnavailable | StateMute
		if cur&StateEmpty != 0 {
			mark()
		}
		// pcscd marks a card that did not answer power-up as swallowed.
		if e.state&cardSwallowed != 0 {
			ev |= StateMute
			if cur&StateMute == 0 {
				mark()
			}
		} else if cur&StateMute != 0 {
			mark()
		}
	}

	switch {
	case e.sharing == sharingExclusive:
		ev |= StateExclusive
		ev &^= StateInUse
		if cur&StateInUse != 0 {
			mark()
		}
	case e.sharing > sharingNone:
		if present {
			ev |= StateInUse
			ev &^= StateExclusive
			if cur&StateExclusive != 0 {
				mark()
			}
		}
	case e.sharing == sharingNone:
		ev &^= StateInUse | StateExclusive
		if cur&(StateInUse|StateExclusive) != 0 {
			mark()
		}
	}

	if cur == StateUnaware {
		mark()
	}
	return ev, atr, changed
}

// watch is the state of one GetStatusChange call across its passes.
type watch struct {
	states  []ReaderState
	readers int    // reader count when the call started (PnP detection)
	events  uint32 // latest reader-events counter (IPC 4.5), for PnP entries
}

// pnpEvents handles the PnP entry with IPC 4.5's reader-events counter at
// the start of the call: store it in the upper 16 bits, and report a change
// if the caller saw another non-zero value (libpcsclite 2.3+).
func (w *watch) pnpEvents(i int, events uint32, first bool) bool {
	w.events = events
	s := &w.states[i]
	prev := uint32(s.CurrentState) >> 16
	s.EventState = s.EventState&0xFFFF | State(events<<16)
	if first && prev != 0 && prev != events&0xFFFF {
		s.EventState |= StateChanged
		return true
	}
	return false
}

// evaluate runs one pass over the caller's entries against table t and
// reports whether any of them changed.
func (w *watch) evaluate(t []readerEntry) bool {
	changed := false
	for i := range w.states {
		s := &w.states[i]
		if s.CurrentState&StateIgnore != 0 {
			continue
		}
		if s.EventState&StateChanged != 0 {
			changed = true // set by pnpEvents before the first pass
		}
		j := findReader(t, s.Reader)
		switch {
		case j >= 0:
			ev, atr, ch := evalReader(s.CurrentState, t[j])
			s.EventState, s.ATR = ev, atr
			changed = changed || ch
		case isPnP(s.Reader):
			if len(t) != w.readers {
				w.readers = len(t)
				s.EventState = s.EventState&0xFFFF | State(w.events<<16) | StateChanged
				changed = true
			}
		default:
			// A reader the call started with has gone.
			s.EventState = StateUnknown | StateUnavailable
			s.ATR = nil
			if s.CurrentState&StateUnknown == 0 {
				s.EventState |= StateChanged
				changed = true
			}
		}
	}
	return changed
}
