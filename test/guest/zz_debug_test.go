package guest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

func TestZZDebug(t *testing.T) {
	requireGuest(t)
	sc := os.Getenv("DEBUG_SCRIPT")
	if sc == "" {
		t.Skip()
	}
	script, _ := os.ReadFile(sc)
	dir := t.TempDir()
	card := filepath.Join(dir, "card")
	exec.Command(vscardBin, "card", "new", "--pin", testPIN, card).Run()
	target := fmt.Sprintf("tcp:127.0.0.1:%d", freePort(t))
	os.Mkdir(dir+"/c", 0o700)
	startProc(t, dir+"/host.log", false, vscardBin, "connect", "--card", card, "--control", dir+"/c/s", "--no-stdin", "--log-level", "debug", target)
	defer func() { b, _ := os.ReadFile(dir + "/host.log"); t.Logf("HOST:\n%s", b) }()
	cfg := bootConfig(t, target, string(script))
	cfg.Files = map[string][]byte{"/vscard/pin": []byte(testPIN)}
	r, err := Boot(context.Background(), cfg)
	t.Logf("err=%v status=%d\n%s", err, r.Status, r.Tail(200))
}
