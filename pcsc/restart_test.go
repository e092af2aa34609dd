package pcsc

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/vscard/vscard/internal/pcscdtest"
)

// TestE2EPcscdRestart checks that a Context notices pcscd going away
// (ErrNoService) and that a new Context sees the reader and card again.
// It restarts the pcscd TestMain started for this package alone.
func TestE2EPcscdRestart(t *testing.T) {
	port := needE2E(t)
	restart := os.Getenv("VSCARD_PCSCD_RESTART")
	if restart == "" {
		t.Fatal("VSCARD_PCSCD_RESTART not set: scripts/with-pcscd too old?")
	}
	if !pcscdtest.Inside() {
		t.Skip("not restarting a pcscd shared with other tests (see TestMain)")
	}
	restartBody(t, port, restart)
}

func restartBody(t *testing.T, port, restart string) {
	old := establish(t)
	waitState(t, old, StateEmpty)
	c := testCAC(t)
	insert(t, old, port, c) // vpcd.Serve reconnects by itself after the restart
	k, err := old.Connect(e2eReader, ShareShared, ProtocolAny)
	if err != nil {
		t.Fatal(err)
	}
	// A second context waits for events across the restart.
	waiter := establish(t)
	r := waitState(t, waiter, StatePresent)
	waitErr := make(chan error, 1)
	go func() {
		waitErr <- waiter.GetStatusChange(context.Background(), 60*time.Second,
			[]ReaderState{{Reader: e2eReader, CurrentState: r.State | State(r.EventCounter<<16)}})
	}()

	out, err := exec.Command(restart).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", restart, err, out)
	}
	if _, err := old.ListReaders(); !errors.Is(err, ErrNoService) {
		t.Errorf("old context after the restart: ListReaders = %v, want ErrNoService", err)
	}
	if _, err := k.Transmit(selectPKI); !errors.Is(err, ErrNoService) {
		t.Errorf("old card handle after the restart: Transmit = %v, want ErrNoService", err)
	}
	select {
	case err := <-waitErr:
		if !errors.Is(err, ErrNoService) {
			t.Errorf("GetStatusChange across the restart = %v, want ErrNoService", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("GetStatusChange still waiting 10 s after pcscd went away")
	}

	fresh := establish(t)
	names, err := fresh.ListReaders()
	if err != nil || len(names) == 0 || names[0] != e2eReader {
		t.Fatalf("new context: ListReaders = %q, %v", names, err)
	}
	waitState(t, fresh, StatePresent)
	k2, err := fresh.Connect(e2eReader, ShareShared, ProtocolAny)
	if err != nil {
		t.Fatalf("Connect after the restart: %v", err)
	}
	defer k2.Disconnect(LeaveCard)
	if resp, err := k2.Transmit(selectPKI); err != nil || !ok(resp) {
		t.Fatalf("Transmit after the restart: %X, %v", resp, err)
	}
}
