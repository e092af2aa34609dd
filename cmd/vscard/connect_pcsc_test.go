package main

import (
	"bytes"
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vscard/vscard/internal/ctl"
	"github.com/vscard/vscard/internal/fakehost"
)

func TestConnectPCSCUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"connect", "--pcsc"}, "at least one TARGET"},
		{[]string{"connect", "--pcsc", "--card", "/x", "tcp:127.0.0.1:1"}, "does not go with --card, --nss or --strict"},
		{[]string{"connect", "--pcsc", "--strict", "tcp:127.0.0.1:1"}, "does not go with --card, --nss or --strict"},
		{[]string{"connect", "--pcsc", "tcp:127.0.0.1:1", "tcp:127.0.0.1:2"}, "need --reader all"},
		{[]string{"connect", "--pcsc", "--reader", "all", "tcp:127.0.0.1:1", "nowhere"}, "want tcp:HOST:PORT"},
		{[]string{"connect", "--reader", "Virtual", "tcp:127.0.0.1:1"}, "go with --pcsc"},
		{[]string{"connect", "--allow-last-pin-try", "tcp:127.0.0.1:1"}, "go with --pcsc"},
		{[]string{"connect", "--exclusive", "tcp:127.0.0.1:1"}, "go with --pcsc"},
		{[]string{"connect", "--keep-atr", "tcp:127.0.0.1:1"}, "go with --pcsc"},
	} {
		var out bytes.Buffer
		code := run(context.Background(), &environ{stdin: strings.NewReader(""), stdout: &out, stderr: &out}, tc.args)
		if code != exitUsage || !strings.Contains(out.String(), tc.want) {
			t.Errorf("%q: exit %d, output %q; want exit %d and %q", tc.args, code, out.String(), exitUsage, tc.want)
		}
	}
}

// TestConnectPCSCWithoutDaemon: with no pcscd, connect --pcsc still links
// up with QEMU, clears its reader and adds none, says what it waits for,
// and quits cleanly.
func TestConnectPCSCWithoutDaemon(t *testing.T) {
	t.Setenv("PCSCLITE_CSOCK_NAME", filepath.Join(t.TempDir(), "no-pcscd.comm"))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	sock := shortSocket(t)
	var stdout, stderr syncBuffer
	env := &environ{stdin: strings.NewReader(""), stdout: &stdout, stderr: &stderr}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- runConnect(ctx, env, []string{"--pcsc", "--reader", "Virtual PCD 00 00", "--control", sock,
			"--log-level", "debug", "tcp:" + ln.Addr().String()})
	}()
	h := fakehost.Accept(t, ln)
	h.Expect(fakehost.TInit)
	h.Expect(fakehost.TReaderRemove)
	waitFor(t, func() bool { return strings.Contains(stderr.String(), "waiting for pcscd") })

	send := func(cmd string) string {
		t.Helper()
		a, err := ctl.Send(ctx, sock, cmd)
		if err != nil {
			t.Fatalf("ctl %s: %v", cmd, err)
		}
		return a
	}
	if a := send("status"); !strings.Contains(a, "pcscd: not reachable") || !strings.Contains(a, "pcsc reader: none") {
		t.Errorf("status:\n%s", a)
	}
	if a := send("list"); !strings.Contains(a, `no PC/SC reader (waiting for a reader matching "Virtual PCD 00 00")`) {
		t.Errorf("list:\n%s", a)
	}
	if a := send("insert"); !ctl.IsError(a) {
		t.Errorf("insert with no card: %q", a)
	}
	if a := send("remove"); !ctl.IsError(a) {
		t.Errorf("remove with no card: %q", a)
	}
	cancel()
	h.Expect(fakehost.TReaderRemove)
	h.ExpectClose()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("runConnect: %v\nlog:\n%s", err, stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("runConnect did not return after cancel")
	}
}
