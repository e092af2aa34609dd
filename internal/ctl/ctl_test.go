package ctl

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// shortDir returns a private directory with a short path: a Unix socket
// path must fit in 108 bytes, and t.TempDir can be longer.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "ctl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func startServer(t *testing.T, path string, h Handler) (cancel func()) {
	t.Helper()
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancelCtx := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, h, nil) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancelCtx()
			if err := <-done; err != nil {
				t.Errorf("Serve: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func TestRoundTrip(t *testing.T) {
	dir := filepath.Join(shortDir(t), "s")
	path := filepath.Join(dir, "c.sock")
	var mu sync.Mutex
	var seen []string
	startServer(t, path, func(_ context.Context, line string) string {
		mu.Lock()
		seen = append(seen, line)
		mu.Unlock()
		switch line {
		case "status":
			return "connected: yes\ncard: inserted"
		case "bad":
			return "error: no such thing"
		}
		return "ok"
	})
	fi, err := os.Stat(dir)
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("socket dir mode %v, %v", fi.Mode(), err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, %v", fi.Mode(), err)
	}
	for _, tc := range []struct{ cmd, want string }{
		{"status", "connected: yes\ncard: inserted\n"},
		{"bad", "error: no such thing\n"},
		{"insert", "ok\n"},
	} {
		got, err := Send(context.Background(), path, tc.cmd)
		if err != nil {
			t.Fatal(err)
		}
		if got != tc.want {
			t.Errorf("%s: %q, want %q", tc.cmd, got, tc.want)
		}
		if IsError(got) != strings.HasPrefix(tc.want, "error:") {
			t.Errorf("IsError(%q) wrong", got)
		}
	}
	if len(seen) != 3 || seen[0] != "status" {
		t.Errorf("handler saw %q", seen)
	}
	// Find picks the only live socket.
	if p, err := Find(dir); err != nil || p != path {
		t.Errorf("Find = %q, %v", p, err)
	}
}

func TestNotRunning(t *testing.T) {
	dir := shortDir(t)
	_, err := Send(context.Background(), filepath.Join(dir, "none.sock"), "status")
	if !errors.Is(err, ErrNotRunning) {
		t.Errorf("missing socket: %v", err)
	}
	// A stale socket file (process killed): connection refused.
	p := filepath.Join(dir, "stale.sock")
	ln, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := Send(context.Background(), p, "status"); !errors.Is(err, ErrNotRunning) {
		t.Errorf("stale socket: %v", err)
	}
	if _, err := Find(dir); !errors.Is(err, ErrNotRunning) {
		t.Errorf("Find with only a stale socket: %v", err)
	}
	// Listen replaces the stale socket.
	startServer(t, p, func(context.Context, string) string { return "ok" })
	if got, err := Send(context.Background(), p, "x"); err != nil || got != "ok\n" {
		t.Errorf("after replacing stale socket: %q, %v", got, err)
	}
	// ... but not a live one.
	if _, err := Listen(p); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("Listen on a live socket: %v", err)
	}
}

func TestFindSeveral(t *testing.T) {
	dir := shortDir(t)
	os.Chmod(dir, 0o700)
	for _, n := range []string{"a.sock", "b.sock"} {
		startServer(t, filepath.Join(dir, n), func(context.Context, string) string { return "" })
	}
	if _, err := Find(dir); err == nil || !strings.Contains(err.Error(), "2 control sockets") {
		t.Errorf("Find: %v", err)
	}
}

func TestListenDirModes(t *testing.T) {
	// The shared default directory must be private...
	rt := shortDir(t)
	t.Setenv("XDG_RUNTIME_DIR", rt)
	if err := os.Mkdir(filepath.Join(rt, "vscard"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(DefaultPath(1)); err == nil || !strings.Contains(err.Error(), "chmod 700") {
		t.Errorf("Listen in a 0755 default dir: %v", err)
	}
	os.Chmod(filepath.Join(rt, "vscard"), 0o700)
	ln, err := Listen(DefaultPath(1))
	if err != nil {
		t.Fatalf("Listen in a 0700 default dir: %v", err)
	}
	ln.Close()
	// ... a directory the user names need not be; the socket is 0600.
	dir := shortDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "c.sock")
	ln, err = Listen(p)
	if err != nil {
		t.Fatalf("Listen in a named 0755 dir: %v", err)
	}
	defer ln.Close()
	if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, %v", fi.Mode(), err)
	}
}

func TestLongLine(t *testing.T) {
	path := filepath.Join(shortDir(t), "c.sock")
	called := false
	startServer(t, path, func(context.Context, string) string { called = true; return "ok" })
	if _, err := Send(context.Background(), path, strings.Repeat("x", MaxLine)); err == nil {
		t.Error("Send accepted an over-long line")
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	go c.Write([]byte(strings.Repeat("x", 3*MaxLine)))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 100)
	n, _ := c.Read(b)
	if !strings.HasPrefix(string(b[:n]), "error: command line too long") {
		t.Errorf("answer %q", b[:n])
	}
	if called {
		t.Error("handler called for an over-long line")
	}
	if _, err := Send(context.Background(), path, "a\nb"); err == nil {
		t.Error("Send accepted a newline")
	}
}

func TestEOFEndsLine(t *testing.T) {
	path := filepath.Join(shortDir(t), "c.sock")
	startServer(t, path, func(_ context.Context, l string) string { return "got " + l })
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("status"))
	c.(*net.UnixConn).CloseWrite()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 100)
	n, _ := c.Read(b)
	if string(b[:n]) != "got status\n" {
		t.Errorf("answer %q", b[:n])
	}
}
