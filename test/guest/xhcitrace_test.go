package guest

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// xhciTraceEvents are the QEMU trace events (-trace events=FILE) that
// parseXHCITrace reads: every transfer's start, its going asynchronous
// (the device answers later), and its completion.
const xhciTraceEvents = "usb_xhci_xfer_start\nusb_xhci_xfer_async\nusb_xhci_xfer_success\n"

// xhciTraceArgs are the QEMU options that log those events with
// timestamps (-msg timestamp=on; Debian's QEMU has the log trace backend)
// to file, the events list being written next to it.
func xhciTraceArgs(t *testing.T, file string) []string {
	t.Helper()
	events := filepath.Join(filepath.Dir(file), "trace-events")
	if err := os.WriteFile(events, []byte(xhciTraceEvents), 0o644); err != nil {
		t.Fatal(err)
	}
	return []string{"-msg", "timestamp=on", "-trace", "events=" + events + ",file=" + file}
}

// apduSplit is where an APDU's time goes on one xHCI slot (one device),
// as medians over its APDU-shaped exchanges: a bulk OUT with more than a
// CCID header (a command with data), then the next bulk IN of 10 bytes or
// more (its answer).
type apduSplit struct {
	Slot int
	// Async: the device completed its bulk OUTs later, not inside the
	// doorbell (usb-redir waits for its peer; usb-ccid never does).
	Async bool
	N     int
	// Out is the bulk OUT from its start to its completion; Turn the
	// guest's time from that completion to starting the bulk IN; In the
	// bulk IN from its start to its completion.
	Out, Turn, In time.Duration
}

func (s apduSplit) String() string {
	us := func(d time.Duration) string { return fmt.Sprintf("%d µs", d.Microseconds()) }
	return fmt.Sprintf("slot %d: %d APDUs; bulk OUT %s, guest turn %s, bulk IN %s", s.Slot, s.N, us(s.Out), us(s.Turn), us(s.In))
}

var xhciEventRE = regexp.MustCompile(`^\d+@(\d+)\.(\d{6}):(usb_xhci_xfer_\w+) (0x[0-9a-f]+)(?:: (.*))?$`)

type xhciXfer struct {
	slot, epid int
	start, end time.Time
	async      bool
	len        int
}

// parseXHCITrace reads QEMU's usb_xhci_xfer_* events and returns the
// APDU split of every slot that carried APDUs, by slot number. Lines of
// other events, and transfers that never completed (QEMU killed before
// flushing), are skipped.
func parseXHCITrace(r io.Reader) ([]apduSplit, error) {
	open := map[string]*xhciXfer{}
	bySlot := map[int][]*xhciXfer{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		m := xhciEventRE.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		sec, _ := strconv.ParseInt(m[1], 10, 64)
		usec, _ := strconv.ParseInt(m[2], 10, 64)
		at := time.Unix(sec, usec*1000)
		ptr, rest := m[4], m[5]
		switch m[3] {
		case "usb_xhci_xfer_start":
			var x xhciXfer
			if _, err := fmt.Sscanf(rest, "slotid %d, epid %d", &x.slot, &x.epid); err != nil {
				return nil, fmt.Errorf("xfer_start %q: %w", rest, err)
			}
			x.start = at
			open[ptr] = &x
		case "usb_xhci_xfer_async":
			if x := open[ptr]; x != nil {
				x.async = true
			}
		case "usb_xhci_xfer_success":
			x := open[ptr]
			if x == nil {
				continue
			}
			delete(open, ptr)
			if _, err := fmt.Sscanf(rest, "len %d", &x.len); err != nil {
				return nil, fmt.Errorf("xfer_success %q: %w", rest, err)
			}
			x.end = at
			bySlot[x.slot] = append(bySlot[x.slot], x)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	var out []apduSplit
	for slot, xs := range bySlot {
		// xHCI endpoint ids: 2*endpoint number, +1 for IN.
		slices.SortFunc(xs, func(a, b *xhciXfer) int { return a.start.Compare(b.start) })
		var outs, turns, ins []time.Duration
		asyncOuts := 0
		for i, o := range xs {
			if o.epid%2 != 0 || o.len <= 10 {
				continue
			}
			for _, in := range xs[i+1:] {
				if in.epid%2 == 1 && in.len >= 10 && !in.start.Before(o.end) {
					outs = append(outs, o.end.Sub(o.start))
					turns = append(turns, in.start.Sub(o.end))
					ins = append(ins, in.end.Sub(in.start))
					if o.async {
						asyncOuts++
					}
					break
				}
			}
		}
		if len(outs) == 0 {
			continue
		}
		out = append(out, apduSplit{Slot: slot, Async: asyncOuts*2 > len(outs), N: len(outs),
			Out: median(outs), Turn: median(turns), In: median(ins)})
	}
	slices.SortFunc(out, func(a, b apduSplit) int { return a.Slot - b.Slot })
	return out, nil
}

// TestParseXHCITrace reads an excerpt of a real trace of
// TestGuestReaderBench: slot 1 is usb-ccid (every transfer completes in
// the doorbell), slot 2 usb-redir (each goes asynchronous and completes
// when vscard reader answers); at the end an interrupt transfer that never
// completed and a line of another event.
func TestParseXHCITrace(t *testing.T) {
	f, err := os.Open("testdata/xhci-trace.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := parseXHCITrace(f)
	if err != nil {
		t.Fatal(err)
	}
	want := []apduSplit{
		// Worked out by hand from the excerpt's timestamps.
		{Slot: 1, N: 3, Out: 159 * time.Microsecond, Turn: 825 * time.Microsecond, In: 21 * time.Microsecond},
		{Slot: 2, Async: true, N: 3, Out: 431 * time.Microsecond, Turn: 988 * time.Microsecond, In: 181 * time.Microsecond},
	}
	if !slices.Equal(got, want) {
		t.Errorf("got\n%v\nwant\n%v", got, want)
	}
	if _, err := parseXHCITrace(strings.NewReader("1@1.000000:usb_xhci_xfer_start 0x1: slotid x\n")); err == nil {
		t.Error("a mangled xfer_start was accepted")
	}
}
