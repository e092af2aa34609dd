// Package transcript reads APDU transcripts, the text format of the shared
// reference's vectors/ (described in its README) that card tests replay:
//
//	# comment
//	ATR 3B 7A ...        the card's ATR (optional)
//	>> 00 A4 04 00 ...   a command
//	<< 90 00             the card's answer to the command before it
//	-- power cycle       PowerOff and PowerOn
//
// Lines starting with "NSSATR " (the ATR libcacard's NSS backend reports,
// kept in some vectors for reference) are skipped.
package transcript

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/vscard/vscard/apdu"
)

// maxLine bounds one line: the longest answers in the vectors are a few
// KiB of hex.
const maxLine = 1 << 20

// Step is a command with its recorded answer (Reply is nil when the
// transcript has none), or a power cycle.
type Step struct {
	Line       int // 1-based line of the command or power cycle
	Power      bool
	Cmd, Reply []byte
}

// Transcript is a parsed transcript.
type Transcript struct {
	ATR   []byte
	Steps []Step
}

// Parse reads a transcript. Errors name the offending line.
func Parse(r io.Reader) (*Transcript, error) {
	var tr Transcript
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 1<<16), maxLine)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		hexOf := func(s string) ([]byte, error) {
			b, err := apdu.ParseHex(s)
			if err != nil {
				return nil, fmt.Errorf("transcript: line %d: %w", n, err)
			}
			return b, nil
		}
		var err error
		switch {
		case line == "", strings.HasPrefix(line, "#"), strings.HasPrefix(line, "NSSATR "):
		case strings.HasPrefix(line, "ATR "):
			tr.ATR, err = hexOf(line[4:])
		case line == "-- power cycle":
			tr.Steps = append(tr.Steps, Step{Line: n, Power: true})
		case strings.HasPrefix(line, ">> "):
			var cmd []byte
			if cmd, err = hexOf(line[3:]); err == nil {
				tr.Steps = append(tr.Steps, Step{Line: n, Cmd: cmd})
			}
		case strings.HasPrefix(line, "<< "):
			last := len(tr.Steps) - 1
			if last < 0 || tr.Steps[last].Power || tr.Steps[last].Reply != nil {
				return nil, fmt.Errorf("transcript: line %d: answer without a command", n)
			}
			tr.Steps[last].Reply, err = hexOf(line[3:])
		default:
			return nil, fmt.Errorf("transcript: line %d: unknown line %q", n, line)
		}
		if err != nil {
			return nil, err
		}
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return nil, fmt.Errorf("transcript: a line is longer than %d bytes", maxLine)
		}
		return nil, fmt.Errorf("transcript: %w", err)
	}
	return &tr, nil
}

// ReadFile parses the transcript in path; errors start with the path.
func ReadFile(path string) (*Transcript, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	tr, err := Parse(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return tr, nil
}
