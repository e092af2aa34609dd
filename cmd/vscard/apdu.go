package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/pcsc"
)

const apduUsage = `usage: vscard apdu [--reader R] [--no-follow] [--exclusive] [--json] APDU...

Sends each APDU (hex; spaces or colons allowed inside one argument, e.g.
"00 A4 04 00 07 A0 00 00 00 79 01 00") to the card in one PC/SC reader, in
order, on one connection and inside one transaction, so no other program
interleaves its commands. Prints what goes over the wire and the result:

  > 00 A4 04 00 07 A0 00 00 00 79 01 00      command sent
  < 61 0D                                    response received
  > 00 C0 00 00 0D                           GET RESPONSE sent by vscard
  < 01 02 ... 90 00
  = 90 00 (success), 13 bytes                the whole response, then a dump:
    0000  01 02 ...                           |..|

SW 61xx is followed with GET RESPONSE (00 C0 00 00 xx) and the pieces are
joined, SW 6Cxx by sending the command again with Le=xx, as opensc-tool -s
and OpenSC do, unless --no-follow. Commands are printed as given, VERIFY
included: the PIN you type is your own, and vscard logs no APDUs anywhere.

--reader R picks the reader: an exact name, an index as listed by 'vscard
readers' (as opensc-tool -r N), or a unique part of a name. Default: the
first reader with a card. Exit status: 0 when every APDU got a response
(whatever its status word), 1 when a reader, card or transmission failed,
2 for usage errors.

flags:
`

// runAPDU implements "vscard apdu".
func runAPDU(ctx context.Context, env *environ, args []string) error {
	fs := flag.NewFlagSet("apdu", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	reader := fs.String("reader", "", "reader: exact name, index (0 = first) or unique part of a name; default: first reader with a card")
	noFollow := fs.Bool("no-follow", false, "show 61xx and 6Cxx as they come; do not send GET RESPONSE or repeat with Le=xx")
	exclusive := fs.Bool("exclusive", false, "connect in exclusive mode (no other program may use the card meanwhile)")
	asJSON := fs.Bool("json", false, "print JSON: one object per APDU with every exchange and the joined response")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), apduUsage)
		fs.PrintDefaults()
	}
	rest, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(rest) == 0 {
		return fmt.Errorf("%w: no APDU given; e.g. vscard apdu 00A4000C023F00", errUsage)
	}
	cmds := make([][]byte, len(rest))
	for i, s := range rest {
		b, err := apdu.ParseHex(s)
		if err != nil {
			return fmt.Errorf("%w: APDU %d %q is not hex: %v", errUsage, i+1, s, err)
		}
		if _, err := apdu.Parse(b); err != nil {
			return fmt.Errorf("%w: APDU %d (% X): %v", errUsage, i+1, b, err)
		}
		cmds[i] = b
	}

	c, err := establish(ctx)
	if err != nil {
		return err
	}
	defer c.Release()
	infos, err := snapshot(c)
	if err != nil {
		return err
	}
	ri, err := pickReader(infos, *reader)
	if err != nil {
		return err
	}
	mode := pcsc.ShareShared
	if *exclusive {
		mode = pcsc.ShareExclusive
	}
	k, err := c.Connect(ri.Name, mode, pcsc.ProtocolAny)
	if err != nil {
		switch {
		case errors.Is(err, pcsc.ErrNoSmartcard), errors.Is(err, pcsc.ErrRemovedCard):
			return fmt.Errorf("no card in reader %q: %w", ri.Name, err)
		case errors.Is(err, pcsc.ErrSharingViolation):
			return fmt.Errorf("reader %q: another program holds the card exclusively: %w", ri.Name, err)
		}
		return fmt.Errorf("connect to %q: %w", ri.Name, err)
	}
	defer k.Disconnect(pcsc.LeaveCard)
	if !*asJSON {
		fmt.Fprintf(env.stdout, "Using reader %q (%s)\n", ri.Name, protoName(k.Protocol()))
	}
	if err := k.BeginTransaction(ctx); err != nil {
		return fmt.Errorf("begin transaction on %q: %w", ri.Name, err)
	}
	var results []apduResult
	var runErr error
	for _, cmd := range cmds {
		r, err := exchangeAPDU(k, cmd, !*noFollow)
		results = append(results, r)
		if !*asJSON {
			printResult(env.stdout, r)
		}
		if err != nil {
			runErr = err
			break // the link is gone; later APDUs would fail the same way
		}
	}
	if err := k.EndTransaction(pcsc.LeaveCard); err != nil && runErr == nil {
		runErr = fmt.Errorf("end transaction: %w", err)
	}
	if *asJSON {
		if err := writeResultsJSON(env.stdout, results); err != nil && runErr == nil {
			runErr = err
		}
	}
	return runErr
}

func protoName(p pcsc.Protocol) string {
	switch p {
	case pcsc.ProtocolT0:
		return "T=0"
	case pcsc.ProtocolT1:
		return "T=1"
	case pcsc.ProtocolRaw:
		return "raw"
	}
	return fmt.Sprintf("protocol %d", p)
}

// pickReader chooses the reader as opensc-tool users expect: an exact
// name, then an index, then a unique substring (case-insensitive); with no
// choice the first reader holding a card.
func pickReader(infos []pcsc.ReaderInfo, want string) (pcsc.ReaderInfo, error) {
	if len(infos) == 0 {
		return pcsc.ReaderInfo{}, errors.New("no PC/SC readers found (is the reader plugged in? 'vscard readers' lists what pcscd sees)")
	}
	if want == "" {
		for _, ri := range infos {
			if hasCard(ri.State) {
				return ri, nil
			}
		}
		return pcsc.ReaderInfo{}, fmt.Errorf("no card in any reader (%s); insert one or pick a reader with --reader", readerSummary(infos))
	}
	for _, ri := range infos {
		if ri.Name == want {
			return ri, nil
		}
	}
	if n, err := strconv.Atoi(want); err == nil && want == strconv.Itoa(n) {
		if n < 0 || n >= len(infos) {
			return pcsc.ReaderInfo{}, fmt.Errorf("no reader %d: there are %d (%s)", n, len(infos), readerSummary(infos))
		}
		return infos[n], nil
	}
	var hits []pcsc.ReaderInfo
	for _, ri := range infos {
		if strings.Contains(strings.ToLower(ri.Name), strings.ToLower(want)) {
			hits = append(hits, ri)
		}
	}
	switch len(hits) {
	case 1:
		return hits[0], nil
	case 0:
		return pcsc.ReaderInfo{}, fmt.Errorf("no reader matches %q (%s)", want, readerSummary(infos))
	}
	names := make([]string, len(hits))
	for i, ri := range hits {
		names[i] = strconv.Quote(ri.Name)
	}
	return pcsc.ReaderInfo{}, fmt.Errorf("%q matches %d readers (%s); give more of the name or its index", want, len(hits), strings.Join(names, ", "))
}

func readerSummary(infos []pcsc.ReaderInfo) string {
	s := make([]string, len(infos))
	for i, ri := range infos {
		s[i] = fmt.Sprintf("%d %q: %s", i, ri.Name, cardState(ri.State))
	}
	return strings.Join(s, "; ")
}

// transmitter is the part of *pcsc.Card exchangeAPDU needs.
type transmitter interface {
	Transmit(cmd []byte) ([]byte, error)
}

// step is one command/response pair on the wire.
type step struct {
	Sent     []byte
	Received []byte
}

// apduResult is one user APDU: every exchange it took, and the joined
// response (the data of all pieces, then the last status word).
type apduResult struct {
	Command  []byte
	Steps    []step
	Response []byte // nil when a transmit failed
	Err      error
}

// Bounds on following: a card that keeps answering 61xx or 6Cxx must not
// keep vscard busy forever, nor grow the joined response without limit
// (the largest extended response is 65536 bytes).
const (
	maxFollow   = 512
	maxRespData = 65536 + 256
)

// exchangeAPDU sends cmd and, with follow, fetches the rest of the answer:
// 61xx → GET RESPONSE with Le=xx (00 meaning 256), 6Cxx → cmd again with
// Le=xx (ISO/IEC 7816-4 §5.3.4 and 7816-3 §10.3.5, the T=0 procedures
// OpenSC's sc_transmit and sc_get_response implement).
func exchangeAPDU(t transmitter, cmd []byte, follow bool) (apduResult, error) {
	r := apduResult{Command: cmd}
	var data []byte
	next := cmd
	for i := 0; ; i++ {
		resp, err := t.Transmit(next)
		if err != nil {
			r.Steps = append(r.Steps, step{Sent: next})
			r.Err = fmt.Errorf("transmit % X: %w", next, err)
			return r, r.Err
		}
		r.Steps = append(r.Steps, step{Sent: next, Received: resp})
		if len(resp) < 2 {
			r.Err = fmt.Errorf("card answered % X to % X: shorter than a status word", resp, next)
			return r, r.Err
		}
		sw1, sw2 := resp[len(resp)-2], resp[len(resp)-1]
		body := resp[:len(resp)-2]
		if !follow || i >= maxFollow || len(data)+len(body) > maxRespData || (sw1 != 0x61 && sw1 != 0x6C) {
			r.Response = append(append(data, body...), sw1, sw2)
			if follow && (sw1 == 0x61 || sw1 == 0x6C) {
				r.Err = fmt.Errorf("stopped following %02X %02X after %d exchanges and %d bytes", sw1, sw2, len(r.Steps), len(data)+len(body))
				return r, r.Err
			}
			return r, nil
		}
		switch sw1 {
		case 0x61:
			// More data waiting: its bytes so far are kept and the rest
			// fetched. GET RESPONSE keeps the command's logical channel.
			data = append(data, body...)
			next = []byte{getResponseCLA(cmd[0]), 0xC0, 0x00, 0x00, sw2}
		case 0x6C:
			// Wrong Le; sw2 is the right one. What came with it is
			// discarded, as the command is sent again.
			c, err := apdu.Parse(next)
			if err != nil {
				r.Response = append(append(data, body...), sw1, sw2)
				return r, nil
			}
			c.Ne = int(sw2)
			if c.Ne == 0 {
				c.Ne = 256
			}
			c.HasLe = true
			c.Extended = false
			next = c.Bytes()
		}
	}
}

// getResponseCLA is CLA 00 on the command's logical channel: channel bits
// of the first interindustry class (b2-b1) or of the further one (b4-b1),
// ISO/IEC 7816-4 §5.4.1. Proprietary classes (CAC's 80) get plain 00,
// which is what libcacard and OpenSC use.
func getResponseCLA(cla byte) byte {
	switch {
	case cla&0x80 != 0:
		return 0x00
	case cla&0x40 != 0:
		return 0x40 | cla&0x0F
	default:
		return cla & 0x03
	}
}

func printResult(w io.Writer, r apduResult) {
	for _, s := range r.Steps {
		fmt.Fprintf(w, "> % X\n", s.Sent)
		if s.Received != nil {
			fmt.Fprintf(w, "< % X\n", s.Received)
		}
	}
	if r.Response == nil {
		fmt.Fprintf(w, "! %v\n", r.Err)
		return
	}
	n := len(r.Response) - 2
	sw := apdu.SW(uint16(r.Response[n])<<8 | uint16(r.Response[n+1]))
	fmt.Fprintf(w, "= %v (%s), %d bytes\n", sw, swMeaning(sw), n)
	hexDump(w, r.Response[:n])
	if r.Err != nil {
		fmt.Fprintf(w, "! %v\n", r.Err)
	}
}

// hexDump prints 16 bytes a line with offsets and ASCII, like opensc-tool.
func hexDump(w io.Writer, b []byte) {
	for off := 0; off < len(b); off += 16 {
		line := b[off:min(off+16, len(b))]
		fmt.Fprintf(w, "    %04X  %-47s  |%s|\n", off, fmt.Sprintf("% X", line), asciiOf(line))
	}
}

// swMeaning names the common status words (ISO/IEC 7816-4 §5.6).
func swMeaning(sw apdu.SW) string {
	switch sw1 := sw.SW1(); {
	case sw == 0x9000:
		return "success"
	case sw1 == 0x61:
		return fmt.Sprintf("%d more bytes available", int(sw.SW2()))
	case sw1 == 0x6C:
		return fmt.Sprintf("wrong Le, use %d", int(sw.SW2()))
	case sw1 == 0x63 && sw.SW2()&0xF0 == 0xC0:
		return fmt.Sprintf("verification failed, %d tries left", int(sw.SW2()&0x0F))
	}
	if m, ok := swNames[sw]; ok {
		return m
	}
	switch sw.SW1() {
	case 0x62, 0x63:
		return "warning"
	case 0x64, 0x65, 0x66:
		return "execution error"
	case 0x67, 0x68, 0x69, 0x6A, 0x6B, 0x6D, 0x6E, 0x6F:
		return "checking error"
	}
	return "unknown status"
}

var swNames = map[apdu.SW]string{
	0x6283: "selected file deactivated",
	0x6700: "wrong length",
	0x6881: "logical channel not supported",
	0x6882: "secure messaging not supported",
	0x6982: "security status not satisfied",
	0x6983: "authentication method blocked",
	0x6984: "reference data not usable",
	0x6985: "conditions of use not satisfied",
	0x6986: "command not allowed (no current EF)",
	0x6A80: "incorrect data",
	0x6A81: "function not supported",
	0x6A82: "file or application not found",
	0x6A83: "record not found",
	0x6A86: "incorrect P1 P2",
	0x6A88: "referenced data not found",
	0x6B00: "wrong parameters P1 P2",
	0x6D00: "instruction not supported",
	0x6E00: "class not supported",
	0x6F00: "no precise diagnosis",
}

type stepJSON struct {
	Sent     hexString `json:"sent"`
	Received hexString `json:"received,omitempty"`
}

type resultJSON struct {
	Command  hexString  `json:"command"`
	Steps    []stepJSON `json:"exchanges"`
	Response hexString  `json:"response,omitempty"`
	SW       string     `json:"sw,omitempty"`
	Error    string     `json:"error,omitempty"`
}

func writeResultsJSON(w io.Writer, rs []apduResult) error {
	out := make([]resultJSON, 0, len(rs))
	for _, r := range rs {
		j := resultJSON{Command: r.Command, Response: r.Response}
		for _, s := range r.Steps {
			j.Steps = append(j.Steps, stepJSON{s.Sent, s.Received})
		}
		if n := len(r.Response); n >= 2 {
			j.SW = fmt.Sprintf("%02X%02X", r.Response[n-2], r.Response[n-1])
		}
		if r.Err != nil {
			j.Error = r.Err.Error()
		}
		out = append(out, j)
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}
