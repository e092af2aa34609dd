// Package vicc runs vsmartcard's vicc, a Python card emulator nobody on this
// project wrote, as the "physical" card of issue 5's tests.
//
// vicc connects as a TCP client to a vpcd slot of the pcscd the test runs
// next to (scripts/with-pcscd). Starting it inserts a card into that slot's
// reader and stopping it removes the card, which is how hot-plug tests make
// card events without hardware. Start and Stop both wait until pcscd itself
// reports the change (polled through package pcsc), so a test that follows
// sees the state it asked for.
//
// Debian 12's vicc (vsmartcard-vpicc 3.3) does not start as packaged; the
// two workarounds of peers.md (appendix "running vicc on Debian 12") are
// applied here: its modules' directory goes on PYTHONPATH, and a temporary
// directory holding Crypto -> Cryptodome (PyCryptodome's namespace) follows
// it. It is run with Debian's /usr/bin/python3, not whatever python3 comes
// first on PATH (a pyenv interpreter lacks Debian's modules).
//
// Outside VSCARD_E2E=1 a missing vicc or pcscd skips the test with the reason;
// under VSCARD_E2E=1 (set by scripts/with-pcscd) it fails it, because there a
// green run must mean vicc really ran.
package vicc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vscard/vscard/pcsc"
)

// Files of Debian's packages (peers.md appendix "running vicc").
const (
	python    = "/usr/bin/python3"
	viccBin   = "/usr/bin/vicc"
	cryptodom = "/usr/lib/python3/dist-packages/Cryptodome"
)

// siteDirs are where python3-virtualsmartcard may have put the
// virtualsmartcard package: Debian 12 nests it one level deeper than
// sys.path expects (.../site-packages/virtualsmartcard/virtualsmartcard).
var siteDirs = []string{
	"/usr/lib/python3/site-packages/virtualsmartcard",
	"/usr/lib/python3/site-packages",
	"/usr/lib/python3/dist-packages",
}

// ISO7816ATR is the ATR of `vicc -t iso7816` (peers.md appendix "running
// vicc"). It is returned fresh by ATR so callers cannot alter it.
const ISO7816ATR = "3B 95 13 81 01 80 73 FF 01 00 0B"

// ATR returns the ATR vicc -t iso7816 answers with.
func ATR() []byte {
	return []byte{0x3B, 0x95, 0x13, 0x81, 0x01, 0x80, 0x73, 0xFF, 0x01, 0x00, 0x0B}
}

// Timeouts for pcscd to notice vicc. vpcd polls its socket, and a cold
// Python start (imports of the whole virtualsmartcard package) takes about
// a second on the CI machine; 20 s leaves room for a loaded machine.
const (
	waitTimeout = 20 * time.Second
	pollEvery   = 50 * time.Millisecond
	stopGrace   = 5 * time.Second
)

// e2e reports whether the test runs inside scripts/with-pcscd.
func e2e() bool { return os.Getenv("VSCARD_E2E") == "1" }

// Available reports whether vicc can run on this machine: nil, or an error
// naming the missing piece and the Debian package that provides it.
func Available() error {
	_, err := pythonPath()
	return err
}

// pythonPath finds the module directory for PYTHONPATH, checking every file
// the workarounds rely on.
func pythonPath() (string, error) {
	for _, f := range []struct{ path, pkg string }{
		{python, "python3"},
		{viccBin, "vsmartcard-vpicc"},
	} {
		if _, err := os.Stat(f.path); err != nil {
			return "", fmt.Errorf("vicc: %s missing (Debian package %s; run scripts/setup): %w", f.path, f.pkg, err)
		}
	}
	site := ""
	for _, d := range siteDirs {
		if _, err := os.Stat(filepath.Join(d, "virtualsmartcard", "VirtualSmartcard.py")); err == nil {
			site = d
			break
		}
	}
	if site == "" {
		return "", errors.New("vicc: the virtualsmartcard Python package is missing (Debian package python3-virtualsmartcard; run scripts/setup)")
	}
	if _, err := os.Stat(cryptodom); err != nil {
		return "", fmt.Errorf("vicc: %s missing (Debian package python3-pycryptodome; run scripts/setup): %w", cryptodom, err)
	}
	return site, nil
}

// skipOrFail skips t outside VSCARD_E2E and fails it inside.
func skipOrFail(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if e2e() {
		t.Fatal(msg)
	}
	t.Skip(msg + " (skipped outside VSCARD_E2E=1; scripts/with-pcscd makes it a failure)")
}

// Proc is a vicc process attached to one vpcd slot. Its methods call
// t.Fatal on failure, so they must be called from the test's goroutine.
type Proc struct {
	t      testing.TB
	port   int
	reader string // as given: an exact pcscd reader name or its prefix
	env    []string
	dir    string
	typ    string

	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error
	log     *os.File
	starts  int
}

// Start runs `vicc -t iso7816` against vpcd on 127.0.0.1:port and waits
// until pcscd reports a card with vicc's ATR in reader (pcscd's name for
// that vpcd slot, e.g. "Virtual PCD 00 00", or a prefix of it). The process
// is stopped at t's cleanup, again waiting for pcscd to see the card go, so
// the next test starts from an empty reader.
func Start(t testing.TB, port int, reader string) *Proc {
	t.Helper()
	return StartType(t, "iso7816", port, reader)
}

// StartType is Start with another vicc card type (-t): cryptoflex, ePass,
// nPA, ... Only iso7816's ATR is checked on insertion.
func StartType(t testing.TB, typ string, port int, reader string) *Proc {
	t.Helper()
	if err := Available(); err != nil {
		skipOrFail(t, "%v", err)
	}
	if err := pcscReachable(); err != nil {
		skipOrFail(t, "vicc: no pcscd to attach to (run the test under scripts/with-pcscd): %v", err)
	}
	dir := t.TempDir()
	env, err := Env(dir)
	if err != nil {
		t.Fatalf("%v", err)
	}
	p := &Proc{t: t, port: port, reader: reader, env: env, dir: dir, typ: typ}
	t.Cleanup(p.cleanup)
	p.Start()
	return p
}

// Env returns the environment vicc needs on Debian 12, for running it
// some other way than Start (from a script, in another namespace): the
// current environment with PYTHONPATH replaced by vicc's module directory
// and a Crypto -> Cryptodome shim made in dir (peers.md appendix "running
// vicc"). Run it as: /usr/bin/python3 /usr/bin/vicc -t iso7816 -H 127.0.0.1 -P PORT.
func Env(dir string) ([]string, error) {
	site, err := pythonPath()
	if err != nil {
		return nil, err
	}
	// The PyCrypto shim: vicc does "from Crypto.Cipher import ..." and Debian
	// ships that API only as Cryptodome (peers.md appendix "running vicc").
	shim := filepath.Join(dir, "pyshim")
	if err := os.MkdirAll(shim, 0o755); err != nil {
		return nil, fmt.Errorf("vicc: %w", err)
	}
	link := filepath.Join(shim, "Crypto")
	if err := os.Symlink(cryptodom, link); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("vicc: Crypto shim: %w", err)
	}
	env := []string{"PYTHONPATH=" + site + string(os.PathListSeparator) + shim, "PYTHONDONTWRITEBYTECODE=1"}
	for _, kv := range os.Environ() {
		// Our PYTHONPATH replaces any inherited one: a pyenv or venv path
		// would shadow Debian's modules.
		if strings.HasPrefix(kv, "PYTHONPATH=") || strings.HasPrefix(kv, "PYTHONHOME=") {
			continue
		}
		env = append(env, kv)
	}
	return env, nil
}

// Argv is the command line of vicc emulating typ against vpcd on
// 127.0.0.1:port, with Debian's interpreter.
func Argv(typ string, port int) []string {
	return []string{python, viccBin, "-t", typ, "-H", "127.0.0.1", "-P", strconv.Itoa(port)}
}

// pcscReachable checks that a pcscd answers on the client socket.
func pcscReachable() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := pcsc.EstablishContext(ctx, nil)
	if err != nil {
		return err
	}
	return c.Release()
}

// Port is the vpcd port vicc connects to.
func (p *Proc) Port() int { return p.port }

// Running reports whether the vicc process is alive.
func (p *Proc) Running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Pid is the running vicc's process id, 0 when stopped.
func (p *Proc) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// Start starts vicc again after Stop (a card insertion) and waits until
// pcscd reports the card. Starting a running Proc fails the test.
func (p *Proc) Start() {
	p.t.Helper()
	if p.Running() {
		p.t.Fatalf("vicc: Start while already running (pid %d)", p.Pid())
	}
	p.mu.Lock()
	p.starts++
	logf, err := os.Create(filepath.Join(p.dir, fmt.Sprintf("vicc-%d.log", p.starts)))
	if err != nil {
		p.mu.Unlock()
		p.t.Fatalf("vicc: log file: %v", err)
	}
	argv := Argv(p.typ, p.port)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = p.env
	cmd.Dir = p.dir
	cmd.Stdout = logf
	cmd.Stderr = logf
	// Its own process group: a ^C to the test run reaches the test binary,
	// which then stops vicc through cleanup instead of both racing.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		p.mu.Unlock()
		p.t.Fatalf("vicc: start %s: %v", cmd, err)
	}
	done := make(chan struct{})
	p.cmd, p.done, p.log, p.waitErr = cmd, done, logf, nil
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		p.waitErr = err
		p.mu.Unlock()
		close(done)
	}()
	p.mu.Unlock()
	p.t.Logf("vicc: started pid %d: vicc -t %s -H 127.0.0.1 -P %d", cmd.Process.Pid, p.typ, p.port)

	var want []byte
	if p.typ == "iso7816" {
		want = ATR()
	}
	if err := p.wait(true, want, done); err != nil {
		p.t.Fatalf("%v\nvicc log:\n%s", err, p.Log())
	}
}

// Stop ends vicc (SIGTERM, then SIGKILL after 5 s) and waits until pcscd
// reports the reader empty: a card removal.
func (p *Proc) Stop() {
	p.t.Helper()
	if err := p.stop(); err != nil {
		p.t.Fatal(err)
	}
}

// Restart is Stop then Start: a removal followed by an insertion.
func (p *Proc) Restart() {
	p.t.Helper()
	p.Stop()
	p.Start()
}

func (p *Proc) stop() error {
	p.mu.Lock()
	cmd, done, logf := p.cmd, p.done, p.log
	p.mu.Unlock()
	if cmd == nil {
		return errors.New("vicc: Stop while not running")
	}
	select {
	case <-done:
		// Died on its own; a test that expected it alive learns it here.
		p.mu.Lock()
		err := p.waitErr
		p.cmd = nil
		p.mu.Unlock()
		logf.Close()
		return fmt.Errorf("vicc: pid %d had already exited (%v); log:\n%s", cmd.Process.Pid, err, p.Log())
	default:
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(stopGrace):
		_ = cmd.Process.Kill()
		<-done
	}
	p.mu.Lock()
	p.cmd = nil
	p.mu.Unlock()
	logf.Close()
	return p.wait(false, nil, nil)
}

func (p *Proc) cleanup() {
	if !p.Running() {
		p.mu.Lock()
		p.cmd = nil
		p.mu.Unlock()
		return
	}
	if err := p.stop(); err != nil {
		p.t.Errorf("vicc cleanup: %v", err)
	}
	if p.t.Failed() {
		p.t.Logf("vicc log (test failed):\n%s", p.Log())
	}
}

// Log returns the output of the latest vicc run.
func (p *Proc) Log() string {
	p.mu.Lock()
	n := p.starts
	p.mu.Unlock()
	b, err := os.ReadFile(filepath.Join(p.dir, fmt.Sprintf("vicc-%d.log", n)))
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	if len(b) > 8<<10 {
		b = append([]byte("...\n"), b[len(b)-8<<10:]...)
	}
	if len(b) == 0 {
		return "(empty)"
	}
	return string(b)
}

// wait polls pcscd until the reader holds a card (present) or none. With
// atr set the card must also answer with that ATR: a different card in the
// slot means the test's port does not belong to the reader it named. done,
// when non-nil, is the running vicc's exit channel: an early exit ends the
// wait at once with the reason rather than after the timeout.
func (p *Proc) wait(present bool, atr []byte, done <-chan struct{}) error {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	var c *pcsc.Context
	defer func() {
		if c != nil {
			c.Release()
		}
	}()
	last := "no answer from pcscd yet"
	for {
		if done != nil {
			select {
			case <-done:
				return fmt.Errorf("vicc exited before pcscd saw its card (%v)", p.exitErr())
			default:
			}
		}
		if c == nil {
			var err error
			if c, err = pcsc.EstablishContext(ctx, nil); err != nil {
				c = nil
				last = err.Error()
			}
		}
		if c != nil {
			ok, state, err := p.check(c, present, atr)
			if ok {
				return nil
			}
			last = state
			if err != nil {
				// A daemon restart or a dead socket: a fresh context next time.
				c.Release()
				c = nil
			}
		}
		select {
		case <-ctx.Done():
			want := "a card"
			if !present {
				want = "no card"
			}
			return fmt.Errorf("vicc: pcscd did not report %s in reader %q within %v (vpcd port %d); last: %s",
				want, p.reader, waitTimeout, p.port, last)
		case <-time.After(pollEvery):
		}
	}
}

func (p *Proc) exitErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.waitErr
}

// check reports whether the reader is in the wanted state, with a
// description of what pcscd said for the timeout message.
func (p *Proc) check(c *pcsc.Context, present bool, atr []byte) (bool, string, error) {
	infos, err := c.Readers()
	if err != nil {
		return false, err.Error(), err
	}
	var names []string
	for _, ri := range infos {
		names = append(names, ri.Name)
		if !MatchReader(ri.Name, p.reader) {
			continue
		}
		has := ri.State&pcsc.StatePresent != 0
		state := fmt.Sprintf("reader %q state %v ATR % X", ri.Name, ri.State, ri.ATR)
		if has != present {
			return false, state, nil
		}
		if present && atr != nil && !bytes.Equal(ri.ATR, atr) {
			return false, state + fmt.Sprintf(" (want vicc's ATR % X)", atr), nil
		}
		return true, state, nil
	}
	return false, fmt.Sprintf("no reader %q among %q", p.reader, names), nil
}

// MatchReader reports whether pcscd's reader name is the one a test named:
// the exact name, or a prefix of it (pcscd may append a slot or serial
// suffix to a driver's friendly name).
func MatchReader(name, want string) bool {
	return name == want || (want != "" && strings.HasPrefix(name, want))
}
