package guest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Accel is QEMU's accelerator.
type Accel string

const (
	AccelAuto Accel = "auto" // probe: KVM if it really boots a guest, else TCG
	AccelKVM  Accel = "kvm"
	AccelTCG  Accel = "tcg"
)

// AccelEnv names the environment variable that overrides the probe.
const AccelEnv = "VSCARD_GUEST_ACCEL"

// AccelFromEnv reads VSCARD_GUEST_ACCEL: kvm, tcg or auto (the default).
func AccelFromEnv() (Accel, error) {
	switch v := Accel(strings.ToLower(strings.TrimSpace(os.Getenv(AccelEnv)))); v {
	case "", AccelAuto:
		return AccelAuto, nil
	case AccelKVM, AccelTCG:
		return v, nil
	default:
		return "", fmt.Errorf("guest: %s=%q: want kvm, tcg or auto", AccelEnv, v)
	}
}

// probeTime is how long a KVM guest may take to reach /init. A working KVM
// gets there in about a second; on nested PVM hosts the kernel hangs
// silently forever (guest-vm.md §7.1, §4.2 suggests 10 s).
const probeTime = 10 * time.Second

// ProbeAccel resolves want: kvm and tcg are returned as they are; auto boots
// the image once with KVM and keeps KVM only if /init starts within
// probeTime. The answer is cached per host boot (keyed by the kernel's
// boot_id) next to the image, so one probe serves every test run until the
// host reboots.
func ProbeAccel(ctx context.Context, img Image, want Accel, lg *slog.Logger) (Accel, error) {
	if want != AccelAuto {
		return want, nil
	}
	if lg == nil {
		lg = slog.New(slog.DiscardHandler)
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		lg.Info("guest: no usable /dev/kvm; using TCG", "err", err)
		return AccelTCG, nil
	}
	f.Close()

	cache := ""
	if id, err := os.ReadFile("/proc/sys/kernel/random/boot_id"); err == nil {
		cache = filepath.Join(filepath.Dir(img.Dir), "accel-"+strings.TrimSpace(string(id)))
		if b, err := os.ReadFile(cache); err == nil {
			switch a := Accel(strings.TrimSpace(string(b))); a {
			case AccelKVM, AccelTCG:
				return a, nil
			}
		}
	}

	got := AccelTCG
	pctx, cancel := context.WithTimeout(ctx, probeTime)
	defer cancel()
	start := time.Now()
	vm, err := Start(pctx, Config{Image: img, Accel: AccelKVM, Timeout: probeTime, BootTimeout: probeTime, probe: true, Logger: lg})
	if err != nil {
		return "", err
	}
	res, err := vm.Wait()
	if _, ok := res.Mark("init-start"); ok && res.Status == 0 {
		got = AccelKVM
	}
	lg.Info("guest: KVM probe", "result", got, "took", time.Since(start).Round(time.Millisecond), "qemu", err)
	if ctx.Err() != nil {
		return "", fmt.Errorf("guest: KVM probe: %w", ctx.Err())
	}
	if cache != "" {
		tmp := cache + ".tmp" + fmt.Sprint(os.Getpid())
		if err := os.WriteFile(tmp, []byte(string(got)+"\n"), 0o644); err == nil {
			if err := os.Rename(tmp, cache); err != nil && !errors.Is(err, os.ErrNotExist) {
				os.Remove(tmp)
			}
		}
	}
	return got, nil
}
