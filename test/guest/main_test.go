package guest

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vscard/vscard/internal/pcscdtest"
)

// Set up once by TestMain when VSCARD_E2E=1.
var (
	e2eOn    = os.Getenv("VSCARD_E2E") == "1"
	image    Image
	accel    Accel
	setupErr error // reported by every guest test
	binDir   string
	repoRoot string

	vscardBin    string // ./cmd/vscard, built once
	vscclientBin string // ./cmd/vscclient
)

func TestMain(m *testing.M) {
	// TestGuestPassthru and TestGuestReaderUSBRedirListen put cards into
	// vpcd's slots: in a pcscd of this package's own, test/e2e's cards
	// (in the pcscd scripts/test shares) cannot meet them.
	if code, ran := pcscdtest.Private(); ran {
		os.Exit(code)
	}
	if e2eOn {
		setupErr = setup()
	}
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// setup builds (or reuses) the guest image and resolves the accelerator.
// Under VSCARD_E2E=1 a missing QEMU or apt is a broken setup: the guest
// tests fail, they do not skip.
func setup() error {
	for _, tool := range []string{"qemu-system-x86_64", "apt-get", "cpio", "depmod"} {
		if _, err := lookPath(tool); err != nil {
			return fmt.Errorf("%s not found (run scripts/setup): %w", tool, err)
		}
	}
	root, err := pcscdtest.ModuleRoot()
	if err != nil {
		return err
	}
	repoRoot = root
	if binDir, err = os.MkdirTemp("", "vscard-guest-bin"); err != nil {
		return err
	}
	vscardBin = filepath.Join(binDir, "vscard")
	vscclientBin = filepath.Join(binDir, "vscclient")
	build := exec.Command("go", "build", "-o", binDir+"/", "./cmd/vscard", "./cmd/vscclient")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/vscard ./cmd/vscclient: %w\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	var log strings.Builder
	image, err = BuildImage(ctx, filepath.Join(root, "scripts", "guest-image"), &log)
	if err != nil {
		return fmt.Errorf("%w\n%s", err, log.String())
	}
	fmt.Fprintf(os.Stderr, "guest: image %s ready in %v\n", image.Key, time.Since(start).Round(time.Millisecond))
	want, err := AccelFromEnv()
	if err != nil {
		return err
	}
	start = time.Now()
	lg := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	accel, err = ProbeAccel(ctx, image, want, lg)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "guest: accelerator %s (resolved in %v)\n", accel, time.Since(start).Round(time.Millisecond))
	return nil
}

// lookPath also searches the sbin directories, which a non-root PATH lacks.
func lookPath(tool string) (string, error) {
	if p, err := exec.LookPath(tool); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin"} {
		p := filepath.Join(d, tool)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", exec.ErrNotFound
}

// requireGuest skips outside VSCARD_E2E=1 and fails on a broken setup.
func requireGuest(t *testing.T) {
	t.Helper()
	if !e2eOn {
		t.Skip("guest end-to-end test: needs QEMU and the guest image; run scripts/test " +
			"or VSCARD_E2E=1 go test ./test/guest/")
	}
	if setupErr != nil {
		t.Fatalf("guest setup: %v", setupErr)
	}
}

// freePort returns a 127.0.0.1 TCP port nobody listens on right now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// bootConfig is a Config for this run, its console logged to a file that a
// failing test prints the tail of.
func bootConfig(t *testing.T, chardev, script string) Config {
	t.Helper()
	return Config{
		Image:      image,
		Chardev:    chardev,
		Script:     script,
		Accel:      accel,
		Timeout:    4 * time.Minute,
		ConsoleLog: filepath.Join(t.TempDir(), "console.log"),
		PcscdDebug: true,
		Logger:     slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})),
	}
}

// testWriter sends log lines to t.Log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// logMarks prints the guest milestones with host and guest times.
func logMarks(t *testing.T, r Result) {
	t.Helper()
	var b strings.Builder
	for _, m := range r.Marks {
		fmt.Fprintf(&b, "  host %6.2fs  guest %6.2fs  %s\n", m.Host.Seconds(), m.Uptime.Seconds(), m.Label)
	}
	t.Logf("guest milestones (%s, %v total):\n%s", r.Accel, r.Duration.Round(time.Millisecond), b.String())
}

// report prints a measurement the issues ask to see (GUEST-SIGN-20 and the
// like) on stderr, which go test shows only with -v or on failure, and
// appends it to the file $VSCARD_REPORT names, which scripts/test prints
// at its end, so that CI logs carry the numbers of passing tests too.
func report(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	fmt.Fprintln(os.Stderr, line)
	if p := os.Getenv("VSCARD_REPORT"); p != "" {
		if f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); err == nil {
			fmt.Fprintln(f, line)
			f.Close()
		}
	}
}
