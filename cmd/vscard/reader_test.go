package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vscard/vscard/card/cac"
	"github.com/vscard/vscard/internal/ctl"
	"github.com/vscard/vscard/internal/fakehost"
	"github.com/vscard/vscard/internal/nsstest"
	"github.com/vscard/vscard/token/store"
	"github.com/vscard/vscard/usb"
	"github.com/vscard/vscard/vscard"
)

func TestParseReaderFlags(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want func(*readerConfig) string // "" when cfg is right
	}{
		{"sources keep their order, --certs binds to the --nss before it",
			[]string{"--usbredir", "unix:/tmp/r.sock", "--nss", "sql:/db", "--card", "/c1", "--certs", "a,b", "--vscard-listen", "unix:/tmp/v.sock", "--pcsc", "Gemalto"},
			func(c *readerConfig) string {
				got := fmt.Sprint(c.sources)
				want := "[--nss sql:/db --certs a,b --card /c1 --vscard-listen unix:/tmp/v.sock --pcsc Gemalto]"
				if got != want {
					return fmt.Sprintf("sources %s, want %s", got, want)
				}
				if c.sources[2].addr != (target{Network: "unix", Addr: "/tmp/v.sock"}) {
					return fmt.Sprintf("listen addr %+v", c.sources[2].addr)
				}
				if c.usbredir == nil || c.usbredir.String() != "unix:/tmp/r.sock" || c.usbredirListen || c.usbip != "" {
					return fmt.Sprintf("exports %+v %v %q", c.usbredir, c.usbredirListen, c.usbip)
				}
				return ""
			}},
		{"defaults: VID:PID, busid, loopback usbip port",
			[]string{"--usbip", ":3240", "--card", "/c"},
			func(c *readerConfig) string {
				if c.vid != 0x08E6 || c.pid != 0x4433 || c.busid != "1-1" || c.usbip != "127.0.0.1:3240" {
					return fmt.Sprintf("%04x:%04x busid %q usbip %q", c.vid, c.pid, c.busid, c.usbip)
				}
				return ""
			}},
		{"usbip host only gets port 3240",
			[]string{"--usbip", "127.0.0.1", "--card", "/c"},
			func(c *readerConfig) string {
				if c.usbip != "127.0.0.1:3240" {
					return c.usbip
				}
				return ""
			}},
		{"both exports, named bus id, other VID:PID, listen mode",
			[]string{"--usbredir", "tcp::7000", "--listen", "--usbip", "[::1]:3241", "--busid", "2-3.1", "--vid-pid", "1d6b:0104", "--card", "/c"},
			func(c *readerConfig) string {
				if c.usbredir.String() != "tcp:127.0.0.1:7000" || !c.usbredirListen || c.usbip != "[::1]:3241" || c.busid != "2-3.1" || c.vid != 0x1d6b || c.pid != 0x0104 {
					return fmt.Sprintf("%+v", c)
				}
				return ""
			}},
		{"an empty --pcsc is the first reader",
			[]string{"--usbip", "127.0.0.1:3240", "--pcsc", "", "--allow-last-pin-try", "--exclusive"},
			func(c *readerConfig) string {
				if len(c.sources) != 1 || c.sources[0].kind != srcPCSC || c.sources[0].arg != "" || !c.allowLastPIN || !c.exclusive {
					return fmt.Sprintf("%+v", c)
				}
				return ""
			}},
		{"usbredir over TLS",
			[]string{"--usbredir", "tcp:127.0.0.1:7000", "--usbredir-tls-dir", "/pki", "--card", "/c"},
			func(c *readerConfig) string {
				if c.usbredirTLSDir != "/pki" || c.usbredir.String() != "tcp:127.0.0.1:7000" {
					return fmt.Sprintf("%+v", c)
				}
				return ""
			}},
		{"TLS listener",
			[]string{"--usbip", "127.0.0.1:3240", "--vscard-listen", "tcp:127.0.0.1:2001", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem"},
			func(c *readerConfig) string {
				if c.tlsCert != "c.pem" || c.tlsKey != "k.pem" || c.tlsCA != "ca.pem" {
					return fmt.Sprintf("%+v", c)
				}
				return ""
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := parseReaderFlags(tt.args, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			if msg := tt.want(cfg); msg != "" {
				t.Error(msg)
			}
		})
	}
}

// TestReaderUsageErrors: command-line mistakes exit 2 with a message that
// says what to do.
func TestReaderUsageErrors(t *testing.T) {
	exp := []string{"--usbip", "127.0.0.1:3240"}
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--card", "/c"}, "no export"},
		{exp, "no card source"},
		{append(exp, "/c"), `unexpected argument "/c"`},
		{append(exp, "--nss", "sql:/db"), "--nss sql:/db needs --certs"},
		{append(exp, "--certs", "a", "--nss", "sql:/db"), "give it after the --nss"},
		{append(exp, "--nss", "/a", "--certs", "x", "--certs", "y"), "give it after the --nss"},
		{append(exp, "--card", ""), "empty card directory"},
		{append(exp, "--card", "/c", "--exclusive"), "go with --pcsc"},
		{append(exp, "--card", "/c", "--tls-cert", "c"), "secure --vscard-listen"},
		{append(exp, "--vscard-listen", "unix:/v", "--tls-cert", "c"), "together"},
		{append(exp, "--vscard-listen", "unix:/v", "--tls-ca", "ca"), "--tls-ca needs --tls-cert"},
		{append(exp, "--vscard-listen", "nowhere"), "want tcp:HOST:PORT"},
		{append(exp, "--vscard-listen", "tcp:127.0.0.1:0"), "not a number from 1 to 65535"},
		{[]string{"--usbredir", "bogus", "--card", "/c"}, "--usbredir"},
		{[]string{"--listen", "--usbip", "127.0.0.1:1", "--card", "/c"}, "go with --usbredir"},
		{[]string{"--usbredir-tls-dir", "/d", "--usbip", "127.0.0.1:1", "--card", "/c"}, "go with --usbredir"},
		{[]string{"--usbredir", "unix:/r", "--usbredir-tls-dir", "/d", "--card", "/c"}, "QEMU has no TLS on unix sockets"},
		{[]string{"--busid", "1-1", "--usbredir", "unix:/r", "--card", "/c"}, "--busid goes with --usbip"},
		{append(exp, "--busid", "bad id", "--card", "/c"), "--busid"},
		{append(exp, "--busid", strings.Repeat("1", 32), "--card", "/c"), "1 to 31"},
		{append(exp, "--vid-pid", "08e6", "--card", "/c"), "--vid-pid"},
		{append(exp, "--vid-pid", "108e6:4433", "--card", "/c"), "--vid-pid"},
		{append(exp, "--log-level", "loud", "--card", "/c"), "--log-level"},
		{append(exp, "--log-format", "xml", "--card", "/c"), "--log-format"},
		{append(exp, "--card", "1", "--card", "2", "--card", "3", "--card", "4", "--card", "5", "--card", "6", "--card", "7", "--card", "8", "--card", "9"), "at most 8 slots"},
		{append(exp, "--frobnicate"), "flag provided but not defined"},
	}
	for _, tt := range tests {
		var out bytes.Buffer
		code := run(context.Background(), &environ{stdin: strings.NewReader(""), stdout: &out, stderr: &out}, append([]string{"reader"}, tt.args...))
		if code != exitUsage || !strings.Contains(out.String(), tt.want) {
			t.Errorf("%q: exit %d, output %q; want exit 2 and %q", tt.args, code, out.String(), tt.want)
		}
	}
	// A card that does not exist is not a usage error.
	var out bytes.Buffer
	code := run(context.Background(), &environ{stdin: strings.NewReader(""), stdout: &out, stderr: &out},
		[]string{"reader", "--usbip", "127.0.0.1:3240", "--card", "/nonexistent/card", "--control", "/nonexistent/x.sock"})
	if code != exitError || !strings.Contains(out.String(), "/nonexistent/card") {
		t.Errorf("missing card: exit %d: %s", code, out.String())
	}
}

// TestReaderHelp: --help exits 0 and documents every flag and command the
// guest tests and users rely on.
func TestReaderHelp(t *testing.T) {
	var out bytes.Buffer
	code := run(context.Background(), &environ{stdin: strings.NewReader(""), stdout: &out, stderr: &out}, []string{"reader", "--help"})
	if code != exitOK {
		t.Fatalf("exit %d", code)
	}
	for _, want := range []string{"-card", "-nss", "-certs", "-pcsc", "-vscard-listen", "-usbredir", "-listen", "-usbip", "-busid",
		"-vid-pid", "-control", "-trace", "-log-level", "-log-format", "-tls-ca", "-tls-cert", "-tls-key", "-allow-last-pin-try", "-usbredir-tls-dir",
		"insert [SLOT]", "remove [SLOT]", "list", "status", "debug LEVEL", "quit", "270 bytes", "one importer at a time",
		"08e6:4433", "1-1", "loopback"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("help lacks %q", want)
		}
	}
	var top bytes.Buffer
	run(context.Background(), &environ{stdout: &top, stderr: &top}, []string{"help"})
	if !strings.Contains(top.String(), "reader") {
		t.Errorf("top-level usage lacks reader:\n%s", top.String())
	}
	if _, err := parseReaderFlags([]string{"-h"}, io.Discard); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("-h: %v", err)
	}
}

// ccidHost drives a usb.Device as a CCID host driver would, on its bulk
// endpoints (CCID 1.1 §6; protocols.md §3.2).
type ccidHost struct {
	t       *testing.T
	dev     usb.Device
	out, in uint8
	seq     uint8
}

func newCCIDHost(t *testing.T, dev usb.Device) *ccidHost {
	t.Helper()
	h := &ccidHost{t: t, dev: dev}
	info := dev.Info()
	for _, ep := range info.Endpoints {
		if ep.Type == usb.Bulk && ep.In() {
			h.in = ep.Address
		} else if ep.Type == usb.Bulk {
			h.out = ep.Address
		}
	}
	if h.in == 0 || h.out == 0 {
		t.Fatalf("no bulk endpoints in %+v", info)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := dev.Control(ctx, usb.Setup{Request: usb.ReqSetConfiguration, Value: uint16(info.ConfigurationValue)}, nil); err != nil {
		t.Fatalf("SET_CONFIGURATION: %v", err)
	}
	return h
}

// command sends one PC_to_RDR message and returns the final RDR_to_PC
// message (after any time extension): header fields and data.
func (h *ccidHost) command(slot int, typ byte, data []byte, p [3]byte) (status, errCode byte, resp []byte) {
	h.t.Helper()
	h.seq++
	frame := make([]byte, 10, 10+len(data))
	frame[0] = typ
	binary.LittleEndian.PutUint32(frame[1:], uint32(len(data)))
	frame[5], frame[6] = byte(slot), h.seq
	copy(frame[7:], p[:])
	frame = append(frame, data...)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := h.dev.Out(ctx, h.out, frame); err != nil {
		h.t.Fatalf("bulk OUT %02X: %v", typ, err)
	}
	for {
		msg, err := h.dev.In(ctx, h.in, 65536+10)
		if err != nil {
			h.t.Fatalf("bulk IN after %02X: %v", typ, err)
		}
		if len(msg) < 10 {
			h.t.Fatalf("short RDR_to_PC % X", msg)
		}
		n := binary.LittleEndian.Uint32(msg[1:])
		if msg[5] != byte(slot) || msg[6] != h.seq || int(n) != len(msg)-10 {
			h.t.Fatalf("RDR_to_PC % X for slot %d seq %d", msg[:10], slot, h.seq)
		}
		if msg[7]&0xC0 == 0x80 {
			continue // time extension (CCID §6.2.7)
		}
		return msg[7], msg[8], msg[10:]
	}
}

// powerOn is PC_to_RDR_IccPowerOn with automatic voltage; it returns the
// ATR.
func (h *ccidHost) powerOn(slot int) []byte {
	h.t.Helper()
	st, e, atr := h.command(slot, 0x62, nil, [3]byte{})
	if st&0x40 != 0 {
		h.t.Fatalf("IccPowerOn slot %d: bStatus %02X bError %02X", slot, st, e)
	}
	return atr
}

// xfr is PC_to_RDR_XfrBlock at short/extended APDU level.
func (h *ccidHost) xfr(slot int, apdu []byte) []byte {
	h.t.Helper()
	st, e, resp := h.command(slot, 0x6F, apdu, [3]byte{})
	if st&0x40 != 0 {
		h.t.Fatalf("XfrBlock slot %d % X: bStatus %02X bError %02X", slot, apdu, st, e)
	}
	return resp
}

// slotStatus is PC_to_RDR_GetSlotStatus: bmICCStatus (0 active, 1
// present, 2 absent).
func (h *ccidHost) slotStatus(slot int) byte {
	h.t.Helper()
	st, _, _ := h.command(slot, 0x65, nil, [3]byte{})
	return st & 0x03
}

// TestReaderSources builds the reader with one slot of each kind the test
// machine can feed (--card, --nss, --vscard-listen with a vscard.Client
// connecting in) and talks CCID to it: every slot powers on with its
// card's ATR and answers SELECT ACA like a CAC card; control commands move
// cards in and out.
func TestReaderSources(t *testing.T) {
	cardDir := testCard(t)
	dir := t.TempDir()
	vsock := filepath.Join(shortDir(t), "v.sock")
	cfg := &readerConfig{vid: 0x08E6, pid: 0x4433, sources: []sourceSpec{
		{kind: srcCard, arg: cardDir},
		{kind: srcVSCard, arg: "unix:" + vsock, addr: target{Network: "unix", Addr: vsock}},
	}}
	// nsstest skips the whole test without certutil; only this slot
	// depends on it.
	if _, err := exec.LookPath("certutil"); err == nil {
		db := nsstest.MakeDB(t, dir, connNSSPassword)
		cfg.sources = append(cfg.sources, sourceSpec{kind: srcNSS, arg: "sql:" + db, certs: "id-cert,signing-cert,encryption-cert"})
	} else {
		t.Log("certutil missing (libnss3-tools): the --nss slot is not tested")
	}
	var logBuf syncBuffer
	log := slog.New(slog.NewTextHandler(&logBuf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	var trace syncBuffer
	app, err := newReaderApp(context.Background(), cfg, log, &trace)
	if err != nil {
		t.Fatal(err)
	}
	defer app.close()
	ctx, stop := startApp(t, app)
	defer stop()

	// A vscard.Client plays vscard connect into the listening slot.
	tok, err := store.Open(cardDir)
	if err != nil {
		t.Fatal(err)
	}
	clientCard, err := cac.New(tok, cac.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cl := vscard.NewClient(func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", vsock)
	}, clientCard, &vscard.ClientOptions{ReaderName: "laptop"})
	clDone := make(chan error, 1)
	go func() { clDone <- cl.Run(ctx) }()
	waitFor(t, func() bool { return app.slots[1].isInserted() })

	h := newCCIDHost(t, app.rd)
	for _, s := range app.slots {
		t.Run(fmt.Sprintf("slot %d %s", s.idx, s.spec.kind), func(t *testing.T) {
			h.t = t
			if got := h.slotStatus(s.idx); got == 2 {
				t.Fatalf("slot %d: no card present", s.idx)
			}
			atr := h.powerOn(s.idx)
			if len(atr) < 2 || atr[0] != 0x3B {
				t.Errorf("ATR % X", atr)
			}
			if got := h.xfr(s.idx, fakehost.SelectACA); !bytes.Equal(got, []byte{0x61, 0x0D}) {
				t.Errorf("SELECT ACA: % X, want 61 0D", got)
			}
		})
	}
	h.t = t
	// A VERIFY through the reader: the PIN never reaches the trace.
	h.xfr(0, []byte{0x00, 0x20, 0x00, 0x80, 0x08, '1', '2', '3', '4', '5', '6', 0xFF, 0xFF})
	if n := cl.Status().APDUs; n != 1 {
		t.Errorf("the VSCard client answered %d APDUs, want 1", n)
	}

	// Control: remove and insert one slot, then all.
	for _, tc := range []struct {
		cmd, want string
		present   []bool // per slot after the command (first two slots)
	}{
		{"remove 0", "slot 0: card removed", []bool{false, true}},
		{"remove 0", "error: slot 0: no card inserted", []bool{false, true}},
		{"insert 0", "slot 0: card inserted", []bool{true, true}},
		{"remove 1", "slot 1: card removed", []bool{true, false}},
		{"insert 1", "slot 1: card inserted", []bool{true, true}},
		{"insert 9", "error: no slot", []bool{true, true}},
		{"insert 0 1", "error: insert takes at most 1 argument", []bool{true, true}},
	} {
		if a := app.handle(ctx, tc.cmd); !strings.HasPrefix(a, tc.want) {
			t.Errorf("%s: %q, want %q", tc.cmd, a, tc.want)
		}
		for i, want := range tc.present {
			if got := h.slotStatus(i) != 2; got != want {
				t.Errorf("after %s: slot %d present %v, want %v", tc.cmd, i, got, want)
			}
		}
	}
	if a := app.handle(ctx, "list"); !strings.Contains(a, "slot 1: card inserted: VSCard client on unix:") || !strings.Contains(a, "connected since") {
		t.Errorf("list:\n%s", a)
	}
	if a := app.handle(ctx, "status"); !strings.Contains(a, "reader: 08e6:4433") || !strings.Contains(a, "apdus: ") {
		t.Errorf("status:\n%s", a)
	}

	// The client removing its card (vscard connect's "remove") empties the
	// slot; its leaving keeps it empty and the log says what the slot
	// waits for.
	if err := cl.Remove(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return !app.slots[1].isInserted() })
	if err := cl.Insert(nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return app.slots[1].isInserted() })
	stop()
	<-clDone
	if !strings.Contains(logBuf.String(), "waiting for one") {
		t.Errorf("log does not say what the VSCard slot waits for:\n%s", logBuf.String())
	}
	if !strings.Contains(trace.String(), `"event":"apdu"`) || !strings.Contains(trace.String(), `"command":"00200080","redacted":9`) {
		t.Errorf("trace lacks the APDUs:\n%s", trace.String())
	}
	if strings.Contains(trace.String(), "313233343536") {
		t.Errorf("trace holds the PIN:\n%s", trace.String())
	}
}

// startApp runs app until stop, which callers defer (after app.close's
// defer, so the reader stops before it is closed) and may call earlier.
// stop cancels the ctx it returns and waits for run: an error from run,
// or a run still going 10 s later, fails the test.
func startApp(t *testing.T, app *readerApp) (ctx context.Context, stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- app.run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("reader run: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Error("reader run did not return within 10 s of its ctx's end")
			}
		})
	}
	return ctx, stop
}

// shortDir is a temporary directory short enough for a socket path.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "vr")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// TestReaderVSCardTooLong: a command APDU over vscclient's 270 bytes gets
// 67 00 from the slot and never reaches the client.
func TestReaderVSCardTooLong(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	srv := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		srv <- c
	}()
	cc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	hconn := <-srv
	h := vscard.NewHost(hconn, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go h.Serve(ctx)
	go func() {
		for range h.Events() {
		}
	}()
	c := &hostCard{h: h, atr: []byte{0x3B, 0}, log: slog.New(slog.DiscardHandler)}
	resp, err := c.Transmit(ctx, make([]byte, 271))
	if err != nil || !bytes.Equal(resp, []byte{0x67, 0x00}) {
		t.Fatalf("271-byte command: % X, %v", resp, err)
	}
	cc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	var b [1]byte
	if n, _ := cc.Read(b[:]); n != 0 {
		t.Fatal("the oversized command reached the client")
	}
	// Without a card the guest's command fails (a reader error), not a
	// crash.
	if _, err := c.Transmit(ctx, []byte{0, 0xA4, 4, 0}); !errors.Is(err, vscard.ErrNoCardPresent) {
		t.Fatalf("no card: %v", err)
	}
}

// app sends a control command and returns the answer ("" on error).
func app(ctx context.Context, sock, cmd string) string {
	a, _ := ctl.Send(ctx, sock, cmd)
	return a
}

// TestReaderCommandLine runs the command itself: it starts, listens for
// QEMU on a usbredir socket, answers the control socket, says what it
// waits for, and exits 0 on SIGTERM (ctx cancelled).
func TestReaderCommandLine(t *testing.T) {
	cardDir := testCard(t)
	d := shortDir(t)
	redir := filepath.Join(d, "redir.sock")
	sock := filepath.Join(d, "ctl", "c.sock")
	trace := filepath.Join(d, "trace.jsonl")
	var stdout, stderr syncBuffer
	stdinR, stdinW := io.Pipe()
	defer stdinW.Close()
	env := &environ{stdin: stdinR, stdout: &stdout, stderr: &stderr}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- runReader(ctx, env, []string{"--usbredir", "unix:" + redir, "--listen", "--card", cardDir,
			"--control", sock, "--trace", trace})
	}()
	waitFor(t, func() bool { _, err := os.Stat(sock); return err == nil })
	a, err := ctl.Send(ctx, sock, "status")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"usbredir unix:" + redir + ": QEMU not connected yet", "slot 0: card inserted", "attached: no"} {
		if !strings.Contains(a, want) {
			t.Errorf("status lacks %q:\n%s", want, a)
		}
	}
	// QEMU connects in (a client chardev): it gets usbredir's hello; a
	// second QEMU meanwhile is closed at once.
	q1, err := net.Dial("unix", redir)
	if err != nil {
		t.Fatal(err)
	}
	defer q1.Close()
	q1.SetReadDeadline(time.Now().Add(5 * time.Second))
	var hello [4]byte
	if _, err := io.ReadFull(q1, hello[:]); err != nil || binary.LittleEndian.Uint32(hello[:]) != 0 {
		t.Fatalf("first QEMU: % X, %v; want a hello", hello, err)
	}
	q2, err := net.Dial("unix", redir)
	if err != nil {
		t.Fatal(err)
	}
	q2.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := q2.Read(make([]byte, 64)); err == nil || n != 0 {
		t.Errorf("second QEMU: read %d bytes, %v; want the connection closed", n, err)
	}
	q2.Close()
	if !strings.Contains(app(ctx, sock, "status"), "attached: over usbredir") {
		t.Error("status does not show the reader attached over usbredir")
	}
	io.WriteString(stdinW, "remove\n")
	waitFor(t, func() bool { return strings.Contains(stdout.String(), "slot 0: card removed") })
	if !strings.Contains(stderr.String(), "QEMU not connected yet") {
		t.Errorf("log does not say it waits for QEMU:\n%s", stderr.String())
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("runReader: %v\n%s", err, stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("runReader did not return")
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control socket left behind: %v", err)
	}
}

// usbipImport sends OP_REQ_IMPORT for busid on a new connection to addr
// and returns the connection and the reply's status (-1: the connection
// was closed without a reply).
func usbipImport(t *testing.T, addr, busid string) (net.Conn, int) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	req := []byte{0x01, 0x11, 0x80, 0x03, 0, 0, 0, 0}
	var b [32]byte
	copy(b[:], busid)
	c.Write(append(req, b[:]...))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var hdr [8]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return c, -1
	}
	if binary.BigEndian.Uint16(hdr[2:]) != 0x0003 {
		t.Fatalf("import reply % X", hdr)
	}
	st := int(binary.BigEndian.Uint32(hdr[4:]))
	if st == 0 {
		rec := make([]byte, 312)
		if _, err := io.ReadFull(c, rec); err != nil {
			t.Fatalf("import record: %v", err)
		}
	}
	c.SetReadDeadline(time.Time{})
	return c, st
}

// TestReaderOneImporter: a USB/IP import claims the reader until the
// client goes; while usbredir has it, an import is turned away, and the
// usbredir dialer waits while a USB/IP client has it.
func TestReaderOneImporter(t *testing.T) {
	d := shortDir(t)
	cfg := &readerConfig{vid: 0x08E6, pid: 0x4433, usbip: "127.0.0.1:0", busid: "1-1",
		usbredir: &target{Network: "unix", Addr: filepath.Join(d, "no-qemu.sock")},
		sources:  []sourceSpec{{kind: srcCard, arg: testCard(t)}}}
	var logBuf syncBuffer
	log := slog.New(slog.NewTextHandler(&logBuf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	app, err := newReaderApp(context.Background(), cfg, log, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := startApp(t, app)
	defer stop()
	var addr string
	waitFor(t, func() bool {
		app.mu.Lock()
		defer app.mu.Unlock()
		if app.usbipAddr != nil {
			addr = app.usbipAddr.String()
		}
		return addr != ""
	})
	// QEMU is not there: usbredir says so and keeps trying.
	waitFor(t, func() bool { return strings.Contains(app.handle(ctx, "status"), "QEMU not connected yet") })

	// A device list does not claim the reader.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte{0x01, 0x11, 0x80, 0x05, 0, 0, 0, 0})
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, 12)); err != nil {
		t.Fatalf("device list: %v", err)
	}
	c.Close()
	if who := app.att.holder(); who == "usbip" {
		t.Fatal("a device list claimed the reader")
	}

	imp, st := usbipImport(t, addr, "1-1")
	if st != 0 {
		t.Fatalf("import status %d", st)
	}
	waitFor(t, func() bool { return app.att.holder() == "usbip" })
	waitFor(t, func() bool {
		return strings.Contains(app.handle(ctx, "status"), "waiting: the reader is attached over usbip")
	})
	// A second import is busy (the server's answer), and its closing
	// leaves the first one's claim alone.
	imp2, st := usbipImport(t, addr, "1-1")
	if st <= 0 {
		t.Fatalf("second import: status %d, want busy", st)
	}
	imp2.Close()
	time.Sleep(100 * time.Millisecond)
	if who := app.att.holder(); who != "usbip" {
		t.Fatalf("after a refused second import the reader is held by %q", who)
	}
	imp.Close()
	waitFor(t, func() bool { return app.att.holder() != "usbip" })

	// usbredir holds it (QEMU attached): an import is refused.
	if ok, who := app.att.acquire("usbredir"); !ok {
		t.Fatalf("the reader is still held by %s", who)
	}
	if _, st := usbipImport(t, addr, "1-1"); st != -1 {
		t.Fatalf("import while usbredir has the reader: status %d, want the connection closed", st)
	}
	if !strings.Contains(logBuf.String(), "usbip attach refused: the reader is attached over usbredir") {
		t.Errorf("log does not say why the import was refused:\n%s", logBuf.String())
	}
	app.att.release("usbredir")
	stop()
}

// TestReaderUSBRedirReconnect: the usbredir dialer connects to "QEMU"
// (a socket the test listens on), says hello, and when QEMU goes away
// (restarts) connects again.
func TestReaderUSBRedirReconnect(t *testing.T) {
	d := shortDir(t)
	path := filepath.Join(d, "qemu.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg := &readerConfig{vid: 0x08E6, pid: 0x4433, usbredir: &target{Network: "unix", Addr: path},
		sources: []sourceSpec{{kind: srcCard, arg: testCard(t)}}}
	app, err := newReaderApp(context.Background(), cfg, slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	_, stop := startApp(t, app)
	defer stop()
	for i := range 2 {
		ln.(*net.UnixListener).SetDeadline(time.Now().Add(10 * time.Second))
		c, err := ln.Accept()
		if err != nil {
			t.Fatalf("connection %d: %v", i+1, err)
		}
		// usbredir's hello comes first (protocols.md §6): type 0.
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		var hdr [4]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil || binary.LittleEndian.Uint32(hdr[:]) != 0 {
			t.Errorf("connection %d: first bytes % X, %v; want a hello", i+1, hdr, err)
		}
		waitFor(t, func() bool { return app.att.holder() == "usbredir" })
		c.Close()
	}
	stop()
	if who := app.att.holder(); who != "" {
		t.Errorf("the reader is still held by %s after shutdown", who)
	}
}

// TestReaderPCSCWithoutDaemon: a --pcsc slot with no pcscd starts empty,
// says what it waits for, refuses insert and remove clearly; the bridge's
// Slot view of the CCID slot moves a card in and out.
func TestReaderPCSCWithoutDaemon(t *testing.T) {
	t.Setenv("PCSCLITE_CSOCK_NAME", filepath.Join(t.TempDir(), "no-pcscd.comm"))
	cfg := &readerConfig{vid: 0x08E6, pid: 0x4433, sources: []sourceSpec{{kind: srcPCSC, arg: "Virtual PCD 00 00"}}}
	var logBuf syncBuffer
	log := slog.New(slog.NewTextHandler(&logBuf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	app, err := newReaderApp(context.Background(), cfg, log, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := startApp(t, app)
	defer stop()
	waitFor(t, func() bool { return strings.Contains(logBuf.String(), "waiting for pcscd") })
	if a := app.handle(ctx, "list"); !strings.Contains(a, "slot 0: empty: physical card in PC/SC reader \"Virtual PCD 00 00\"") ||
		!strings.Contains(a, "pcscd: not reachable") {
		t.Errorf("list:\n%s", a)
	}
	for _, cmd := range []string{"insert", "remove 0"} {
		if a := app.handle(ctx, cmd); !ctl.IsError(a) {
			t.Errorf("%s with no card: %q", cmd, a)
		}
	}

	h := newCCIDHost(t, app.rd)
	slot := ccidSlot{app, app.slots[0]}
	if err := slot.AddReader(); err != nil || h.slotStatus(0) != 2 {
		t.Fatalf("AddReader: %v; slot status %d, want 2 (absent)", err, h.slotStatus(0))
	}
	tok, err := store.Open(testCard(t))
	if err != nil {
		t.Fatal(err)
	}
	c, err := cac.New(tok, cac.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := slot.Insert(c); err != nil {
		t.Fatal(err)
	}
	if st := h.slotStatus(0); st == 2 {
		t.Fatal("inserted card absent")
	}
	if atr := h.powerOn(0); !bytes.Equal(atr, c.ATR()) {
		t.Errorf("ATR % X, want the card's % X", atr, c.ATR())
	}
	// A reader unplugged takes its card with it.
	if err := slot.RemoveReader(); err != nil || h.slotStatus(0) != 2 {
		t.Fatalf("RemoveReader: %v; slot status %d, want 2", err, h.slotStatus(0))
	}
	stop()
}

// TestReaderVSCardTLS: with --tls-cert/--tls-key/--tls-ca the VSCard
// listener is TLS and wants a client certificate from the CA: vscard
// connect's TLS client gets its card into the slot; a client without a
// certificate does not.
func TestReaderVSCardTLS(t *testing.T) {
	p := newPKI(t)
	vsock := filepath.Join(shortDir(t), "v.sock")
	tgt := target{Network: "unix", Addr: vsock}
	cfg := &readerConfig{vid: 0x08E6, pid: 0x4433, sources: []sourceSpec{{kind: srcVSCard, arg: "unix:" + vsock, addr: tgt}},
		tlsCA: p.caFile, tlsCert: filepath.Join(p.dir, "server-cert.pem"), tlsKey: filepath.Join(p.dir, "server-key.pem")}
	app, err := newReaderApp(context.Background(), cfg, slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := startApp(t, app)
	defer stop()
	waitFor(t, func() bool { _, err := os.Stat(vsock); return err == nil })

	tok, err := store.Open(testCard(t))
	if err != nil {
		t.Fatal(err)
	}
	c, err := cac.New(tok, cac.Options{})
	if err != nil {
		t.Fatal(err)
	}
	// No client certificate: the handshake fails and the slot stays empty.
	noCert, err := clientTLSConfig(p.caFile, "", "", "localhost", tgt)
	if err != nil {
		t.Fatal(err)
	}
	bad := vscard.NewClient(dialer(tgt, noCert), c, nil)
	bctx, bcancel := context.WithTimeout(ctx, 500*time.Millisecond)
	bad.Run(bctx)
	bcancel()
	vs := app.slots[0].vs
	vs.mu.Lock()
	served, lastErr := vs.clients, vs.lastErr
	vs.mu.Unlock()
	if served != 0 || app.slots[0].isInserted() {
		t.Fatal("a client without a certificate got through")
	}
	if lastErr == "" {
		t.Error("the failed handshake left no error for list/status")
	}

	good, err := clientTLSConfig(p.caFile, p.certFile, p.keyFile, "localhost", tgt)
	if err != nil {
		t.Fatal(err)
	}
	cl := vscard.NewClient(dialer(tgt, good), c, nil)
	clDone := make(chan error, 1)
	go func() { clDone <- cl.Run(ctx) }()
	waitFor(t, func() bool { return app.slots[0].isInserted() })
	h := newCCIDHost(t, app.rd)
	h.powerOn(0)
	if got := h.xfr(0, fakehost.SelectACA); !bytes.Equal(got, []byte{0x61, 0x0D}) {
		t.Errorf("SELECT ACA over TLS: % X", got)
	}
	stop()
	<-clDone
}

// TestReaderVSCClientQuirks plays vscclient by hand on a --vscard-listen
// slot: reader_id 0, an Error answer in host byte order for an APDU its
// card cannot process. Through CCID, that APDU fails (a reader error the
// guest's driver reports) and the slot keeps serving; a command over 270
// bytes gets 67 00 without reaching the client; the client's leaving
// empties the slot. A failed APDU is answered 6F 00 and the card stays:
// the reader would take out a card whose Transmit fails.
func TestReaderVSCClientQuirks(t *testing.T) {
	vsock := filepath.Join(shortDir(t), "v.sock")
	cfg := &readerConfig{vid: 0x08E6, pid: 0x4433, sources: []sourceSpec{
		{kind: srcVSCard, arg: "unix:" + vsock, addr: target{Network: "unix", Addr: vsock}}}}
	app, err := newReaderApp(context.Background(), cfg, slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := startApp(t, app)
	defer stop()
	var c net.Conn
	waitFor(t, func() bool { c, err = net.Dial("unix", vsock); return err == nil })
	defer c.Close()
	send := func(typ vscard.MsgType, payload []byte) {
		t.Helper()
		if _, err := c.Write(vscard.AppendMessage(nil, vscard.Message{Type: typ, ReaderID: 0, Payload: payload})); err != nil {
			t.Fatal(err)
		}
	}
	var buf []byte
	nread := 0
	recv := func() vscard.Message {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		m, b, err := vscard.ReadMessage(c, buf)
		if err != nil {
			t.Fatalf("read from the host: %v (after %d messages)", err, nread)
		}
		buf = b
		nread++
		return m
	}
	// vscclient's opening: Init, ReaderAdd (no name), ATR.
	send(vscard.MsgInit, vscard.InitPayload(0))
	if m := recv(); m.Type != vscard.MsgInit {
		t.Fatalf("answer to Init: %v", m.Type)
	}
	send(vscard.MsgReaderAdd, nil)
	recv()
	atr := []byte{0x3B, 0x7A, 0x18, 0x00, 0x00, 0x73, 0x66, 0x74, 0x65, 0x20, 0x63, 0x64, 0x31, 0x34, 0x34}
	send(vscard.MsgATR, atr)
	recv()
	waitFor(t, func() bool { return app.slots[0].isInserted() })

	h := newCCIDHost(t, app.rd)
	if got := h.powerOn(0); !bytes.Equal(got, atr) {
		t.Errorf("ATR % X, want the client's % X", got, atr)
	}
	relay := func(cmd []byte, answer func()) (byte, []byte) {
		t.Helper()
		type res struct {
			st   byte
			resp []byte
		}
		ch := make(chan res, 1)
		go func() {
			st, _, resp := h.command(0, 0x6F, cmd, [3]byte{})
			ch <- res{st, resp}
		}()
		if answer != nil {
			m := recv()
			if m.Type != vscard.MsgAPDU || !bytes.Equal(m.Payload, cmd) {
				t.Fatalf("client got %v % X, want the APDU % X", m.Type, m.Payload, cmd)
			}
			answer()
		}
		r := <-ch
		return r.st, r.resp
	}
	// VREADER_NO_CARD as vscclient sends it: host order, 01 00 00 00.
	st, resp := relay([]byte{0x00, 0xCA, 0x01, 0x00, 0x00}, func() { send(vscard.MsgError, []byte{1, 0, 0, 0}) })
	if st&0x40 != 0 || !bytes.Equal(resp, []byte{0x6F, 0x00}) {
		t.Errorf("an APDU the client failed: bStatus %02X, % X; want 6F 00 and the card kept", st, resp)
	}
	st, resp = relay([]byte{0x00, 0xB0, 0x00, 0x00, 0x00}, func() { send(vscard.MsgAPDU, []byte{0x6A, 0x82}) })
	if st&0x40 != 0 || !bytes.Equal(resp, []byte{0x6A, 0x82}) {
		t.Errorf("next APDU: bStatus %02X, % X", st, resp)
	}
	long := append([]byte{0x80, 0x42, 0x00, 0x00, 0x00, 0x01, 0x10}, make([]byte, 272)...)
	st, resp = relay(long, nil)
	if st&0x40 != 0 || !bytes.Equal(resp, []byte{0x67, 0x00}) {
		t.Errorf("%d-byte APDU: bStatus %02X, % X; want 67 00", len(long), st, resp)
	}
	// ReaderRemove takes the card out; a disconnect keeps the slot empty.
	send(vscard.MsgReaderRemove, nil)
	recv()
	waitFor(t, func() bool { return !app.slots[0].isInserted() })
	if h.slotStatus(0) != 2 {
		t.Error("card still present after ReaderRemove")
	}
	c.Close()
	waitFor(t, func() bool { return strings.Contains(app.handle(ctx, "list"), "no VSCard client (waiting on unix:") })
	stop()
}

// failingCard answers power-on and fails every APDU, as a physical card
// pulled out mid-command does.
type failingCard struct{}

func (failingCard) ATR() []byte { return []byte{0x3B, 0x00} }
func (failingCard) PowerOn()    {}
func (failingCard) PowerOff()   {}
func (failingCard) Reset()      {}
func (failingCard) Transmit(context.Context, []byte) ([]byte, error) {
	return nil, errors.New("card pulled out")
}

// TestReaderFailedCardLeavesSlot: the reader takes out a card whose
// Transmit fails; the slot's state follows, so list says empty, "insert"
// works again and the PC/SC bridge sees the slot no longer holds it.
func TestReaderFailedCardLeavesSlot(t *testing.T) {
	cfg := &readerConfig{vid: 0x08E6, pid: 0x4433, sources: []sourceSpec{{kind: srcPCSC, arg: "x"}}}
	app, err := newReaderApp(context.Background(), cfg, slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	s := app.slots[0]
	slot := ccidSlot{app, s}
	if err := slot.Insert(failingCard{}); err != nil {
		t.Fatal(err)
	}
	h := newCCIDHost(t, app.rd)
	h.powerOn(0)
	if st, _, _ := h.command(0, 0x6F, []byte{0, 0xA4, 4, 0, 0}, [3]byte{}); st&0x40 == 0 {
		t.Fatalf("XfrBlock to a failing card: bStatus %02X, want failed", st)
	}
	if slot.HoldsCard() || s.isInserted() {
		t.Fatal("the slot still claims the failed card")
	}
	if !strings.Contains(app.handle(context.Background(), "list"), "slot 0: empty") {
		t.Errorf("list:\n%s", app.handle(context.Background(), "list"))
	}
	if err := slot.Insert(failingCard{}); err != nil || h.slotStatus(0) == 2 {
		t.Fatalf("insert after the failure: %v, slot status %d", err, h.slotStatus(0))
	}
}

// stuckCard answers no APDU until its command is cancelled, then fails.
type stuckCard struct {
	failingCard
	started chan struct{}
}

func (c stuckCard) Transmit(ctx context.Context, _ []byte) ([]byte, error) {
	close(c.started)
	<-ctx.Done()
	return nil, ctx.Err()
}

// TestReaderReplaceBusyCard: replacing a card while the host waits on it
// (a VSCard client's reset ATR, a PC/SC card swapped) neither deadlocks
// with the trace hook nor leaves the new card out.
func TestReaderReplaceBusyCard(t *testing.T) {
	cfg := &readerConfig{vid: 0x08E6, pid: 0x4433, sources: []sourceSpec{{kind: srcPCSC, arg: "x"}}}
	app, err := newReaderApp(context.Background(), cfg, slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	slot := ccidSlot{app, app.slots[0]}
	stuck := stuckCard{started: make(chan struct{})}
	if err := slot.Insert(stuck); err != nil {
		t.Fatal(err)
	}
	h := newCCIDHost(t, app.rd)
	h.powerOn(0)
	done := make(chan struct{})
	go func() {
		defer close(done)
		// The host's answer for the old card: failed, whatever the reason.
		h.command(0, 0x6F, []byte{0, 0xB0, 0, 0, 0}, [3]byte{})
	}()
	<-stuck.started
	inserted := make(chan error, 1)
	go func() { inserted <- slot.Insert(failingCard{}) }()
	select {
	case err := <-inserted:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Insert over a busy card deadlocked")
	}
	<-done
	if !slot.HoldsCard() {
		t.Error("the new card is not held after replacing a busy one")
	}
}

// usbipURB is a minimal USB/IP client on an imported connection
// (protocols.md §5): one URB at a time.
type usbipURB struct {
	t     *testing.T
	c     net.Conn
	devid uint32
	seq   uint32
}

// submit sends CMD_SUBMIT and returns RET_SUBMIT's status and IN data.
func (u *usbipURB) submit(dirIn bool, ep uint32, setup []byte, out []byte, inLen int) (int32, []byte) {
	u.t.Helper()
	u.seq++
	h := make([]byte, 48)
	binary.BigEndian.PutUint32(h[0:], 1)
	binary.BigEndian.PutUint32(h[4:], u.seq)
	binary.BigEndian.PutUint32(h[8:], u.devid)
	dir, n := uint32(0), uint32(len(out))
	if dirIn {
		dir, n = 1, uint32(inLen)
	}
	binary.BigEndian.PutUint32(h[12:], dir)
	binary.BigEndian.PutUint32(h[16:], ep)
	binary.BigEndian.PutUint32(h[24:], n)
	copy(h[40:], setup)
	if _, err := u.c.Write(append(h, out...)); err != nil {
		u.t.Fatal(err)
	}
	u.c.SetReadDeadline(time.Now().Add(20 * time.Second))
	r := make([]byte, 48)
	if _, err := io.ReadFull(u.c, r); err != nil {
		u.t.Fatalf("RET_SUBMIT: %v", err)
	}
	if binary.BigEndian.Uint32(r[0:]) != 3 || binary.BigEndian.Uint32(r[4:]) != u.seq {
		u.t.Fatalf("reply % X to seq %d", r[:8], u.seq)
	}
	st := int32(binary.BigEndian.Uint32(r[20:]))
	var data []byte
	if dirIn {
		data = make([]byte, binary.BigEndian.Uint32(r[24:]))
		if _, err := io.ReadFull(u.c, data); err != nil {
			u.t.Fatal(err)
		}
	}
	return st, data
}

// ccid sends one CCID command on bulk OUT 3 and reads the answer on bulk
// IN 2, skipping time extensions.
func (u *usbipURB) ccid(slot byte, typ byte, data []byte) (byte, []byte) {
	u.t.Helper()
	f := make([]byte, 10, 10+len(data))
	f[0] = typ
	binary.LittleEndian.PutUint32(f[1:], uint32(len(data)))
	f[5], f[6] = slot, byte(u.seq)
	f = append(f, data...)
	if st, _ := u.submit(false, 3, nil, f, 0); st != 0 {
		u.t.Fatalf("bulk OUT status %d", st)
	}
	for {
		st, msg := u.submit(true, 2, nil, nil, 65546)
		if st != 0 || len(msg) < 10 {
			u.t.Fatalf("bulk IN status %d, % X", st, msg)
		}
		if msg[7]&0xC0 == 0x80 {
			continue
		}
		return msg[7], msg[10:]
	}
}

// TestReaderUSBIPEndToEnd runs "vscard reader --usbip" with two cards and
// plays the kernel's vhci over TCP: import the bus id, configure the
// device, power each slot on and SELECT the CAC ACA; the log names what
// the reader waited for.
func TestReaderUSBIPEndToEnd(t *testing.T) {
	cardDir := testCard(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	d := shortDir(t)
	sock := filepath.Join(d, "ctl.sock")
	var stdout, stderr syncBuffer
	env := &environ{stdin: strings.NewReader(""), stdout: &stdout, stderr: &stderr}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- runReader(ctx, env, []string{"--usbip", addr, "--busid", "3-2", "--card", cardDir, "--card", cardDir,
			"--vid-pid", "1234:5678", "--control", sock, "--no-stdin"})
	}()
	var c net.Conn
	waitFor(t, func() bool { c, err = net.Dial("tcp", addr); return err == nil })
	defer c.Close()
	var busid [32]byte
	copy(busid[:], "3-2")
	c.Write(append([]byte{0x01, 0x11, 0x80, 0x03, 0, 0, 0, 0}, busid[:]...))
	rep := make([]byte, 8+312)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, rep); err != nil || binary.BigEndian.Uint32(rep[4:]) != 0 {
		t.Fatalf("import: % X %v", rep[:8], err)
	}
	rec := rep[8:]
	if vid, pid := binary.BigEndian.Uint16(rec[0x12C:]), binary.BigEndian.Uint16(rec[0x12E:]); vid != 0x1234 || pid != 0x5678 {
		t.Errorf("device %04x:%04x, want --vid-pid 1234:5678", vid, pid)
	}
	u := &usbipURB{t: t, c: c, devid: binary.BigEndian.Uint32(rec[0x120:])<<16 | binary.BigEndian.Uint32(rec[0x124:])}
	// SET_CONFIGURATION(bConfigurationValue).
	setup := usb.Setup{Request: usb.ReqSetConfiguration, Value: uint16(rec[0x135])}.Bytes()
	if st, _ := u.submit(false, 0, setup, nil, 0); st != 0 {
		t.Fatalf("SET_CONFIGURATION: status %d", st)
	}
	for slot := byte(0); slot < 2; slot++ {
		st, atr := u.ccid(slot, 0x62, nil)
		if st&0x40 != 0 || len(atr) < 2 {
			t.Fatalf("slot %d power on: bStatus %02X, ATR % X", slot, st, atr)
		}
		st, resp := u.ccid(slot, 0x6F, fakehost.SelectACA)
		if st&0x40 != 0 || !bytes.Equal(resp, []byte{0x61, 0x0D}) {
			t.Errorf("slot %d SELECT ACA: bStatus %02X, % X", slot, st, resp)
		}
	}
	if a := app(ctx, sock, "status"); !strings.Contains(a, "attached: over usbip") || !strings.Contains(a, "USB/IP client attached") {
		t.Errorf("status:\n%s", a)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("runReader: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("runReader did not return")
	}
	for _, want := range []string{"no USB/IP client attached yet; waiting for one", "USB/IP client attached the reader", "usbip --tcp-port"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, stderr.String())
		}
	}
}

// TestReaderAbortKeepsCard: a host's ABORT cancels the slot's command;
// the card stays in the reader and in the slot's view.
func TestReaderAbortKeepsCard(t *testing.T) {
	cfg := &readerConfig{vid: 0x08E6, pid: 0x4433, sources: []sourceSpec{{kind: srcPCSC, arg: "x"}}}
	app, err := newReaderApp(context.Background(), cfg, slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	slot := ccidSlot{app, app.slots[0]}
	stuck := stuckCard{started: make(chan struct{})}
	if err := slot.Insert(stuck); err != nil {
		t.Fatal(err)
	}
	h := newCCIDHost(t, app.rd)
	h.powerOn(0)
	type res struct{ st, e byte }
	ch := make(chan res, 1)
	go func() {
		st, e, _ := h.command(0, 0x6F, []byte{0, 0xB0, 0, 0, 0}, [3]byte{})
		ch <- res{st, e}
	}()
	<-stuck.started
	// ABORT class request: wValue = bSeq<<8 | bSlot (CCID 1.1 §5.3.1).
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := app.rd.Control(ctx, usb.Setup{RequestType: 0x21, Request: 0x01, Value: uint16(h.seq+1) << 8}, nil); err != nil {
		t.Fatalf("ABORT: %v", err)
	}
	r := <-ch
	if r.st&0x40 == 0 {
		t.Errorf("aborted XfrBlock: bStatus %02X, want failed", r.st)
	}
	if !slot.HoldsCard() {
		t.Error("an aborted command took the card out of the slot's view")
	}
	if h.slotStatus(0) == 2 {
		t.Error("an aborted command took the card out of the reader")
	}
}
