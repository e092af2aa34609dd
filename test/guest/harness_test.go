package guest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
)

// These tests cover the harness itself and run everywhere (no QEMU): the
// cpio writer, the console protocol, the QEMU options, and the runner
// against a fake qemu-system-x86_64 (a shell script).

type cpioEntryT struct {
	name string
	mode uint32
	data string
}

// readCPIO parses a newc archive up to its trailer; the test's own reader,
// written from the format description, not from writeCPIO.
func readCPIO(t *testing.T, b []byte) []cpioEntryT {
	t.Helper()
	var out []cpioEntryT
	off := 0
	align := func(n int) int { return (n + 3) &^ 3 }
	for {
		if off+110 > len(b) || string(b[off:off+6]) != "070701" {
			t.Fatalf("no newc header at offset %d", off)
		}
		field := func(i int) int {
			v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatalf("header field %d at %d: %v", i, off, err)
			}
			return int(v)
		}
		mode, size, namesize := field(1), field(6), field(11)
		nameStart := off + 110
		name := string(b[nameStart : nameStart+namesize-1])
		if b[nameStart+namesize-1] != 0 {
			t.Fatalf("name %q not NUL-terminated", name)
		}
		dataStart := align(nameStart + namesize)
		if name == "TRAILER!!!" {
			return out
		}
		out = append(out, cpioEntryT{name, uint32(mode), string(b[dataStart : dataStart+size])})
		off = align(dataStart + size)
	}
}

func TestWriteCPIO(t *testing.T) {
	tests := []struct {
		name  string
		files map[string][]byte
		want  []cpioEntryT
	}{
		{"empty", map[string][]byte{}, nil},
		{"script and pin", map[string][]byte{"/vscard/script": []byte("echo hi\n"), "/vscard/pin": []byte("12345678")},
			[]cpioEntryT{{"vscard", 0o40755, ""}, {"vscard/pin", 0o100755, "12345678"}, {"vscard/script", 0o100755, "echo hi\n"}}},
		{"nested dirs, odd sizes", map[string][]byte{"a/b/c": []byte("x"), "a/d": []byte("12345")},
			[]cpioEntryT{{"a", 0o40755, ""}, {"a/b", 0o40755, ""}, {"a/b/c", 0o100755, "x"}, {"a/d", 0o100755, "12345"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := writeCPIO(&buf, tt.files); err != nil {
				t.Fatal(err)
			}
			if buf.Len()%4 != 0 {
				t.Errorf("archive length %d is not a multiple of 4", buf.Len())
			}
			if got := readCPIO(t, buf.Bytes()); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("entries:\n got %v\nwant %v", got, tt.want)
			}
		})
	}
	for _, bad := range []string{"", "/", "../etc/passwd", "/../x"} {
		if err := writeCPIO(&bytes.Buffer{}, map[string][]byte{bad: nil}); err == nil {
			t.Errorf("writeCPIO accepted the name %q", bad)
		}
	}
}

func TestParseEvent(t *testing.T) {
	tests := []struct {
		line string
		want event
		ok   bool
	}{
		{"@@T 3.71 init-start", event{kind: evMark, name: "init-start", uptime: 3710 * time.Millisecond}, true},
		{"@@T 12.5 FAIL no-reader", event{kind: evMark, name: "FAIL no-reader", uptime: 12500 * time.Millisecond}, true},
		{"@@T 38.49 EXIT 0", event{kind: evExit, name: "EXIT", uptime: 38490 * time.Millisecond}, true},
		{"@@T 1.00 EXIT 125", event{kind: evExit, name: "EXIT", uptime: time.Second, status: 125}, true},
		{"@@BEGIN sig", event{kind: evBegin, name: "sig"}, true},
		{"@@END sig 0", event{kind: evEnd, name: "sig"}, true},
		{"@@END sig 1", event{kind: evEnd, name: "sig", status: 1}, true},
		{"@@WAIT remove", event{kind: evWait, name: "remove"}, true},
		{"@@T x init-start", event{}, false},
		{"@@T -1 init-start", event{}, false},
		{"@@T 1.0", event{}, false},
		{"@@T 1.0 EXIT x", event{}, false},
		{"@@END sig", event{}, false},
		{"@@END sig x", event{}, false},
		{"@@BEGIN", event{}, false},
		{"@@BEGIN two words", event{}, false},
		{"@@GO remove", event{}, false}, // the host's own answer, echoed
		{"@@qemu warning", event{}, false},
		{"T 1.0 init-start", event{}, false},
		{"  token label : x", event{}, false},
		{"@@BEGIN " + strings.Repeat("x", maxName+1), event{}, false},
	}
	for _, tt := range tests {
		got, ok := parseEvent(tt.line)
		if ok != tt.ok || got != tt.want {
			t.Errorf("parseEvent(%q) = %+v, %v; want %+v, %v", tt.line, got, ok, tt.want, tt.ok)
		}
	}
}

func TestSections(t *testing.T) {
	lines := []string{
		"@@T 1.0 script-start",
		"before",
		"@@BEGIN a",
		"line 1",
		"line 2",
		"@@END a 0",
		"between",
		"@@BEGIN b",
		"@@END b 3",
		"@@BEGIN c",
		"@@T 2.0 mark inside", // protocol lines are not output
		"c out",
		"@@BEGIN d", // c never ended
		"d out",
	}
	want := []Section{
		{Name: "a", Output: "line 1\nline 2\n", Status: 0},
		{Name: "b", Output: "", Status: 3},
		{Name: "c", Output: "c out\n", Status: -1},
		{Name: "d", Output: "d out\n", Status: -1},
	}
	if got := sections(lines); !reflect.DeepEqual(got, want) {
		t.Errorf("sections:\n got %+v\nwant %+v", got, want)
	}
}

func TestChardevArgs(t *testing.T) {
	tests := []struct {
		target string
		want   string // the -chardev value; "" = no devices
		err    bool
	}{
		{"", "", false},
		{"tcp:127.0.0.1:4000", "socket,id=ccid,host=127.0.0.1,port=4000,server=on,wait=off,nodelay=on", false},
		{"tcp:[::1]:4000", "socket,id=ccid,host=::1,port=4000,server=on,wait=off,nodelay=on,ipv6=on", false},
		{"unix:/tmp/q.sock", "socket,id=ccid,path=/tmp/q.sock,server=on,wait=off", false},
		{"tcp:127.0.0.1", "", true},
		{"unix:", "", true},
		{"unix:/tmp/a,b", "", true},
		{"127.0.0.1:4000", "", true},
	}
	for _, tt := range tests {
		args, err := chardevArgs(tt.target)
		if (err != nil) != tt.err {
			t.Errorf("chardevArgs(%q) error = %v, want error %v", tt.target, err, tt.err)
			continue
		}
		got := ""
		for i, a := range args {
			if a == "-chardev" {
				got = args[i+1]
			}
		}
		if got != tt.want {
			t.Errorf("chardevArgs(%q) chardev = %q, want %q", tt.target, got, tt.want)
		}
		if tt.want != "" && !strings.Contains(strings.Join(args, " "), "ccid-card-passthru,chardev=ccid") {
			t.Errorf("chardevArgs(%q) = %v: no ccid-card-passthru", tt.target, args)
		}
	}
}

func TestAccelFromEnv(t *testing.T) {
	for _, tt := range []struct {
		env  string
		want Accel
		err  bool
	}{{"", AccelAuto, false}, {"auto", AccelAuto, false}, {"KVM", AccelKVM, false}, {" tcg ", AccelTCG, false}, {"hvf", "", true}} {
		t.Setenv(AccelEnv, tt.env)
		got, err := AccelFromEnv()
		if got != tt.want || (err != nil) != tt.err {
			t.Errorf("%s=%q: got %q, %v; want %q, error %v", AccelEnv, tt.env, got, err, tt.want, tt.err)
		}
	}
	// kvm and tcg are taken as they are, without probing.
	for _, a := range []Accel{AccelKVM, AccelTCG} {
		if got, err := ProbeAccel(context.Background(), Image{}, a, nil); got != a || err != nil {
			t.Errorf("ProbeAccel(%s) = %s, %v", a, got, err)
		}
	}
}

// fakeQEMU puts a qemu-system-x86_64 on PATH that plays a guest with the
// shell script body (its stdin and stdout are the console), and returns an
// image whose files exist.
func fakeQEMU(t *testing.T, body string) Image {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "qemu-system-x86_64"), []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	for _, f := range []string{"vmlinux", "initramfs.cpio"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	img, err := OpenImage(dir)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func TestRunnerWithFakeQEMU(t *testing.T) {
	// The fake checks its options, then talks the console protocol.
	img := fakeQEMU(t, `
case "$*" in *"-accel tcg"*"-device ccid-card-passthru,chardev=ccid"*) ;; *) echo "bad args: $*"; exit 9 ;; esac
echo "@@T 1.00 init-start"
echo "noise from the kernel"
echo "@@BEGIN first"
echo "hello"
echo "@@END first 0"
echo "@@WAIT act"
while read -r line; do case $line in "@@GO act") break ;; esac; done
echo "@@BEGIN second"
echo "after go"
echo "@@END second 4"
echo "@@T 2.00 EXIT 7"
`)
	logPath := filepath.Join(t.TempDir(), "console.log")
	ctx := context.Background()
	vm, err := Start(ctx, Config{Image: img, Chardev: "tcp:127.0.0.1:1", Script: "true", Timeout: time.Minute, ConsoleLog: logPath})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	s, err := vm.Section(ctx, "first")
	if err != nil || s.Output != "hello\n" || s.Status != 0 {
		t.Fatalf("Section(first) = %+v, %v", s, err)
	}
	if err := vm.WaitFor(ctx, "act"); err != nil {
		t.Fatal(err)
	}
	if err := vm.Go("act"); err != nil {
		t.Fatal(err)
	}
	s, err = vm.Section(ctx, "second")
	if err != nil || s.Output != "after go\n" || s.Status != 4 {
		t.Fatalf("Section(second) = %+v, %v", s, err)
	}
	r, err := vm.Wait()
	if err != nil {
		t.Fatalf("Wait: %v\n%s", err, r.Tail(20))
	}
	if r.Status != 7 {
		t.Errorf("Status = %d, want 7", r.Status)
	}
	if m, ok := r.Mark("init-start"); !ok || m.Uptime != time.Second {
		t.Errorf("init-start mark = %+v, %v", m, ok)
	}
	if _, ok := r.Section("second"); !ok || len(r.Sections) != 2 {
		t.Errorf("Sections = %+v", r.Sections)
	}
	// Waiting for what will never come returns at once after the exit.
	if err := vm.WaitFor(ctx, "never"); !errors.Is(err, ErrExited) {
		t.Errorf("WaitFor after exit = %v, want ErrExited", err)
	}
	b, err := os.ReadFile(logPath)
	if err != nil || !strings.Contains(string(b), "noise from the kernel") || !strings.Contains(string(b), "=== ") {
		t.Errorf("console log lacks the command line or console lines: %v\n%s", err, b)
	}
}

func TestRunnerTimeoutKills(t *testing.T) {
	img := fakeQEMU(t, "echo '@@T 0.50 init-start'\nexec sleep 600\n")
	start := time.Now()
	r, err := Boot(context.Background(), Config{Image: img, Timeout: 300 * time.Millisecond})
	if err == nil {
		t.Fatalf("Boot of a hanging guest returned no error: %+v", r)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("timeout took %v", d)
	}
	if r.Status != -1 {
		t.Errorf("Status = %d, want -1 (no EXIT)", r.Status)
	}
	if _, ok := r.Mark("init-start"); !ok {
		t.Errorf("marks before the hang were lost: %+v", r.Marks)
	}
}

func TestRunnerBootTimeoutKills(t *testing.T) {
	// A kernel that never reaches /init (KVM on nested PVM) is killed
	// after BootTimeout, long before the run's Timeout.
	img := fakeQEMU(t, "exec sleep 600\n")
	start := time.Now()
	r, err := Boot(context.Background(), Config{Image: img, Timeout: time.Minute, BootTimeout: 200 * time.Millisecond})
	if err == nil {
		t.Fatalf("Boot of a silent guest returned no error: %+v", r)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("boot timeout took %v", d)
	}
	if !strings.Contains(r.Tail(5), "no init-start") {
		t.Errorf("console does not say why QEMU was killed:\n%s", r.Tail(5))
	}
}

func TestRunnerContextCancelKills(t *testing.T) {
	img := fakeQEMU(t, "exec sleep 600\n")
	ctx, cancel := context.WithCancel(context.Background())
	vm, err := Start(ctx, Config{Image: img, Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	time.AfterFunc(100*time.Millisecond, cancel)
	if _, err := vm.Wait(); err == nil {
		t.Error("Wait after cancel returned no error")
	}
}

func TestStartRejectsAuto(t *testing.T) {
	if _, err := Start(context.Background(), Config{Accel: AccelAuto}); err == nil {
		t.Error("Start accepted accel auto")
	}
}

func FuzzParseEvent(f *testing.F) {
	for _, s := range []string{"@@T 3.71 init-start", "@@T 1 EXIT 0", "@@BEGIN a", "@@END a 1", "@@WAIT x", "@@END", "@@T", "text"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		ev, ok := parseEvent(line)
		if !ok {
			if ev != (event{}) {
				t.Fatalf("rejected line gave an event: %+v", ev)
			}
			return
		}
		switch ev.kind {
		case evMark, evExit, evBegin, evEnd, evWait:
		default:
			t.Fatalf("unknown kind %q", ev.kind)
		}
		if ev.name == "" || len(ev.name) > maxName {
			t.Fatalf("bad name length %d", len(ev.name))
		}
		if !strings.HasPrefix(line, "@@") {
			t.Fatalf("event from a non-protocol line %q", line)
		}
		sections([]string{line, "x", line})
	})
}

// guestSession drives one booted guest: steps, host actions, signatures.
type guestSession struct {
	t   *testing.T
	vm  *VM
	ctx context.Context
}

func (g *guestSession) step(t *testing.T, name string) Section {
	t.Helper()
	s, err := g.vm.Section(g.ctx, name)
	if err != nil {
		t.Fatalf("guest step %s: %v", name, err)
	}
	if s.Status != 0 {
		t.Fatalf("guest step %s failed (status %d):\n%s", name, s.Status, s.Output)
	}
	return s
}

// host runs action when the guest asks for it; the guest is released even
// if the action fails, so it never waits for nothing.
func (g *guestSession) host(t *testing.T, name string, action func()) {
	t.Helper()
	if err := g.vm.WaitFor(g.ctx, name); err != nil {
		t.Fatalf("guest never asked for %q: %v", name, err)
	}
	defer g.vm.Go(name)
	began := time.Now()
	action()
	t.Logf("host action %s took %v", name, time.Since(began).Round(time.Millisecond))
}

// startGuest boots cfg and returns the session; the console tail and the
// host log are printed when the test fails.
func startGuest(t *testing.T, cfg Config, hostLog string) *guestSession {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cfg.Timeout)
	t.Cleanup(cancel)
	vm, err := Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		vm.Close()
		if t.Failed() {
			t.Logf("guest console (tail of %s):\n%s", cfg.ConsoleLog, vm.Tail(150))
			t.Logf("host processes' log (tail of %s):\n%s", hostLog, fileTail(hostLog, 60))
		}
	})
	return &guestSession{t: t, vm: vm, ctx: ctx}
}
