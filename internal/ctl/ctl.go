// Package ctl is the control socket of a running "vscard connect": a Unix
// socket on which "vscard ctl" (or socat) sends one command line and reads
// the answer.
//
// # Protocol
//
// One command per connection: the client writes a single line of at most
// MaxLine bytes ending in '\n', the server writes the answer — human-readable
// lines; a failed command's answer starts with "error:" — and closes the
// connection. Keeping it line-based means `echo status | socat - UNIX:PATH`
// works as well as vscard ctl.
//
// # Security model
//
// Whoever can connect can remove the card or stop the process, so the socket
// lives in a directory only its owner can enter (0700, checked, like ssh-agent
// and $XDG_RUNTIME_DIR) and is itself made 0600.
package ctl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// MaxLine bounds a command line; longer ones are refused without buffering
// them.
const MaxLine = 4096

// maxAnswer bounds what the client reads back.
const maxAnswer = 1 << 20

// ioTimeout bounds how long a peer may take to send its line, so a stuck
// client cannot pin a server goroutine.
const ioTimeout = 10 * time.Second

// ErrNotRunning reports that nothing listens on the socket.
var ErrNotRunning = errors.New("ctl: no vscard connect or vscard reader is listening")

// Handler answers one command line (without its newline). An answer for a
// failed command should start with "error:".
type Handler func(ctx context.Context, line string) string

// IsError reports whether an answer reports a failed command.
func IsError(answer string) bool { return strings.HasPrefix(answer, "error:") }

// DefaultDir is the directory for control sockets:
// $XDG_RUNTIME_DIR/vscard, else $TMPDIR/vscard-<uid>.
func DefaultDir() string {
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "vscard")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("vscard-%d", os.Getuid()))
}

// DefaultPath is the socket of the process with the given pid in DefaultDir.
func DefaultPath(pid int) string {
	return filepath.Join(DefaultDir(), fmt.Sprintf("connect-%d.sock", pid))
}

// Listen creates the socket at path, mode 0600 from the start. It makes the
// parent directory (0700) if needed; the default directory (DefaultDir) must
// not be open to others, since it is shared by every vscard connect of the
// user. A directory the user names is theirs to choose: the socket's own
// mode protects it (Linux checks write permission on connect). A socket file
// left behind by a dead process is replaced; one a live process answers on
// is an error.
func Listen(path string) (net.Listener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("ctl: make socket directory: %w", err)
	}
	if filepath.Clean(dir) == filepath.Clean(DefaultDir()) {
		if err := checkDir(dir); err != nil {
			return nil, err
		}
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("ctl: %s exists and is not a socket", path)
		}
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil, fmt.Errorf("ctl: %s is in use by another process", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("ctl: remove stale socket: %w", err)
		}
	}
	ln, err := listenPrivate(path)
	if err != nil {
		return nil, fmt.Errorf("ctl: %w", err)
	}
	// Belt and braces where the umask could not be applied.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("ctl: %w", err)
	}
	return ln, nil
}

// checkDir refuses a socket directory that group or others can use, or that
// another user owns.
func checkDir(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("ctl: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("ctl: %s is not a directory", dir)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("ctl: socket directory %s has mode %v; others could control the card (chmod 700 %s)", dir, fi.Mode().Perm(), dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Getuid() {
		return fmt.Errorf("ctl: socket directory %s belongs to uid %d, not to you", dir, st.Uid)
	}
	return nil
}

// Serve answers connections on ln with h until ctx ends, then closes ln and
// waits for the connections in progress. It returns nil when ctx ended.
func Serve(ctx context.Context, ln net.Listener, h Handler, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer ln.Close()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			return fmt.Errorf("ctl: accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			serveConn(ctx, c, h, log)
		}()
	}
}

func serveConn(ctx context.Context, c net.Conn, h Handler, log *slog.Logger) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	line, err := readLine(c, MaxLine)
	if err != nil {
		log.Debug("control connection", "err", err)
		if errors.Is(err, errTooLong) {
			io.WriteString(c, "error: command line too long\n")
		}
		return
	}
	answer := h(ctx, line)
	if answer != "" && !strings.HasSuffix(answer, "\n") {
		answer += "\n"
	}
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := io.WriteString(c, answer); err != nil {
		log.Debug("control connection: write answer", "err", err)
	}
}

var errTooLong = errors.New("ctl: command line too long")

// readLine reads one line of at most max bytes; EOF ends a line too, so
// `printf status | socat` works.
func readLine(r io.Reader, max int) (string, error) {
	br := bufio.NewReaderSize(io.LimitReader(r, int64(max)+1), 512)
	s, err := br.ReadString('\n')
	if err != nil && !(errors.Is(err, io.EOF) && s != "") {
		if len(s) > max {
			return "", errTooLong
		}
		return "", err
	}
	if len(s) > max {
		return "", errTooLong
	}
	return strings.TrimRight(s, "\r\n"), nil
}

// Send sends one command line to the socket at path and returns the answer.
// It fails with an error wrapping ErrNotRunning when nothing listens there.
func Send(ctx context.Context, path, line string) (string, error) {
	if strings.ContainsAny(line, "\n\r") {
		return "", errors.New("ctl: command contains a newline")
	}
	if len(line) >= MaxLine {
		return "", errTooLong
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return "", fmt.Errorf("%w on %s", ErrNotRunning, path)
		}
		return "", fmt.Errorf("ctl: %w", err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return "", fmt.Errorf("ctl: send: %w", err)
	}
	b, err := io.ReadAll(io.LimitReader(c, maxAnswer))
	if err != nil {
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		return "", fmt.Errorf("ctl: read answer: %w", err)
	}
	return string(b), nil
}

// Find returns the only live socket in dir, for "vscard ctl" without
// --control. It fails when there is none or more than one, naming them.
// Probing a socket makes its server see an empty connection, which it drops.
func Find(dir string) (string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("ctl: %w", err)
	}
	var socks []string
	for _, e := range ents {
		if e.Type() != fs.ModeSocket || !strings.HasSuffix(e.Name(), ".sock") {
			continue
		}
		// A process killed with SIGKILL leaves its socket behind: skip
		// sockets nobody answers on.
		p := filepath.Join(dir, e.Name())
		c, err := net.DialTimeout("unix", p, time.Second)
		if err != nil {
			continue
		}
		c.Close()
		socks = append(socks, p)
	}
	switch len(socks) {
	case 0:
		return "", fmt.Errorf("%w: no control socket in %s; is vscard connect or vscard reader running?", ErrNotRunning, dir)
	case 1:
		return socks[0], nil
	}
	return "", fmt.Errorf("ctl: %d control sockets in %s, choose one with --control: %s", len(socks), dir, strings.Join(socks, ", "))
}
