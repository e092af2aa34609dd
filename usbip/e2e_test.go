package usbip

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vscard/vscard/usb"
)

// vendorDev is a minimal but complete full-speed device for the kernel to
// enumerate: one vendor-specific interface with a bulk loopback pair
// (OUT 0x02 -> IN 0x81), answering the standard requests itself as
// usb.Device requires.
type vendorDev struct {
	mu     sync.Mutex
	config uint8
	loop   chan []byte
	resets int
	reqs   []string
}

const (
	vendorVID = 0x1209 // pid.codes' test range
	vendorPID = 0x5CA7
)

func newVendorDev() *vendorDev { return &vendorDev{loop: make(chan []byte, 16)} }

func (d *vendorDev) Info() usb.Info {
	return usb.Info{
		Speed: usb.SpeedFull, VendorID: vendorVID, ProductID: vendorPID, BCDDevice: 0x0100,
		ConfigurationValue: 1, NumConfigurations: 1,
		Interfaces: []usb.Interface{{Number: 0, Class: 0xFF}},
		Endpoints: []usb.Endpoint{
			{Address: 0x81, Type: usb.Bulk, MaxPacketSize: 64},
			{Address: 0x02, Type: usb.Bulk, MaxPacketSize: 64},
		},
	}
}

func (d *vendorDev) descriptor(s usb.Setup) ([]byte, bool) {
	switch s.Value >> 8 {
	case 1: // device
		b := []byte{18, 1, 0x00, 0x02, 0, 0, 0, 64, 0, 0, 0, 0, 0x00, 0x01, 1, 2, 0, 1}
		binary.LittleEndian.PutUint16(b[8:], vendorVID)
		binary.LittleEndian.PutUint16(b[10:], vendorPID)
		return b, true
	case 2: // configuration, interface, endpoints
		return []byte{
			9, 2, 32, 0, 1, 1, 0, 0x80, 50,
			9, 4, 0, 0, 2, 0xFF, 0, 0, 0,
			7, 5, 0x81, 2, 64, 0, 0,
			7, 5, 0x02, 2, 64, 0, 0,
		}, true
	case 3: // strings
		var str string
		switch s.Value & 0xFF {
		case 0:
			return []byte{4, 3, 0x09, 0x04}, true
		case 1:
			str = "vscard"
		case 2:
			str = "usbip e2e loopback"
		default:
			return nil, false
		}
		b := []byte{byte(2 + 2*len(str)), 3}
		for _, c := range str {
			b = append(b, byte(c), 0)
		}
		return b, true
	}
	return nil, false
}

func (d *vendorDev) Control(ctx context.Context, s usb.Setup, data []byte) ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.reqs = append(d.reqs, fmt.Sprintf("%02x/%02x/%04x", s.RequestType, s.Request, s.Value))
	var out []byte
	switch {
	case s.RequestType == 0x80 && s.Request == usb.ReqGetDescriptor:
		b, ok := d.descriptor(s)
		if !ok {
			return nil, usb.ErrStall
		}
		out = b
	case s.RequestType == 0x00 && s.Request == usb.ReqSetConfiguration && s.Value <= 1:
		d.config = uint8(s.Value)
	case s.RequestType == 0x80 && s.Request == usb.ReqGetConfiguration:
		out = []byte{d.config}
	case s.RequestType&0x7F <= 2 && s.Request == usb.ReqGetStatus:
		out = []byte{0, 0}
	case s.RequestType == 0x01 && s.Request == usb.ReqSetInterface && s.Value == 0:
	case s.RequestType == 0x02 && s.Request == usb.ReqClearFeature:
	default:
		return nil, usb.ErrStall
	}
	return out[:min(len(out), int(s.Length))], nil
}

func (d *vendorDev) Out(ctx context.Context, ep uint8, data []byte) error {
	select {
	case d.loop <- append([]byte(nil), data...):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (d *vendorDev) In(ctx context.Context, ep uint8, max int) ([]byte, error) {
	select {
	case b := <-d.loop:
		return b[:min(len(b), max)], nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (d *vendorDev) Reset() {
	d.mu.Lock()
	d.resets++
	d.config = 0
	d.mu.Unlock()
}

// TestE2EVHCI attaches a vendorDev to this machine's own kernel through
// vhci-hcd with the stock usbip tool, checks that the kernel enumerates
// and configures it, and detaches it.
func TestE2EVHCI(t *testing.T) {
	if os.Getenv("VSCARD_E2E") != "1" {
		t.Skip("real-kernel test; set VSCARD_E2E=1 (needs root, the vhci-hcd module and the usbip tool)")
	}
	if os.Geteuid() != 0 {
		t.Skip("usbip attach needs root")
	}
	if out, err := exec.Command("modprobe", "vhci-hcd").CombinedOutput(); err != nil {
		if _, serr := os.Stat("/sys/bus/platform/drivers/vhci_hcd"); serr != nil {
			rel, _ := exec.Command("uname", "-r").Output()
			t.Skipf("vhci-hcd cannot be loaded on this kernel (%s): modprobe: %v %s (is /lib/modules/%s/kernel/drivers/usb/usbip there?)",
				strings.TrimSpace(string(rel)), err, strings.TrimSpace(string(out)), strings.TrimSpace(string(rel)))
		}
	}
	tool, err := exec.LookPath("usbip")
	if err != nil {
		tool = "/usr/sbin/usbip"
		if _, err := os.Stat(tool); err != nil {
			t.Skip("usbip tool not found (Debian package usbip)")
		}
	}

	s := NewServer(nil)
	dev := newVendorDev()
	const busid = "1-1"
	if err := s.Add(busid, dev); err != nil {
		t.Fatal(err)
	}
	addr := startServer(t, s)
	_, port, _ := net.SplitHostPort(addr)
	run := func(args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, tool, append([]string{"--tcp-port", port}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("usbip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}

	list := run("list", "-r", "127.0.0.1")
	t.Logf("usbip list:\n%s", list)
	if !strings.Contains(list, busid+":") || !strings.Contains(strings.ToLower(list), "1209:5ca7") {
		t.Errorf("usbip list does not show %s 1209:5ca7", busid)
	}

	run("attach", "-r", "127.0.0.1", "-b", busid)
	detached := false
	detach := func() {
		// `usbip port` prints one block per port:
		//   Port 00: <Port in Use> at Full Speed(12Mbps)
		//          ... (1209:5ca7)
		//          1-1 -> usbip://127.0.0.1:PORT/1-1
		// Detach only the port that leads to this test's server.
		out, _ := exec.Command(tool, "port").CombinedOutput()
		for _, block := range regexp.MustCompile(`(?m)^Port `).Split(string(out), -1) {
			m := regexp.MustCompile(`^(\d+): <Port in Use>`).FindStringSubmatch(block)
			if m != nil && strings.Contains(block, "usbip://127.0.0.1:"+port+"/") {
				if out, err := exec.Command(tool, "detach", "-p", m[1]).CombinedOutput(); err != nil {
					t.Errorf("usbip detach -p %s: %v\n%s", m[1], err, out)
				}
			}
		}
		detached = true
	}
	t.Cleanup(func() {
		if !detached {
			detach()
		}
	})

	var sysdev string
	deadline := time.Now().Add(20 * time.Second)
	for sysdev == "" && time.Now().Before(deadline) {
		paths, _ := filepath.Glob("/sys/bus/usb/devices/*/idVendor")
		for _, p := range paths {
			v, _ := os.ReadFile(p)
			pr, _ := os.ReadFile(filepath.Join(filepath.Dir(p), "idProduct"))
			if strings.TrimSpace(string(v)) == "1209" && strings.TrimSpace(string(pr)) == "5ca7" {
				sysdev = filepath.Dir(p)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if sysdev == "" {
		t.Fatal("the kernel did not enumerate the attached device in 20 s")
	}
	cfg, _ := os.ReadFile(filepath.Join(sysdev, "bConfigurationValue"))
	prod, _ := os.ReadFile(filepath.Join(sysdev, "product"))
	t.Logf("enumerated as %s: configuration %q, product %q", sysdev, strings.TrimSpace(string(cfg)), strings.TrimSpace(string(prod)))
	if strings.TrimSpace(string(cfg)) != "1" || strings.TrimSpace(string(prod)) != "usbip e2e loopback" {
		t.Errorf("device %s: configuration %q product %q", sysdev, cfg, prod)
	}

	detach()
	waitFor(t, func() bool { dev.mu.Lock(); defer dev.mu.Unlock(); return dev.resets >= 1 })
}
