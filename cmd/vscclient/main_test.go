package main

import (
	"bytes"
	"context"
	"errors"
	"github.com/vscard/vscard/internal/fakehost"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vscard/vscard/internal/emuopts"
	"github.com/vscard/vscard/token/store"
)

func TestParseArgs(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want *config
		err  string
	}{
		{args: []string{"-e", "use_hw=no", "127.0.0.1", "2001"},
			want: &config{emul: "use_hw=no", emulGiven: true, host: "127.0.0.1", port: "2001"}},
		{args: []string{"-c", "a", "-cb", "-d3", "host", "-p", "1"},
			want: &config{certs: []string{"a", "b"}, debug: 3, pcsc: true, host: "host", port: "1"}},
		{args: []string{"-pd", "x", "h", "p"}, want: &config{debug: 1, pcsc: true, host: "h", port: "p"}},
		{args: []string{"-d", "12abc", "--", "-h", "p"}, want: &config{debug: 12, host: "-h", port: "p"}},
		{args: []string{"--no-qemu54-workaround", "h", "p"}, want: &config{noWorkaround: true, host: "h", port: "p"}},
		{args: []string{"h"}, err: "got 1 arguments"},
		{args: []string{"h", "p", "q"}, err: "got 3 arguments"},
		{args: []string{"-x", "h", "p"}, err: "invalid option -- 'x'"},
		{args: []string{"h", "p", "-e"}, err: "requires an argument -- 'e'"},
	} {
		got, err := parseArgs(tc.args)
		if tc.err != "" {
			var ue *usageError
			if !errors.As(err, &ue) || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("parseArgs(%q) = %v, want usage error %q", tc.args, err, tc.err)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("parseArgs(%q) = %+v, %v; want %+v", tc.args, got, err, tc.want)
		}
	}
}

func TestEmulString(t *testing.T) {
	for _, tc := range []struct {
		cfg  config
		want string
	}{
		{config{emul: `db="/d" use_hw=no`, emulGiven: true}, `db="/d" use_hw=no`},
		{config{certs: []string{"id", "signing"}}, `db="/etc/pki/nssdb",soft=(,Virtual Reader,CAC,,id,signing,)`},
		{config{certs: []string{"a"}, emul: `db="/x"`, emulGiven: true}, `db="/x",soft=(,Virtual Reader,CAC,,a,)`},
	} {
		if got := emulString(&tc.cfg); got != tc.want {
			t.Errorf("emulString(%+v) = %q, want %q", tc.cfg, got, tc.want)
		}
		if _, err := emuopts.Parse(emulString(&tc.cfg)); err != nil {
			t.Errorf("%q does not parse: %v", emulString(&tc.cfg), err)
		}
	}
}

func TestRunExitCodes(t *testing.T) {
	many := []string{}
	for range 101 {
		many = append(many, "-c", "x")
	}
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"host"}, exitUsage, "usage"},
		{append(many, "h", "1"), exitTooMany, "too many certs (max = 100)"},
		{[]string{"-p", "h", "1"}, exitError, "hardware PKCS#11 tokens as emulated CAC cards is out of scope"},
		{[]string{"-p", "-e", "passthru", "h", "1"}, exitError, "with passthru the physical card is the one served"},
		{[]string{"-e", "nssemul", "h", "1"}, exitError, "use -e passthru"},
		{[]string{"-e", "bogus", "h", "1"}, exitError, `Error: Unknown smartcard specification. ("bogus")`},
		{[]string{"-h"}, exitOK, "stdin commands"},
	} {
		var out bytes.Buffer
		code := run(context.Background(), tc.args, strings.NewReader(""), &out, &out)
		if code != tc.code || !strings.Contains(out.String(), tc.want) {
			t.Errorf("vscclient %q: exit %d, %q; want %d and %q", tc.args, code, out.String(), tc.code, tc.want)
		}
	}
}

var (
	cardOnce sync.Once
	cardDir  string
	cardErr  error
)

// testStore makes one card store for the package's tests.
func testStore(t *testing.T) string {
	t.Helper()
	cardOnce.Do(func() {
		d, err := os.MkdirTemp("", "vscclient-test")
		if err != nil {
			cardErr = err
			return
		}
		cardDir = filepath.Join(d, "card")
		_, cardErr = store.Create(cardDir, store.Options{PIN: "123456", KeyType: "rsa1024"})
	})
	if cardErr != nil {
		t.Fatal(cardErr)
	}
	return cardDir
}

func TestSelectCard(t *testing.T) {
	dir := testStore(t)
	nssDir := t.TempDir()
	os.WriteFile(filepath.Join(nssDir, "cert9.db"), nil, 0o600)
	empty := t.TempDir()
	log := slog.New(slog.DiscardHandler)
	for _, tc := range []struct {
		emul     string
		labels   []string
		reader   string
		passthru bool
		err      string
	}{
		{emul: `db="` + dir + `" use_hw=no soft=(,Test,CAC,,id,sign,enc)`, labels: []string{"id", "signing", "encryption"}, reader: "Test"},
		{emul: `db="sql:` + dir + `" use_hw=no soft=(,Virtual Reader,CAC,,encryption-cert,id-cert)`, labels: []string{"encryption", "id"}, reader: "Virtual Reader"},
		{emul: `db="` + dir + `" use_hw=no soft=(,R,cac,,cert2,)`, labels: []string{"signing"}, reader: "R"},
		// Without use_hw=, soft cards are served (hardware tokens are not mapped).
		{emul: `db="` + dir + `" soft=(,R,CAC,,signing)`, labels: []string{"signing"}, reader: "R"},
		{emul: `db="` + dir + `" use_hw=no soft=(,R,CAC,,id,nope)`, err: `no certificate "nope"; the card has id, signing, encryption`},
		{emul: `db="` + dir + `" use_hw=no soft=(,R,CAC,,id,identity)`, err: "same as"},
		{emul: `db="` + dir + `" use_hw=no soft=(,R,CAC,,,)`, err: "no certificate names"},
		// An empty cert9.db is an NSS database to open, and a broken one.
		{emul: `db="sql:` + nssDir + `" use_hw=no soft=(,R,CAC,,id)`, err: `db "sql:` + nssDir + `"`},
		{emul: `db="` + empty + `" use_hw=no soft=(,R,CAC,,id)`, err: "neither an NSS database (no cert9.db) nor a vscard card store"},
		{emul: `db="/nonexistent/x" use_hw=no soft=(,R,CAC,,id)`, err: "no such directory"},
		{emul: `use_hw=no`, err: "no soft=(...) card given"},
		{emul: ``, err: "no soft=(...) card given (libcacard's default use_hw=yes maps hardware PKCS#11 tokens): mirroring hardware PKCS#11 tokens as emulated CAC cards is out of scope"},
		{emul: `use_hw=yes soft=(,R,CAC,,id)`, err: "use_hw=yes hw_type=CAC: mirroring hardware PKCS#11 tokens"},
		{emul: `use_hw=removable`, err: "use_hw=removable hw_type=CAC: mirroring hardware PKCS#11 tokens"},
		{emul: `nssemul`, err: "use -e passthru (use_hw=yes hw_type=PASSTHRU)"},
		{emul: `use_hw=removable hw_type=PASSTHRU`, err: "out of scope"},
		{emul: `passthru`, passthru: true},
		{emul: `use_hw=yes hw_type=PASSTHRU`, passthru: true},
		{emul: `hw_type=passthru`, passthru: true},
		{emul: `db="` + dir + `" passthru soft=(,R,CAC,,id)`, err: "does not go with soft=(...)"},
		{emul: `db="` + dir + `" use_hw=no soft=(,R,PASSTHRU,,id)`, err: "a soft card is a CAC card"},
	} {
		o, err := emuopts.Parse(tc.emul)
		if err != nil {
			t.Fatal(err)
		}
		sc, err := selectCard(o, log)
		if tc.passthru != errors.Is(err, errPassthru) {
			t.Errorf("%s: %v; want passthru %v", tc.emul, err, tc.passthru)
			continue
		}
		if tc.passthru {
			continue
		}
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: %v, want error %q", tc.emul, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.emul, err)
			continue
		}
		if !reflect.DeepEqual(sc.labels, tc.labels) || sc.reader != tc.reader || sc.tok.PIN() == nil {
			t.Errorf("%s: labels %q reader %q, want %q %q", tc.emul, sc.labels, sc.reader, tc.labels, tc.reader)
		}
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s: not within 10 s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestSession runs vscclient against the fake host with a card store and
// drives it through stdin like a user of libcacard's vscclient would.
func TestSession(t *testing.T) {
	dir := testStore(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	host, port, _ := net.SplitHostPort(ln.Addr().String())
	stdinR, stdinW := io.Pipe()
	defer stdinW.Close()
	var stdout, stderr syncBuffer
	done := make(chan int, 1)
	go func() {
		done <- run(context.Background(), []string{"-e", `db="sql:` + dir + `" use_hw=no soft=(,Test,CAC,,id,sign,enc)`, host, port},
			stdinR, &stdout, &stderr)
	}()
	h := fakehost.Accept(t, ln)
	atr := h.Handshake("Test")
	if got := h.APDU(fakehost.SelectACA); !bytes.Equal(got, []byte{0x61, 0x0D}) {
		t.Errorf("SELECT ACA: % x, want 61 0d", got)
	}
	cmd := func(line, want string) {
		t.Helper()
		before := len(stdout.String())
		io.WriteString(stdinW, line+"\n")
		waitFor(t, "answer to "+line, func() bool { return strings.Contains(stdout.String()[before:], want) })
	}
	cmd("list", "  0 CARD_PRESENT Test")
	cmd("remove", "card removed")
	h.Expect(fakehost.TCardRemove)
	cmd("remove 0", "error: no card inserted")
	cmd("list", "  0              Test")
	cmd("insert 0", "card inserted")
	if got := h.Expect(fakehost.TATR).Payload; !bytes.Equal(got, atr) {
		t.Errorf("ATR after insert % x, want % x", got, atr)
	}
	cmd("insert 7", "error: no reader with id 7")
	cmd("select 0", "Selecting reader 0")
	cmd("debug 2", "debug level = 2")
	cmd("help", "commands: insert [id]")
	cmd("exit", "> ")
	h.Expect(fakehost.TCardRemove)
	h.Expect(fakehost.TReaderRemove)
	h.ExpectClose()
	select {
	case code := <-done:
		if code != exitOK {
			t.Errorf("exit %d\n%s", code, stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("vscclient did not exit after exit")
	}
}

// TestSIGTERM runs the built command: SIGTERM must deliver CardRemove and
// ReaderRemove and exit 0, and a closed stdin must neither end the
// process nor make it spin.
func TestSIGTERM(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the command")
	}
	dir := testStore(t)
	bin := filepath.Join(t.TempDir(), "vscclient")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	host, port, _ := net.SplitHostPort(ln.Addr().String())
	var stderr syncBuffer
	cmd := exec.Command(bin, "-c", "id", "-c", "signing", "-e", `db="`+dir+`"`, host, port)
	cmd.Stdin = nil // /dev/null: EOF at once
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	h := fakehost.Accept(t, ln)
	h.Handshake("Virtual Reader")
	if got := h.APDU(fakehost.SelectACA); !bytes.Equal(got, []byte{0x61, 0x0D}) {
		t.Errorf("SELECT ACA: % x", got)
	}
	// stdin is at EOF: measure the CPU the process uses while idle.
	before := cpuTime(t, cmd.Process.Pid)
	time.Sleep(500 * time.Millisecond)
	if used := cpuTime(t, cmd.Process.Pid) - before; used > 100*time.Millisecond {
		t.Errorf("idle with stdin at EOF: %v of CPU in 500 ms (busy loop?)", used)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	h.Expect(fakehost.TCardRemove)
	h.Expect(fakehost.TReaderRemove)
	h.ExpectClose()
	if err := cmd.Wait(); err != nil {
		t.Errorf("exit after SIGTERM: %v\n%s", err, stderr.String())
	}
}

// cpuTime reads a process's user+system time from /proc (Linux).
func cpuTime(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	var ticks int64
	for _, v := range f[11:13] { // utime, stime (fields 14 and 15)
		var n int64
		for _, c := range v {
			n = n*10 + int64(c-'0')
		}
		ticks += n
	}
	return time.Duration(ticks) * 10 * time.Millisecond // USER_HZ = 100
}
