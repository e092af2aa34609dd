package guest

import (
	"context"
	"fmt"
	"strings"
	"testing"
)

// TestGuestReaderNoCard boots the guest with usb-ccid and a passthru socket
// nobody connects to: QEMU's reader must show up in the guest's pcscd, with
// its slot empty. This proves the image and the harness without any card.
func TestGuestReaderNoCard(t *testing.T) {
	requireGuest(t)
	script := `. /vscard/lib.sh
poll 30 has_reader || { mark "FAIL no-reader"; exit 3; }
mark readers-listed
echo "@@BEGIN readers"; opensc-tool --list-readers 2>&1; echo "@@END readers $?"
echo "@@BEGIN atr"; opensc-tool --atr 2>&1; echo "@@END atr $?"
`
	cfg := bootConfig(t, fmt.Sprintf("tcp:127.0.0.1:%d", freePort(t)), script)
	r, err := Boot(context.Background(), cfg)
	logMarks(t, r)
	if err != nil || r.Status != 0 {
		t.Fatalf("guest run: err=%v status=%d\nconsole tail:\n%s", err, r.Status, r.Tail(40))
	}
	readers, ok := r.Section("readers")
	if !ok || readers.Status != 0 {
		t.Fatalf("no reader list: %+v\nconsole tail:\n%s", readers, r.Tail(40))
	}
	t.Logf("guest readers:\n%s", readers.Output)
	// libccid names QEMU's 08E6:4433 after its Info.plist entry; the USB
	// strings say "QEMU USB CCID" (guest-vm.md §5.2).
	if !strings.Contains(readers.Output, "433") && !strings.Contains(readers.Output, "QEMU") {
		t.Errorf("the guest's reader list does not show QEMU's usb-ccid reader:\n%s", readers.Output)
	}
	if strings.Contains(readers.Output, "Yes") {
		t.Errorf("the reader reports a card although no card client is connected:\n%s", readers.Output)
	}
	atr, _ := r.Section("atr")
	if atr.Status == 0 {
		t.Errorf("opensc-tool --atr succeeded without a card:\n%s", atr.Output)
	}
}
