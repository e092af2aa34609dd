package guest

import (
	"bufio"
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"
)

// guestLib is /vscard/lib.sh in every guest: the shell half of the console
// protocol, shipped with the runner so both halves change together.
//
//go:embed guestlib.sh
var guestLib []byte

// Config describes one guest boot.
type Config struct {
	Image Image

	// Chardev is the socket QEMU listens on for the ccid-card-passthru
	// client: "tcp:HOST:PORT" or "unix:PATH" (server=on, wait=off, so the
	// guest boots whether or not a card client is connected). Empty means
	// no usb-ccid device; /init then does not wait for one.
	Chardev string

	// USBRedir is the socket QEMU listens on for a usbredir peer, in the
	// same forms as Chardev: it adds a usb-redir device on the xHCI bus
	// (no usb-ccid unless Chardev is set too), the generic path of issue 6
	// for a reader that lives outside QEMU. /init waits for the reader's
	// 08e6:4433 device and starts pcscd, as it does for usb-ccid.
	USBRedir string
	// USBRedirConnect makes QEMU connect to USBRedir instead of listening
	// there (server=off, reconnect=1): the peer listens, as `vscard
	// reader --listen` does.
	USBRedirConnect bool

	// QEMUArgs are extra QEMU options, appended as they are (e.g. the
	// user-mode network a USB/IP test needs).
	QEMUArgs []string

	// Script is the shell script the guest runs after pcscd has started
	// (as /vscard/script; it may source /vscard/lib.sh for helpers).
	Script string
	// Files are extra files for the guest, by absolute path ("/vscard/pin").
	Files map[string][]byte

	// Accel is KVM or TCG; resolve AccelAuto with ProbeAccel first. The zero
	// value means TCG, which always works.
	Accel Accel
	// Timeout bounds the whole run, boot to power-off (default 5 min).
	// QEMU is killed when it expires.
	Timeout time.Duration
	// BootTimeout bounds the time to the guest's first milestone
	// (init-start; default 60 s, against about 4 s under TCG), so a kernel
	// that hangs silently, as on KVM over nested PVM (guest-vm.md §7.1),
	// fails fast even when KVM was forced.
	BootTimeout time.Duration
	// ConsoleLog, if set, receives every console line, prefixed with the
	// host time since QEMU started, and QEMU's own stderr.
	ConsoleLog string
	// PcscdDebug starts the guest's pcscd with --debug --apdu (its log is
	// /tmp/pcscd.log in the guest).
	PcscdDebug bool
	// Logger gets one line per milestone; nil discards.
	Logger *slog.Logger

	probe bool // boot, print init-start, power off (ProbeAccel)
}

// Result is a finished boot.
type Result struct {
	Accel    Accel
	Status   int // the script's exit status; -1 if the guest never reported one
	Marks    []Mark
	Sections []Section
	Console  []string      // every console line
	Duration time.Duration // QEMU start to exit
}

// Mark returns the first milestone with label, if any.
func (r Result) Mark(label string) (Mark, bool) {
	for _, m := range r.Marks {
		if m.Label == label {
			return m, true
		}
	}
	return Mark{}, false
}

// Section returns the last step called name, if any.
func (r Result) Section(name string) (Section, bool) {
	for i := len(r.Sections) - 1; i >= 0; i-- {
		if r.Sections[i].Name == name {
			return r.Sections[i], true
		}
	}
	return Section{}, false
}

// Tail returns the last n console lines, for failure reports.
func (r Result) Tail(n int) string { return tail(r.Console, n) }

func tail(lines []string, n int) string {
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// ErrExited is returned by waits that can no longer be satisfied because the
// guest has powered off (or QEMU died).
var ErrExited = errors.New("guest: QEMU exited")

// VM is a running guest. WaitFor and Section consume the console in order
// (each call starts after what the previous one matched), so one goroutine
// should drive a VM's steps; Tail, Go and Close may be called from any.
type VM struct {
	cfg   Config
	cmd   *exec.Cmd
	stdin io.WriteCloser
	start time.Time
	tmp   string
	log   *os.File
	lg    *slog.Logger

	mu      sync.Mutex
	lines   []string
	marks   []Mark
	status  int
	changed chan struct{} // closed and replaced on every new line
	pos     int           // console lines consumed by Section and WaitFor
	exitErr error         // QEMU's own exit error
	ran     time.Duration // QEMU start to exit

	done      chan struct{} // QEMU exited and the console is drained
	closeOnce sync.Once
}

// Boot runs a guest to completion: Start, then Wait.
func Boot(ctx context.Context, cfg Config) (Result, error) {
	vm, err := Start(ctx, cfg)
	if err != nil {
		return Result{}, err
	}
	defer vm.Close()
	return vm.Wait()
}

// Start boots a guest. The caller must call Close (or Wait) on every path;
// QEMU is also killed when ctx is done or the Timeout expires, and when the
// test process dies (parent-death signal on Linux).
func Start(ctx context.Context, cfg Config) (*VM, error) {
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Minute
	}
	if cfg.BootTimeout <= 0 || cfg.BootTimeout > cfg.Timeout {
		cfg.BootTimeout = min(60*time.Second, cfg.Timeout)
	}
	if cfg.Accel == "" {
		cfg.Accel = AccelTCG
	}
	if cfg.Accel != AccelKVM && cfg.Accel != AccelTCG {
		return nil, fmt.Errorf("guest: accel %q: want kvm or tcg (resolve auto with ProbeAccel)", cfg.Accel)
	}
	lg := cfg.Logger
	if lg == nil {
		lg = slog.New(slog.DiscardHandler)
	}
	ccid, err := chardevArgs(cfg.Chardev)
	if err != nil {
		return nil, err
	}
	redir, err := usbRedirArgs(cfg.USBRedir, cfg.USBRedirConnect)
	if err != nil {
		return nil, err
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil, fmt.Errorf("guest: qemu-system-x86_64 not found (Debian package qemu-system-x86; run scripts/setup): %w", err)
	}

	tmp, err := os.MkdirTemp("", "vscard-guest")
	if err != nil {
		return nil, fmt.Errorf("guest: %w", err)
	}
	files := map[string][]byte{}
	for k, v := range cfg.Files {
		files[k] = v
	}
	if cfg.Script != "" {
		files["/vscard/script"] = []byte(cfg.Script)
	}
	files["/vscard/lib.sh"] = guestLib
	initrd, err := cfg.Image.initrdWith(tmp, files)
	if err != nil {
		os.RemoveAll(tmp)
		return nil, err
	}

	appendArg := "console=ttyS0 loglevel=4 panic=-1 vscard.maxwait=300"
	if cfg.PcscdDebug {
		appendArg += " vscard.pcscd=debug"
	}
	if cfg.probe {
		appendArg += " vscard.probe=1"
	}
	if cfg.Chardev == "" && cfg.USBRedir == "" {
		appendArg += " vscard.ccid=0"
	}
	// The command line of guest-vm.md §4.1: no network, VGA or default
	// devices; the console is QEMU's stdio, both ways.
	args := []string{"-accel", string(cfg.Accel)}
	if cfg.Accel == AccelKVM {
		// Plain "-cpu host" aborts on nested PVM hosts (guest-vm.md §7.1).
		args = append(args, "-cpu", "host,-arch-capabilities")
	}
	args = append(args,
		"-M", "q35", "-m", "512", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none",
		"-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
		"-no-reboot",
		"-kernel", cfg.Image.Kernel, "-initrd", initrd, "-append", appendArg)
	if len(ccid) > 0 || len(redir) > 0 {
		// One xHCI controller carries both devices.
		args = append(args, "-device", "qemu-xhci,id=xhci")
	}
	args = append(args, ccid...)
	args = append(args, redir...)
	args = append(args, cfg.QEMUArgs...)

	vm := &VM{
		cfg:     cfg,
		tmp:     tmp,
		lg:      lg,
		status:  -1,
		changed: make(chan struct{}),
		done:    make(chan struct{}),
	}
	if cfg.ConsoleLog != "" {
		if vm.log, err = os.OpenFile(cfg.ConsoleLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err != nil {
			os.RemoveAll(tmp)
			return nil, fmt.Errorf("guest: console log: %w", err)
		}
		fmt.Fprintf(vm.log, "=== %s %s\n", qemu, strings.Join(args, " "))
	}
	cmd := exec.Command(qemu, args...)
	setParentDeath(cmd)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		vm.cleanup()
		return nil, fmt.Errorf("guest: %w", err)
	}
	vm.stdin, err = cmd.StdinPipe()
	if err != nil {
		vm.cleanup()
		return nil, fmt.Errorf("guest: %w", err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &limitedWriter{w: &stderr, n: 64 << 10}
	vm.cmd = cmd
	vm.start = time.Now()
	if err := cmd.Start(); err != nil {
		vm.cleanup()
		return nil, fmt.Errorf("guest: start qemu: %w", err)
	}
	lg.Debug("guest: qemu started", "accel", cfg.Accel, "pid", cmd.Process.Pid)

	go vm.readConsole(stdout, &stderr)
	go vm.watch(ctx)
	return vm, nil
}

// watch kills QEMU when ctx is done, the run's Timeout expires, or the
// guest has not reached /init within BootTimeout.
func (vm *VM) watch(ctx context.Context) {
	all := time.NewTimer(vm.cfg.Timeout)
	defer all.Stop()
	boot := time.NewTimer(vm.cfg.BootTimeout)
	defer boot.Stop()
	kill := func(why string) {
		vm.lg.Warn("guest: killing qemu", "why", why)
		vm.appendLine("@@host killing QEMU: " + why)
		vm.cmd.Process.Kill()
	}
	for {
		select {
		case <-vm.done:
			return
		case <-ctx.Done():
			kill(ctx.Err().Error())
			return
		case <-all.C:
			kill(fmt.Sprintf("run timeout %v", vm.cfg.Timeout))
			return
		case <-boot.C:
			vm.mu.Lock()
			booted := len(vm.marks) > 0
			vm.mu.Unlock()
			if !booted {
				kill(fmt.Sprintf("no init-start within %v (accel %s)", vm.cfg.BootTimeout, vm.cfg.Accel))
				return
			}
		}
	}
}

// chardevArgs turns a Config.Chardev target into QEMU options. nodelay=on
// matters: QEMU writes each VSCard message in two write()s, and without it
// every message stalls about 44 ms (guest-vm.md §7.2).
func chardevArgs(target string) ([]string, error) {
	if target == "" {
		return nil, nil
	}
	sock, err := socketChardev("ccid", target)
	if err != nil {
		return nil, err
	}
	return []string{
		"-chardev", sock,
		"-device", "usb-ccid,id=ccid0,bus=xhci.0",
		"-device", "ccid-card-passthru,chardev=ccid",
	}, nil
}

// usbRedirArgs turns a Config.USBRedir target into QEMU options: a
// listening chardev and a usb-redir device on the xHCI bus. nodelay=on
// for the same reason as the passthru chardev: a usbredir packet is a
// header and a payload, and an APDU round trip is several packets.
func usbRedirArgs(target string, connect bool) ([]string, error) {
	if target == "" {
		return nil, nil
	}
	sock, err := socketChardev("usbredir", target)
	if err != nil {
		return nil, err
	}
	if connect {
		// A client chardev that dials again every second after the peer
		// goes away.
		sock = strings.Replace(sock, "server=on,wait=off", "server=off,reconnect=1", 1)
	}
	return []string{
		"-chardev", sock,
		"-device", "usb-redir,id=redir0,chardev=usbredir,bus=xhci.0",
	}, nil
}

// socketChardev is the -chardev value of a listening socket named id.
func socketChardev(id, target string) (string, error) {
	var sock string
	switch {
	case strings.HasPrefix(target, "tcp:"):
		host, port, err := net.SplitHostPort(strings.TrimPrefix(target, "tcp:"))
		if err != nil || port == "" {
			return "", fmt.Errorf("guest: chardev %q: want tcp:HOST:PORT", target)
		}
		sock = fmt.Sprintf("socket,id=%s,host=%s,port=%s,server=on,wait=off,nodelay=on", id, host, port)
		if strings.Contains(host, ":") {
			sock += ",ipv6=on"
		}
	case strings.HasPrefix(target, "unix:"):
		p := strings.TrimPrefix(target, "unix:")
		if p == "" || strings.Contains(p, ",") {
			return "", fmt.Errorf("guest: chardev %q: want unix:PATH without commas", target)
		}
		sock = "socket,id=" + id + ",path=" + p + ",server=on,wait=off"
	default:
		return "", fmt.Errorf("guest: chardev %q: want tcp:HOST:PORT or unix:PATH", target)
	}
	return sock, nil
}

func (vm *VM) readConsole(stdout io.Reader, stderr *bytes.Buffer) {
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		vm.appendLine(strings.TrimRight(sc.Text(), "\r"))
	}
	err := vm.cmd.Wait()
	for _, l := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
		if l != "" {
			vm.appendLine("@@qemu " + l)
		}
	}
	vm.mu.Lock()
	vm.exitErr = err
	vm.ran = time.Since(vm.start)
	vm.mu.Unlock()
	vm.lg.Debug("guest: qemu exited", "err", err, "after", time.Since(vm.start).Round(time.Millisecond))
	close(vm.done)
}

func (vm *VM) appendLine(l string) {
	now := time.Since(vm.start)
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.log != nil {
		fmt.Fprintf(vm.log, "%8.3f %s\n", now.Seconds(), l)
	}
	vm.lines = append(vm.lines, l)
	if ev, ok := parseEvent(l); ok {
		switch ev.kind {
		case evMark:
			vm.marks = append(vm.marks, Mark{Label: ev.name, Uptime: ev.uptime, Host: now})
			vm.lg.Debug("guest: mark", "label", ev.name, "host", now.Round(time.Millisecond))
		case evExit:
			vm.marks = append(vm.marks, Mark{Label: ev.name, Uptime: ev.uptime, Host: now})
			vm.status = ev.status
		}
	}
	close(vm.changed)
	vm.changed = make(chan struct{})
}

// next waits for the first unconsumed console line matching f and consumes
// everything up to it.
func (vm *VM) next(ctx context.Context, what string, f func(ev event, ok bool) bool) (int, error) {
	for {
		vm.mu.Lock()
		for i := vm.pos; i < len(vm.lines); i++ {
			ev, ok := parseEvent(vm.lines[i])
			if f(ev, ok) {
				vm.pos = i + 1
				vm.mu.Unlock()
				return i, nil
			}
		}
		changed := vm.changed
		vm.mu.Unlock()
		select {
		case <-changed:
		case <-vm.done:
			// One more scan: the last lines may have arrived with done.
			vm.mu.Lock()
			found := -1
			for i := vm.pos; i < len(vm.lines); i++ {
				ev, ok := parseEvent(vm.lines[i])
				if f(ev, ok) {
					vm.pos, found = i+1, i
					break
				}
			}
			vm.mu.Unlock()
			if found >= 0 {
				return found, nil
			}
			return -1, fmt.Errorf("waiting for %s: %w", what, ErrExited)
		case <-ctx.Done():
			return -1, fmt.Errorf("guest: waiting for %s: %w", what, ctx.Err())
		}
	}
}

// WaitFor blocks until the guest asks the host to act with "@@WAIT name".
func (vm *VM) WaitFor(ctx context.Context, name string) error {
	_, err := vm.next(ctx, "@@WAIT "+name, func(ev event, ok bool) bool {
		return ok && ev.kind == evWait && ev.name == name
	})
	return err
}

// Go answers a "@@WAIT name": the guest's host_wait returns.
func (vm *VM) Go(name string) error {
	if _, err := fmt.Fprintf(vm.stdin, "@@GO %s\n", name); err != nil {
		return fmt.Errorf("guest: console write: %w", err)
	}
	return nil
}

// Section blocks until the guest's step name has ended and returns it.
func (vm *VM) Section(ctx context.Context, name string) (Section, error) {
	var begin int
	_, err := vm.next(ctx, "@@BEGIN "+name, func(ev event, ok bool) bool {
		return ok && ev.kind == evBegin && ev.name == name
	})
	if err != nil {
		return Section{}, err
	}
	vm.mu.Lock()
	begin = vm.pos - 1
	vm.mu.Unlock()
	end, err := vm.next(ctx, "@@END "+name, func(ev event, ok bool) bool {
		return ok && (ev.kind == evEnd && ev.name == name || ev.kind == evBegin || ev.kind == evExit)
	})
	if err != nil {
		return Section{}, err
	}
	vm.mu.Lock()
	lines := append([]string(nil), vm.lines[begin:end+1]...)
	vm.mu.Unlock()
	s := sections(lines)
	if len(s) == 0 {
		return Section{}, fmt.Errorf("guest: step %s: no output", name)
	}
	return s[0], nil
}

// Tail returns the last n console lines so far.
func (vm *VM) Tail(n int) string {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return tail(vm.lines, n)
}

// Wait waits for QEMU to exit and returns the run's result. The error is
// non-nil when QEMU failed or was killed, not when the script failed: see
// Result.Status.
func (vm *VM) Wait() (Result, error) {
	<-vm.done
	vm.Close()
	vm.mu.Lock()
	defer vm.mu.Unlock()
	r := Result{
		Accel:    vm.cfg.Accel,
		Status:   vm.status,
		Marks:    append([]Mark(nil), vm.marks...),
		Sections: sections(vm.lines),
		Console:  append([]string(nil), vm.lines...),
	}
	r.Duration = vm.ran
	if vm.exitErr != nil {
		return r, fmt.Errorf("guest: qemu: %w", vm.exitErr)
	}
	return r, nil
}

// Close kills QEMU if it still runs, waits for it and removes temporary
// files. It is safe to call more than once.
func (vm *VM) Close() {
	vm.closeOnce.Do(func() {
		select {
		case <-vm.done:
		default:
			vm.cmd.Process.Kill()
			<-vm.done
		}
		vm.stdin.Close()
		vm.cleanup()
	})
}

func (vm *VM) cleanup() {
	if vm.log != nil {
		vm.mu.Lock()
		vm.log.Close()
		vm.log = nil
		vm.mu.Unlock()
	}
	os.RemoveAll(vm.tmp)
}

// limitedWriter keeps at most n bytes; QEMU's stderr is only for reports.
type limitedWriter struct {
	w io.Writer
	n int
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	if l.n > 0 {
		k := min(len(p), l.n)
		l.w.Write(p[:k])
		l.n -= k
	}
	return len(p), nil
}
