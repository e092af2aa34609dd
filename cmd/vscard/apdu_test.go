package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/pcsc"
)

// scriptCard answers each transmitted command from a script of
// (expected command, response) pairs, failing the test on any deviation.
type scriptCard struct {
	t     *testing.T
	steps [][2]string // hex command, hex response ("!" = transport error)
	i     int
}

func (c *scriptCard) Transmit(cmd []byte) ([]byte, error) {
	if c.i >= len(c.steps) {
		c.t.Fatalf("unexpected extra command % X", cmd)
	}
	want, resp := c.steps[c.i][0], c.steps[c.i][1]
	c.i++
	if got := fmt.Sprintf("%X", cmd); got != strings.ReplaceAll(want, " ", "") {
		c.t.Fatalf("command %d = %s, want %s", c.i, got, want)
	}
	if resp == "!" {
		return nil, pcsc.ErrRemovedCard
	}
	b, err := apdu.ParseHex(resp)
	if err != nil {
		c.t.Fatal(err)
	}
	return b, nil
}

func TestExchangeAPDU(t *testing.T) {
	tests := []struct {
		name    string
		cmd     string
		follow  bool
		steps   [][2]string
		resp    string // joined response, hex; "" = none
		wantErr string
	}{
		{"plain", "00A4000C023F00", true, [][2]string{{"00A4000C023F00", "9000"}}, "9000", ""},
		{"61xx followed", "00A4040007A0000000790100", true, [][2]string{
			{"00A4040007A0000000790100", "610D"},
			{"00C000000D", "6F0B8407A0000000790100A500 9000"},
		}, "6F0B8407A0000000790100A5009000", ""},
		{"61xx chain joins data", "80520000020102", true, [][2]string{
			{"80520000020102", "6104"},
			{"00C0000004", "01020304 6102"},
			{"00C0000002", "0506 9000"},
		}, "010203040506 9000", ""},
		{"6100 asks for 256", "00B0000000", true, [][2]string{
			{"00B0000000", "6100"},
			{"00C0000000", strings.Repeat("AA", 256) + "9000"},
		}, strings.Repeat("AA", 256) + "9000", ""},
		{"GET RESPONSE keeps the logical channel", "01A4040002A000", true, [][2]string{
			{"01A4040002A000", "6102"},
			{"01C0000002", "AB CD 9000"},
		}, "ABCD9000", ""},
		{"further interindustry class channel", "45A4040002A000", true, [][2]string{
			{"45A4040002A000", "6101"},
			{"45C0000001", "EE 9000"},
		}, "EE9000", ""},
		{"6Cxx resent with Le", "00CA010000", true, [][2]string{
			{"00CA010000", "6C05"},
			{"00CA010005", "0102030405 9000"},
		}, "0102030405 9000", ""},
		{"6Cxx adds Le to a case 1 command", "80CA0000", true, [][2]string{
			{"80CA0000", "6C02"},
			{"80CA000002", "0102 9000"},
		}, "01029000", ""},
		{"6Cxx then 61xx", "00CB3FFF035C017E00", true, [][2]string{
			{"00CB3FFF035C017E00", "6C20"},
			{"00CB3FFF035C017E20", "6102"},
			{"00C0000002", "7E00 9000"},
		}, "7E009000", ""},
		{"no follow", "00A4040007A0000000790100", false, [][2]string{
			{"00A4040007A0000000790100", "610D"},
		}, "610D", ""},
		{"error status passes through", "0020000108 3132333435363738", true, [][2]string{
			{"00200001083132333435363738", "63C2"},
		}, "63C2", ""},
		{"transmit fails", "00A4000C023F00", true, [][2]string{
			{"00A4000C023F00", "!"},
		}, "", "SCARD_W_REMOVED_CARD"},
		{"transmit fails during GET RESPONSE", "00A4000C023F00", true, [][2]string{
			{"00A4000C023F00", "6102"},
			{"00C0000002", "!"},
		}, "", "SCARD_W_REMOVED_CARD"},
		{"response without SW", "00A4000C023F00", true, [][2]string{
			{"00A4000C023F00", "90"},
		}, "", "shorter than a status word"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			card := &scriptCard{t: t, steps: tt.steps}
			cmd, err := apdu.ParseHex(tt.cmd)
			if err != nil {
				t.Fatal(err)
			}
			r, err := exchangeAPDU(card, cmd, tt.follow)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			if card.i != len(tt.steps) {
				t.Errorf("%d of %d scripted exchanges used", card.i, len(tt.steps))
			}
			got := fmt.Sprintf("%X", r.Response)
			if want := strings.ReplaceAll(tt.resp, " ", ""); got != want {
				t.Errorf("response %s, want %s", got, want)
			}
			if len(r.Steps) != len(tt.steps) {
				t.Errorf("%d steps recorded, want %d", len(r.Steps), len(tt.steps))
			}
		})
	}
}

// loopCard answers 61 01 forever: following must stop, with an error.
type loopCard struct{ n int }

func (c *loopCard) Transmit([]byte) ([]byte, error) { c.n++; return []byte{0x00, 0x61, 0x01}, nil }

func TestExchangeAPDUBounded(t *testing.T) {
	c := &loopCard{}
	r, err := exchangeAPDU(c, []byte{0x00, 0xB0, 0x00, 0x00, 0x00}, true)
	if err == nil || !strings.Contains(err.Error(), "stopped following") {
		t.Fatalf("err = %v, want the follow bound", err)
	}
	if c.n > maxFollow+1 || len(r.Response) > maxRespData+2 {
		t.Fatalf("%d exchanges, %d response bytes", c.n, len(r.Response))
	}
}

func TestPickReader(t *testing.T) {
	infos := []pcsc.ReaderInfo{
		{Name: "Virtual PCD 00 00", State: pcsc.StateEmpty},
		{Name: "Virtual PCD 00 01", State: pcsc.StatePresent | pcsc.StateInUse},
		{Name: "Yubico YubiKey OTP+FIDO+CCID 00 00", State: pcsc.StatePresent},
		{Name: "1", State: pcsc.StateEmpty}, // a name that looks like an index
	}
	tests := []struct {
		want, got, err string
	}{
		{"", "Virtual PCD 00 01", ""}, // first with a card
		{"Virtual PCD 00 00", "Virtual PCD 00 00", ""},
		{"0", "Virtual PCD 00 00", ""},
		{"2", "Yubico YubiKey OTP+FIDO+CCID 00 00", ""},
		{"1", "1", ""}, // the exact name wins over the index
		{"yubikey", "Yubico YubiKey OTP+FIDO+CCID 00 00", ""},
		{"Virtual", "", "matches 2 readers"},
		{"7", "", "no reader 7: there are 4"},
		{"-1", "", "no reader -1"},
		{"Gemalto", "", `no reader matches "Gemalto"`},
	}
	for _, tt := range tests {
		ri, err := pickReader(infos, tt.want)
		switch {
		case tt.err != "":
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("pickReader(%q) = %q, %v; want error %q", tt.want, ri.Name, err, tt.err)
			}
		case err != nil || ri.Name != tt.got:
			t.Errorf("pickReader(%q) = %q, %v; want %q", tt.want, ri.Name, err, tt.got)
		}
	}
	if _, err := pickReader(infos[:1], ""); err == nil || !strings.Contains(err.Error(), "no card in any reader") {
		t.Errorf("no card: %v", err)
	}
	if _, err := pickReader(nil, ""); err == nil || !strings.Contains(err.Error(), "no PC/SC readers") {
		t.Errorf("no readers: %v", err)
	}
}

func TestGetResponseCLA(t *testing.T) {
	for _, tt := range []struct{ in, out byte }{
		{0x00, 0x00}, {0x03, 0x03}, {0x0C, 0x00}, {0x80, 0x00}, {0x84, 0x00}, {0x40, 0x40}, {0x4F, 0x4F}, {0x6A, 0x4A},
	} {
		if got := getResponseCLA(tt.in); got != tt.out {
			t.Errorf("getResponseCLA(%02X) = %02X, want %02X", tt.in, got, tt.out)
		}
	}
}

func TestSWMeaning(t *testing.T) {
	for sw, want := range map[apdu.SW]string{
		0x9000: "success", 0x6A82: "file or application not found", 0x63C2: "2 tries left",
		0x6110: "16 more bytes", 0x6C08: "use 8", 0x6999: "checking error", 0x1234: "unknown status",
	} {
		if got := swMeaning(sw); !strings.Contains(got, want) {
			t.Errorf("swMeaning(%v) = %q, want %q", sw, got, want)
		}
	}
}

func TestPrintResult(t *testing.T) {
	var b strings.Builder
	printResult(&b, apduResult{
		Command: []byte{0x00, 0xB0, 0x00, 0x00, 0x00},
		Steps: []step{
			{Sent: []byte{0x00, 0xB0, 0x00, 0x00, 0x00}, Received: []byte{0x61, 0x11}},
			{Sent: []byte{0x00, 0xC0, 0x00, 0x00, 0x11}, Received: append([]byte("0123456789ABCDEFG"), 0x90, 0x00)},
		},
		Response: append([]byte("0123456789ABCDEFG"), 0x90, 0x00),
	})
	want := "> 00 B0 00 00 00\n" +
		"< 61 11\n" +
		"> 00 C0 00 00 11\n" +
		"< 30 31 32 33 34 35 36 37 38 39 41 42 43 44 45 46 47 90 00\n" +
		"= 90 00 (success), 17 bytes\n" +
		"    0000  30 31 32 33 34 35 36 37 38 39 41 42 43 44 45 46  |0123456789ABCDEF|\n" +
		"    0010  47                                               |G|\n"
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}

// TestAPDUUsage: command-line mistakes exit 2 before pcscd is contacted;
// a missing pcscd exits 1 and says how to start it.
func TestAPDUUsage(t *testing.T) {
	t.Setenv("PCSCLITE_CSOCK_NAME", filepath.Join(t.TempDir(), "no-pcscd.comm"))
	tests := []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"apdu"}, exitUsage, "no APDU given"},
		{[]string{"apdu", "00A4XX"}, exitUsage, "is not hex"},
		{[]string{"apdu", "00A4000C023F00", "00A4"}, exitUsage, "APDU 2"},
		{[]string{"apdu", "00A4000C0501"}, exitUsage, "malformed"},
		{[]string{"apdu", "--bogus", "00A4000C023F00"}, exitUsage, "bogus"},
		{[]string{"apdu", "00A4000C023F00"}, exitError, "systemctl start pcscd.socket"},
		{[]string{"apdu", "00A4000C023F00", "--reader", "0"}, exitError, "PCSCLITE_CSOCK_NAME"},
		{[]string{"readers"}, exitError, "pcscd is not running"},
		{[]string{"readers", "--watch"}, exitError, "systemctl start pcscd.socket"},
		{[]string{"readers", "extra"}, exitUsage, "unexpected argument"},
	}
	for _, tt := range tests {
		code, _, stderr := runCLI(t, "", tt.args...)
		if code != tt.code || !strings.Contains(stderr, tt.msg) {
			t.Errorf("vscard %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tt.args, " "), code, stderr, tt.code, tt.msg)
		}
	}
}
