// Package guest boots a small Linux guest in QEMU with a virtual USB CCID
// reader (qemu-xhci + usb-ccid + ccid-card-passthru) and runs a shell script
// inside it, so the guest's own pcscd, libccid, OpenSC, CoolKey and NSS can
// use a card that vscard serves over the passthru socket (issue 3 §4).
//
// The model follows ../shared/reference/guest-vm.md:
//
//   - The image (a PVH-bootable vmlinux and an uncompressed initramfs) is
//     built from Debian packages by scripts/guest-image and cached, keyed by
//     package versions; [BuildImage] runs that script.
//   - [Start] boots the image with the test's script appended as a second
//     cpio archive (the kernel unpacks both). The guest's /init loads the
//     xHCI driver, waits for QEMU's usb-ccid device (08e6:4433), starts pcscd
//     and runs the script.
//   - The serial console, on QEMU's stdio, is the only channel. Lines that
//     start with "@@" are the protocol between guest and host: "@@T UPTIME
//     LABEL" milestones, "@@BEGIN NAME" ... "@@END NAME STATUS" step output,
//     "@@WAIT NAME" when the guest needs the host to act (the host answers
//     "@@GO NAME" on the console, see [VM.Go]), and "@@T UPTIME EXIT N" with
//     the script's exit status just before the guest powers off.
//   - KVM is used when it really works; a probe boot decides and the answer
//     is cached per host boot (guest-vm.md §7.1: KVM on nested PVM hangs).
//
// Everything here is test infrastructure: the end-to-end tests in this
// directory run only with VSCARD_E2E=1.
package guest
