package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vscard/vscard/internal/pcscdtest"
)

const (
	// testPIN is the user PIN of every card the tests make.
	testPIN = "12345678"
	// wrongPIN differs from testPIN but has a valid length (4..8 digits,
	// cac.md §8.3), so the card, not OpenSC's length check, rejects it.
	wrongPIN = "87654321"

	// readerName is pcscd's name for vpcd slot n (peers.md §2.1).
	readerName0 = "Virtual PCD 00 00"
	readerName1 = "Virtual PCD 00 01"

	cmdTimeout = 3 * time.Minute
)

// Paths filled in by TestMain.
var (
	vscardBin string // the binary under test, built once
	e2eOn     = os.Getenv("VSCARD_E2E") == "1"
)

func TestMain(m *testing.M) {
	if !e2eOn {
		os.Exit(m.Run()) // every test skips with an explanation
	}
	dir, err := os.MkdirTemp("", "vscard-e2e-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
	vscardBin = filepath.Join(dir, "vscard")
	if err := buildVscard(vscardBin); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: building vscard:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// buildVscard builds ./cmd/vscard of the module this package lives in.
func buildVscard(out string) error {
	root, err := pcscdtest.ModuleRoot()
	if err != nil {
		return err
	}
	cmd := exec.Command("go", "build", "-o", out, "./cmd/vscard")
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/vscard: %w\n%s", err, b)
	}
	return nil
}

// requireE2E skips t outside a with-pcscd run.
func requireE2E(t *testing.T) {
	t.Helper()
	if !e2eOn {
		t.Skip("end-to-end test: needs a private pcscd with vpcd; run scripts/test or " +
			"scripts/with-pcscd go test ./test/e2e/ (sets VSCARD_E2E=1)")
	}
}

// vpcdPort is the TCP port of vpcd slot n in this run.
func vpcdPort(t *testing.T, slot int) int {
	t.Helper()
	base := 35963
	if s := os.Getenv("VSCARD_VPCD_PORT"); s != "" {
		p, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("VSCARD_VPCD_PORT=%q: %v", s, err)
		}
		base = p
	}
	return base + slot
}

func vpcdAddr(t *testing.T, slot int) string {
	return fmt.Sprintf("127.0.0.1:%d", vpcdPort(t, slot))
}

// needTools fails t when a tool the test drives is not installed: under
// VSCARD_E2E=1 a missing peer is a broken setup, not a reason to skip.
func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found on PATH (run scripts/setup): %v", tool, err)
		}
	}
}

// openscModule finds opensc-pkcs11.so: from its Debian package's file list,
// else the usual multiarch and plain paths.
func openscModule(t *testing.T) string {
	t.Helper()
	return findModule(t, "opensc-pkcs11", "opensc-pkcs11.so", []string{
		"/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
		"/usr/lib/aarch64-linux-gnu/opensc-pkcs11.so",
		"/usr/lib/opensc-pkcs11.so",
		"/usr/lib64/opensc-pkcs11.so",
	})
}

func coolkeyModule(t *testing.T) string {
	t.Helper()
	return findModule(t, "coolkey", "libcoolkeypk11.so", []string{
		"/usr/lib/pkcs11/libcoolkeypk11.so",
		"/usr/lib64/pkcs11/libcoolkeypk11.so",
	})
}

func findModule(t *testing.T, pkg, base string, known []string) string {
	t.Helper()
	for _, p := range known {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if out, err := exec.Command("dpkg", "-L", pkg).Output(); err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			if filepath.Base(line) == base {
				if _, err := os.Stat(line); err == nil {
					return line
				}
			}
		}
	}
	t.Fatalf("%s not found (Debian package %s; run scripts/setup)", base, pkg)
	return ""
}

// env is one test's world: its own HOME (OpenSC caches card files under
// ~/.cache, and two cards must never see each other's cache, vsmartcard
// #307) and a scratch directory.
type env struct {
	t    *testing.T
	home string
	dir  string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	requireE2E(t)
	if vscardBin == "" {
		t.Fatal("vscard binary was not built")
	}
	needTools(t, "opensc-tool", "pkcs11-tool", "openssl")
	return &env{t: t, home: t.TempDir(), dir: t.TempDir()}
}

func (e *env) environ(extra ...string) []string {
	var out []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "HOME=") || strings.HasPrefix(kv, "OPENSC_CONF=") {
			continue
		}
		out = append(out, kv)
	}
	return append(append(out, "HOME="+e.home), extra...)
}

// path names a file in the scratch directory.
func (e *env) path(name string) string { return filepath.Join(e.dir, name) }

// result is a finished command.
type result struct {
	cmdline string
	out     string // stdout and stderr, interleaved
	code    int    // exit status; -1 if it did not run or was killed
	err     error
}

func (r result) String() string {
	return fmt.Sprintf("$ %s\n(exit %d)\n%s", r.cmdline, r.code, r.out)
}

// exec runs a command with the test's environment and no stdin.
func (e *env) exec(extra []string, name string, args ...string) result {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = e.environ(extra...)
	cmd.Dir = e.dir
	var buf bytes.Buffer
	cmd.Stdout = &buf
	cmd.Stderr = &buf
	err := cmd.Run()
	r := result{cmdline: name + " " + strings.Join(args, " "), out: buf.String(), code: -1, err: err}
	if cmd.ProcessState != nil {
		r.code = cmd.ProcessState.ExitCode()
	}
	if ctx.Err() != nil {
		r.err = fmt.Errorf("timed out after %v: %w", cmdTimeout, err)
	}
	return r
}

// stdout runs a command and returns its standard output alone, for binary
// output (DER) that stderr chatter would corrupt.
func (e *env) stdout(name string, args ...string) (stdout []byte, stderr string, err error) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = e.environ()
	cmd.Dir = e.dir
	var errBuf bytes.Buffer
	cmd.Stderr = &errBuf
	stdout, err = cmd.Output()
	return stdout, errBuf.String(), err
}

func (e *env) run(name string, args ...string) result {
	e.t.Helper()
	return e.exec(nil, name, args...)
}

// must runs a command that has to succeed and returns its output.
func (e *env) must(name string, args ...string) string {
	e.t.Helper()
	r := e.run(name, args...)
	if r.err != nil || r.code != 0 {
		e.t.Fatalf("command failed: %v\n%s", r.err, r)
	}
	return r.out
}

func (e *env) vscard(args ...string) result {
	e.t.Helper()
	return e.run(vscardBin, args...)
}

// newCard makes a CAC card with testPIN in a fresh directory.
func (e *env) newCard(name string) string {
	e.t.Helper()
	dir := filepath.Join(e.dir, name)
	r := e.vscard("card", "new", "--pin", testPIN, dir)
	if r.code != 0 {
		e.t.Fatalf("making a card failed:\n%s", r)
	}
	return dir
}

// p11 runs pkcs11-tool against a module.
func (e *env) p11(module string, args ...string) result {
	e.t.Helper()
	return e.run("pkcs11-tool", append([]string{"--module", module}, args...)...)
}

// writeRandom writes n random bytes to a scratch file and returns its path
// and content.
func (e *env) writeRandom(name string, n int) (string, []byte) {
	e.t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	p := e.path(name)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		e.t.Fatal(err)
	}
	return p, b
}

func (e *env) readFile(name string) []byte {
	e.t.Helper()
	b, err := os.ReadFile(e.path(name))
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// server is a running `vscard serve`.
type server struct {
	t       *testing.T
	e       *env
	cmd     *exec.Cmd
	logPath string
	readers []string
	done    chan struct{}
	waitErr error
	stopped bool
}

// card is one --card/--vpcd pair of a serve command.
type card struct {
	dir  string
	slot int // vpcd slot: 0 or 1
}

// serve starts `vscard serve` for cards, waits until pcscd reports every
// card present, and stops it at cleanup, requiring exit status 0.
func (e *env) serve(cards []card, flags ...string) *server {
	e.t.Helper()
	args := []string{"serve"}
	var readers []string
	for _, c := range cards {
		args = append(args, "--card", c.dir, "--vpcd", vpcdAddr(e.t, c.slot))
		readers = append(readers, fmt.Sprintf("Virtual PCD 00 %02d", c.slot))
	}
	args = append(args, "--log-level", "debug")
	args = append(args, flags...)
	f, err := os.CreateTemp(e.dir, "serve-*.log")
	if err != nil {
		e.t.Fatal(err)
	}
	cmd := exec.Command(vscardBin, args...)
	cmd.Env = e.environ()
	cmd.Stdout = f
	cmd.Stderr = f
	if err := cmd.Start(); err != nil {
		f.Close()
		e.t.Fatalf("starting vscard serve: %v", err)
	}
	f.Close() // the child has its own descriptor
	s := &server{t: e.t, e: e, cmd: cmd, logPath: f.Name(), readers: readers, done: make(chan struct{})}
	go func() {
		s.waitErr = cmd.Wait()
		close(s.done)
	}()
	e.t.Logf("started: vscard %s (pid %d)", strings.Join(args, " "), cmd.Process.Pid)
	e.t.Cleanup(s.stop)
	for _, r := range readers {
		if err := s.waitReader(r, true, 20*time.Second); err != nil {
			e.t.Fatalf("%v\nvscard serve log:\n%s", err, s.log())
		}
	}
	return s
}

func (s *server) log() string {
	b, err := os.ReadFile(s.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	return tail(b, 16<<10)
}

// tail returns the last max bytes of b.
func tail(b []byte, max int) string {
	if len(b) > max {
		return "...\n" + string(b[len(b)-max:])
	}
	return string(b)
}

func (s *server) exited() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// readerRe matches a line of `opensc-tool --list-readers`:
// "0    Yes             Virtual PCD 00 00".
var readerRe = regexp.MustCompile(`^\s*\d+\s+(Yes|No)\s+(.*\S)\s*$`)

// readerPresent reports whether pcscd sees a card in the named reader.
func (e *env) readerPresent(name string) (bool, string) {
	r := e.run("opensc-tool", "--list-readers")
	for _, line := range strings.Split(r.out, "\n") {
		m := readerRe.FindStringSubmatch(line)
		if m != nil && strings.HasSuffix(m[2], name) {
			return m[1] == "Yes", r.out
		}
	}
	return false, r.out
}

// waitReader polls pcscd (bounded) until the card in reader is present or
// absent.
func (s *server) waitReader(reader string, present bool, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last string
	for {
		if present && s.exited() {
			return fmt.Errorf("vscard serve exited early (%v)", s.waitErr)
		}
		var got bool
		got, last = s.e.readerPresent(reader)
		if got == present {
			return nil
		}
		if time.Now().After(deadline) {
			want := "present"
			if !present {
				want = "absent"
			}
			return fmt.Errorf("card in %q not %s after %v; opensc-tool --list-readers:\n%s", reader, want, timeout, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stop sends SIGTERM and requires a clean exit (status 0) within 15 s,
// then waits until pcscd has seen the card go, so the next test's card is
// not confused with this one.
func (s *server) stop() {
	if s.stopped {
		return
	}
	s.stopped = true
	t := s.t
	if s.exited() {
		t.Errorf("vscard serve exited before the test ended (%v); log:\n%s", s.waitErr, s.log())
		return
	}
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Errorf("SIGTERM to vscard serve: %v", err)
	}
	select {
	case <-s.done:
	case <-time.After(15 * time.Second):
		s.cmd.Process.Kill()
		<-s.done
		t.Errorf("vscard serve did not exit within 15 s of SIGTERM; log:\n%s", s.log())
		return
	}
	if s.waitErr != nil {
		t.Errorf("vscard serve exited with %v after SIGTERM, want status 0; log:\n%s", s.waitErr, s.log())
	} else if t.Failed() {
		// The card's side of a failure: its debug log, and pcscd's.
		t.Logf("vscard serve log (test failed):\n%s", s.log())
		if p := os.Getenv("VSCARD_PCSCD_LOG"); p != "" {
			if b, err := os.ReadFile(p); err == nil {
				t.Logf("pcscd log %s (set VSCARD_PCSCD_DEBUG=1 for APDUs):\n%s", p, tail(b, 8<<10))
			}
		}
	}
	for _, r := range s.readers {
		if err := s.waitReader(r, false, 10*time.Second); err != nil {
			t.Errorf("after vscard serve stopped: %v", err)
		}
	}
}

// restart stops the server cleanly and starts the same command again.
func (s *server) restart(cards []card, flags ...string) *server {
	s.t.Helper()
	s.stop()
	return s.e.serve(cards, flags...)
}
