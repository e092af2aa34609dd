package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vscard/vscard/internal/pcscdtest"
	"github.com/vscard/vscard/internal/vicc"
)

// cacATR is what `vscard serve` answers (cac.md §1.1).
const cacATR = "3B7A18000073667465206364313434"

// twoCards puts vicc (a card nobody here wrote) in slot 0 and a vscard CAC
// card in slot 1, the layout of issue 5's CLI acceptance tests.
func twoCards(t *testing.T) (*env, *vicc.Proc) {
	t.Helper()
	e := newEnv(t)
	p := vicc.Start(t, vpcdPort(t, 0), readerName0)
	e.serve([]card{{dir: e.newCard("cac"), slot: 1}})
	return e, p
}

type readerOut struct {
	Index int    `json:"index"`
	Name  string `json:"name"`
	State string `json:"state"`
	Card  bool   `json:"card"`
	ATR   string `json:"atr"`
}

func (e *env) vscardReaders() []readerOut {
	e.t.Helper()
	out, stderr, err := e.stdout(vscardBin, "readers", "--json")
	if err != nil {
		e.t.Fatalf("vscard readers --json: %v\n%s", err, stderr)
	}
	var rs []readerOut
	if err := json.Unmarshal(out, &rs); err != nil {
		e.t.Fatalf("vscard readers --json: %v\n%s", err, out)
	}
	return rs
}

// openscATRRe matches the ATR line of `opensc-tool -r N --atr`.
var openscATRRe = regexp.MustCompile(`(?m)^([0-9a-fA-F]{2}(?::[0-9a-fA-F]{2})+)\s*$`)

// TestReadersAgreeWithOpenSC: `vscard readers` names the same readers in
// the same order as `opensc-tool --list-readers`, with the same card
// presence, and the ATRs opensc-tool reads; `vscard atr` decodes each.
func TestReadersAgreeWithOpenSC(t *testing.T) {
	e, _ := twoCards(t)
	ours := e.vscardReaders()

	var theirs []struct {
		name string
		card bool
	}
	for _, line := range strings.Split(e.must("opensc-tool", "--list-readers"), "\n") {
		if m := readerRe.FindStringSubmatch(line); m != nil {
			theirs = append(theirs, struct {
				name string
				card bool
			}{m[2], m[1] == "Yes"})
		}
	}
	if len(ours) != len(theirs) || len(ours) != 2 {
		t.Fatalf("vscard readers: %+v\nopensc-tool --list-readers: %+v", ours, theirs)
	}
	wantATR := []string{strings.ReplaceAll(vicc.ISO7816ATR, " ", ""), cacATR}
	wantProto := []int{1, 0} // vicc offers T=1, the CAC ATR only T=0
	for i, r := range ours {
		if r.Index != i || r.Name != theirs[i].name || r.Card != theirs[i].card || !r.Card {
			t.Errorf("reader %d: vscard %+v, opensc-tool %+v", i, r, theirs[i])
		}
		out := e.must("opensc-tool", "-r", strconv.Itoa(i), "--atr")
		m := openscATRRe.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("no ATR in opensc-tool -r %d --atr:\n%s", i, out)
		}
		if got := strings.ToUpper(strings.ReplaceAll(m[1], ":", "")); got != r.ATR || r.ATR != wantATR[i] {
			t.Errorf("reader %d ATR: vscard %s, opensc-tool %s, want %s", i, r.ATR, got, wantATR[i])
		}

		// The text listing shows the same.
		if text := e.vscard("readers"); text.code != 0 || !strings.Contains(text.out, r.Name) ||
			!strings.Contains(text.out, spaced(r.ATR)) {
			t.Errorf("vscard readers (text) lacks %q / %s:\n%s", r.Name, spaced(r.ATR), text)
		}

		atr, stderr, err := e.stdout(vscardBin, "atr", "--json", r.ATR)
		if err != nil {
			t.Fatalf("vscard atr %s: %v\n%s", r.ATR, err, stderr)
		}
		var dec struct {
			ATR       string `json:"atr"`
			Protocols []int  `json:"protocols"`
		}
		if err := json.Unmarshal(atr, &dec); err != nil {
			t.Fatalf("vscard atr --json: %v\n%s", err, atr)
		}
		if dec.ATR != r.ATR || len(dec.Protocols) != 1 || dec.Protocols[0] != wantProto[i] {
			t.Errorf("vscard atr %s: %s", r.ATR, atr)
		}
		if text := e.vscard("atr", spaced(r.ATR)); text.code != 0 || !strings.Contains(text.out, "Historical bytes") {
			t.Errorf("vscard atr (text):\n%s", text)
		}
	}
}

func spaced(h string) string {
	var parts []string
	for i := 0; i+2 <= len(h); i += 2 {
		parts = append(parts, h[i:i+2])
	}
	return strings.Join(parts, " ")
}

// TestAPDUAgreesWithOpenSC sends the same APDU lists with `vscard apdu`
// and `opensc-tool -s` to both cards and requires byte-identical final
// responses.
//
// One difference between the tools is by design: for a command without Le
// opensc-tool drops the data a 61xx announces (OpenSC's sc_get_response
// turns it into 90 00 when le == 0), while vscard fetches it. So where a
// 61xx is to be followed, opensc-tool gets the command with Le=00, which on
// this T=0 card it sends without Le (case 4 becomes case 3 under T=0) and
// then follows the card's 61xx itself; vscard gets the case-3 form and
// follows the same 61xx. Both then see the card's data and 90 00.
func TestAPDUAgreesWithOpenSC(t *testing.T) {
	e, _ := twoCards(t)
	type pair struct{ vscard, opensc string }
	same := func(a string) pair { return pair{a, a} }
	lists := []struct {
		reader int
		apdus  []pair
		// follow is the index of an APDU whose vscard exchange must show
		// a 61xx followed by GET RESPONSE (-1: none).
		follow int
	}{
		{0, []pair{ // vicc -t iso7816 (peers.md appendix "running vicc")
			same("00A4000C023F00"),           // SELECT MF → 90 00
			same("00A4040007A0000000790100"), // unknown AID → 6A 82
			same("00A4000C023F00"),
		}, -1},
		{1, []pair{ // vscard's CAC card, T=0
			same("00A4040007A000000079010000"),                         // SELECT PKI applet 0 with Le
			{"00A4040007A0000000790100", "00A4040007A000000079010000"}, // ... without Le: 61 0D followed
			{"80520000020102", "8052000002010200"},                     // READ BUFFER (T length): 61 xx followed
			same("00A4040007A0000000FFFF00"),                           // unknown AID → 6A 82
		}, 1},
	}
	for _, l := range lists {
		t.Run(fmt.Sprintf("reader%d", l.reader), func(t *testing.T) {
			var va, oa []string
			for _, p := range l.apdus {
				va = append(va, p.vscard)
				oa = append(oa, "-s", p.opensc)
			}
			out, stderr, err := e.stdout(vscardBin, append([]string{"apdu", "--json", "--reader", strconv.Itoa(l.reader)}, va...)...)
			if err != nil {
				t.Fatalf("vscard apdu: %v\n%s\n%s", err, stderr, out)
			}
			var ours []struct {
				Command   string `json:"command"`
				Response  string `json:"response"`
				Exchanges []struct {
					Sent     string `json:"sent"`
					Received string `json:"received"`
				} `json:"exchanges"`
			}
			if err := json.Unmarshal(out, &ours); err != nil {
				t.Fatalf("vscard apdu --json: %v\n%s", err, out)
			}
			r := e.run("opensc-tool", append([]string{"-r", strconv.Itoa(l.reader)}, oa...)...)
			if r.code != 0 {
				t.Fatalf("opensc-tool failed:\n%s", r)
			}
			theirs, err := parseOpenSCResponses(r.out)
			if err != nil {
				t.Fatalf("%v\n%s", err, r)
			}
			if len(ours) != len(l.apdus) || len(theirs) != len(l.apdus) {
				t.Fatalf("%d vscard and %d opensc-tool responses for %d APDUs\n%s\n%s", len(ours), len(theirs), len(l.apdus), out, r.out)
			}
			for i := range l.apdus {
				if ours[i].Response != theirs[i] {
					t.Errorf("APDU %d: vscard %s → %s; opensc-tool %s → %s", i, l.apdus[i].vscard, ours[i].Response, l.apdus[i].opensc, theirs[i])
				}
				if !strings.HasSuffix(ours[i].Response, "9000") && !strings.HasSuffix(ours[i].Response, "6A82") {
					t.Errorf("APDU %d: status of %s is neither 90 00 nor 6A 82", i, ours[i].Response)
				}
			}
			if l.follow >= 0 {
				ex := ours[l.follow].Exchanges
				if len(ex) != 2 || !strings.HasPrefix(ex[0].Received, "61") || !strings.HasPrefix(ex[1].Sent, "00C00000") ||
					!strings.HasSuffix(ours[l.follow].Response, "9000") {
					t.Errorf("APDU %d: want 61xx then GET RESPONSE, got %+v", l.follow, ex)
				}
			}
			// The text form shows the same exchanges.
			text := e.vscard(append([]string{"apdu", "--reader", strconv.Itoa(l.reader)}, va...)...)
			if text.code != 0 || strings.Count(text.out, "\n> ") < len(va)-1 || !strings.Contains(text.out, "= ") {
				t.Errorf("vscard apdu (text):\n%s", text)
			}
		})
	}

	t.Run("no-follow", func(t *testing.T) {
		r := e.vscard("apdu", "--reader", "Virtual PCD 00 01", "--no-follow", "00A4040007A0000000790100")
		if r.code != 0 || !strings.Contains(r.out, "< 61 0D") || strings.Contains(r.out, "> 00 C0") {
			t.Errorf("--no-follow:\n%s", r)
		}
	})
	t.Run("default-reader-is-first-with-card", func(t *testing.T) {
		r := e.vscard("apdu", "00A4000C023F00")
		if r.code != 0 || !strings.Contains(r.out, `"`+readerName0+`"`) {
			t.Errorf("default reader:\n%s", r)
		}
	})
	t.Run("unknown-reader", func(t *testing.T) {
		r := e.vscard("apdu", "--reader", "7", "00A4000C023F00")
		if r.code != 1 || !strings.Contains(r.out, "no reader 7") {
			t.Errorf("--reader 7:\n%s", r)
		}
	})
}

// receivedRe matches opensc-tool's "Received (SW1=0x90, SW2=0x00)" line.
var receivedRe = regexp.MustCompile(`^Received \(SW1=0x([0-9A-Fa-f]{2}), SW2=0x([0-9A-Fa-f]{2})\):?$`)

// parseOpenSCResponses reads `opensc-tool -s` output: each response is the
// data of the hex dump after its "Received" line, then SW1 SW2, as hex.
//
// OpenSC's util_hex_dump_asc prints 16 bytes a line as "XX " each, then
// the ASCII column; only lines after the first are padded to 48 columns.
// So a first line holding n bytes is 4n characters long, and a later one
// 48+n: the byte count comes from the length, never from guessing where
// the hex ends (the ASCII column may itself look like hex).
func parseOpenSCResponses(out string) ([]string, error) {
	var res []string
	lines := strings.Split(out, "\n")
	for i := 0; i < len(lines); i++ {
		m := receivedRe.FindStringSubmatch(strings.TrimRight(lines[i], "\r"))
		if m == nil {
			continue
		}
		var data []byte
		start := i + 1
		for j := start; j < len(lines); j++ {
			l := lines[j]
			if l == "" || strings.HasPrefix(l, "Sending:") || strings.HasPrefix(l, "Received") {
				break
			}
			var n int
			switch {
			case j == start:
				if len(l)%4 != 0 {
					return nil, fmt.Errorf("opensc-tool dump line %q: length %d not 4n", l, len(l))
				}
				n = len(l) / 4
			case len(l) >= 48:
				n = len(l) - 48
			default:
				return nil, fmt.Errorf("opensc-tool dump line %q too short", l)
			}
			if n > 16 {
				return nil, fmt.Errorf("opensc-tool dump line %q: %d bytes", l, n)
			}
			b, err := hex.DecodeString(strings.ReplaceAll(l[:3*n], " ", ""))
			if err != nil {
				return nil, fmt.Errorf("opensc-tool dump line %q: %v", l, err)
			}
			data = append(data, b...)
			i = j
		}
		res = append(res, strings.ToUpper(hex.EncodeToString(data)+m[1]+m[2]))
	}
	return res, nil
}

func TestParseOpenSCResponses(t *testing.T) {
	out := "Using reader with a card: Virtual PCD 00 01\n" +
		"Sending: 00 A4 04 00 07 A0 00 00 00 79 01 00 \n" +
		"Received (SW1=0x90, SW2=0x00)\n" +
		"Sending: 00 A4 04 00 07 A0 00 00 00 79 01 00 00 \n" +
		"Received (SW1=0x90, SW2=0x00):\n" +
		"6F 0B 84 07 A0 00 00 00 79 01 00 A5 00 o.......y....\n" +
		"Sending: 00 B0 00 00 00 \n" +
		"Received (SW1=0x62, SW2=0x82):\n" +
		"41 42 20 43 44 41 42 20 43 44 41 42 20 43 44 41 AB CDAB CDAB CDA\n" +
		fmt.Sprintf("%-48sB C\n", "42 20 43 ")
	got, err := parseOpenSCResponses(out)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"9000", "6F0B8407A0000000790100A5009000", "41422043444142204344414220434441" + "422043" + "6282"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("got %q\nwant %q", got, want)
	}
}

// TestReadersWatchViccHotplug: `vscard readers --watch --json` reports
// stopping vicc as a card removal and starting it as an insertion with
// vicc's ATR, and ends with status 0 on SIGINT.
func TestReadersWatchViccHotplug(t *testing.T) {
	e, p := twoCards(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, vscardBin, "readers", "--watch", "--json")
	cmd.Env = e.environ()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	events := make(chan map[string]string, 64)
	go func() {
		defer close(events)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var ev map[string]string
			if json.Unmarshal(sc.Bytes(), &ev) == nil {
				events <- ev
			} else {
				events <- map[string]string{"event": "unparsable", "detail": sc.Text()}
			}
		}
	}()
	var seen []map[string]string
	waitFor := func(what, reader string) map[string]string {
		t.Helper()
		timeout := time.After(20 * time.Second)
		for {
			select {
			case ev, ok := <-events:
				if !ok {
					t.Fatalf("watch ended before %s on %s; events %v; stderr:\n%s", what, reader, seen, stderr.String())
				}
				seen = append(seen, ev)
				if ev["event"] == what && ev["reader"] == reader {
					return ev
				}
			case <-timeout:
				t.Fatalf("no %s on %s within 20 s; events %v; stderr:\n%s", what, reader, seen, stderr.String())
			}
		}
	}
	first := waitFor("reader", readerName0)
	if first["state"] != "present" {
		t.Errorf("initial state of %s: %v", readerName0, first)
	}
	waitFor("reader", readerName1)

	for round := 0; round < 2; round++ {
		p.Stop()
		waitFor("card_removed", readerName0)
		p.Start()
		ev := waitFor("card_inserted", readerName0)
		if ev["atr"] != strings.ReplaceAll(vicc.ISO7816ATR, " ", "") {
			t.Errorf("inserted ATR %q, want vicc's", ev["atr"])
		}
	}
	for _, ev := range seen {
		if ev["reader"] == readerName1 && ev["event"] != "reader" {
			t.Errorf("event on the CAC reader, which did not change: %v", ev)
		}
	}

	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	for range events {
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("vscard readers --watch after SIGINT: %v, want exit 0; stderr:\n%s", err, stderr.String())
	}
	if !strings.Contains(stderr.String(), "Waiting for card insertion/removal") {
		t.Errorf("--watch did not say what it waits for; stderr:\n%s", stderr.String())
	}
}

// restartScript runs in a mount namespace of its own, with a pcscd of its
// own (the run's pcscd must not be stopped under the other tests): start
// pcscd, start `vscard readers --watch --json`, stop pcscd, start it
// again, then insert and remove a vicc card. Arguments: work directory,
// vscard binary, vpcd port, then vicc's command line.
const restartScript = `set -eu
work=$1 vscard=$2 port=$3; shift 3
pd= w= v=
trap 'for p in $v $w $pd; do kill $p 2>/dev/null || true; done' EXIT
mount -t tmpfs -o mode=0755 tmpfs /run/pcscd
mkdir -p "$work/conf"
hex=$(printf '0x%04X' "$port")
lib=/usr/lib/pcsc/drivers/serial/libifdvpcd.so
[ -r /etc/reader.conf.d/vpcd ] && l=$(awk '$1 == "LIBPATH" { print $2 }' /etc/reader.conf.d/vpcd) && [ -n "$l" ] && lib=$l
printf 'FRIENDLYNAME "Virtual PCD"\nDEVICENAME /dev/null:%s\nLIBPATH %s\nCHANNELID %s\n' "$hex" "$lib" "$hex" >"$work/conf/vpcd"
start_pcscd() {
  pcscd -f -c "$work/conf" >>"$work/pcscd.log" 2>&1 & pd=$!
  for _ in $(seq 100); do [ -S /run/pcscd/pcscd.comm ] && return 0; sleep 0.1; done
  echo "pcscd did not start" >&2; return 1
}
wait_for() {
  for _ in $(seq 300); do grep -q "$1" "$work/watch.out" && return 0; sleep 0.1; done
  echo "timed out waiting for $1 in the watch output" >&2; return 1
}
start_pcscd
"$vscard" readers --watch --json >"$work/watch.out" 2>"$work/watch.err" & w=$!
wait_for '"event":"reader"'
kill "$pd"; wait "$pd" || true; pd=
wait_for '"event":"pcscd_lost"'
start_pcscd
wait_for '"event":"pcscd_back"'
"$@" >"$work/vicc.log" 2>&1 & v=$!
wait_for '"event":"card_inserted"'
kill "$v"; wait "$v" || true; v=
wait_for '"event":"card_removed"'
kill -TERM "$w"; rc=0; wait "$w" || rc=$?; w=
echo "watch exit $rc"
`

// TestReadersWatchSurvivesPcscdRestart: --watch reports losing pcscd,
// reconnects when it is back, and then reports card events from the new
// daemon as before.
func TestReadersWatchSurvivesPcscdRestart(t *testing.T) {
	e := newEnv(t)
	needTools(t, "unshare", "pcscd")
	if err := vicc.Available(); err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	venv, err := vicc.Env(work)
	if err != nil {
		t.Fatal(err)
	}
	port, err := pcscdtest.FreePortPair()
	if err != nil {
		t.Fatal(err)
	}
	script := e.path("restart.sh")
	if err := os.WriteFile(script, []byte(restartScript), 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	args := append([]string{"--mount", "--propagation", "private", "bash", script, work, vscardBin, strconv.Itoa(port)},
		vicc.Argv("iso7816", port)...)
	cmd := exec.CommandContext(ctx, "unshare", args...)
	cmd.Env = append(venv, "HOME="+e.home, "PATH="+os.Getenv("PATH")+":/usr/sbin:/sbin")
	out, err := cmd.CombinedOutput()
	watchOut, _ := os.ReadFile(work + "/watch.out")
	watchErr, _ := os.ReadFile(work + "/watch.err")
	if err != nil || !strings.Contains(string(out), "watch exit 0") {
		pcscdLog, _ := os.ReadFile(work + "/pcscd.log")
		t.Fatalf("restart script: %v\n%s\nwatch stdout:\n%s\nwatch stderr:\n%s\npcscd log:\n%s", err, out, watchOut, watchErr, tail(pcscdLog, 4<<10))
	}
	var order []string
	for _, line := range strings.Split(strings.TrimSpace(string(watchOut)), "\n") {
		var ev map[string]string
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Fatalf("watch line %q: %v", line, err)
		}
		if ev["event"] != "reader" || len(order) == 0 || order[len(order)-1] != "reader" {
			order = append(order, ev["event"])
		}
		if ev["event"] == "card_inserted" && ev["atr"] != strings.ReplaceAll(vicc.ISO7816ATR, " ", "") {
			t.Errorf("inserted ATR %q, want vicc's", ev["atr"])
		}
	}
	want := "reader pcscd_lost pcscd_back card_inserted card_removed"
	if strings.Join(order, " ") != want {
		t.Errorf("events %q, want %q\n%s", order, want, watchOut)
	}
	if n := strings.Count(string(watchErr), "Waiting for"); n < 2 {
		t.Errorf("--watch said what it waits for %d times, want before and after the restart:\n%s", n, watchErr)
	}
}
