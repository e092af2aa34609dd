# Guest side of TestGuestReaderUSBIP: no USB controller at all; the guest
# reaches `vscard reader --usbip` on the host through QEMU user networking
# (restrict=on, one guestfwd 10.0.2.100:3240 -> the host's 127.0.0.1, a
# new relay per connection) and attaches the reader with the kernel's
# vhci-hcd. /init started no pcscd.
. /vscard/reader-lib.sh
echo "@@BEGIN net"
modprobe e1000 && ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0
s=$?
ip addr show eth0 2>&1
echo "@@END net $s"
[ $s = 0 ] || failed="$failed net"
step vhci modprobe vhci-hcd
mark vhci-loaded
usb_reader() { grep -qs '^08e6$' /sys/bus/usb/devices/*/idVendor; }
no_reader() { ! usb_reader; }
# attach: import the reader (retrying while a restarted one comes up),
# and wait for its USB device.
attach() { usbip attach -r 10.0.2.100 -b "$(cat /vscard/busid)" 2>&1 && poll 30 usb_reader; }
attach_step() { # NAME
  echo "@@BEGIN $1"
  poll 30 attach
  s=$?
  usbip port 2>&1 | grep -v usb.ids
  grep -H . /sys/bus/usb/devices/[0-9]*/idVendor /sys/bus/usb/devices/[0-9]*/idProduct 2>/dev/null
  echo "@@END $1 $s"
  [ $s = 0 ] || failed="$failed $1"
}
attach_step attach
mark attached
pcscd --foreground --debug --apdu >/tmp/pcscd.log 2>&1 &
echo "@@BEGIN readers"
poll 30 readers_ge 1
s=$?
opensc-tool --list-readers 2>&1
echo "@@END readers $s"
[ $s = 0 ] || failed="$failed readers"
state card-0 0 present
step test p11 --slot "$(slot_of 0)" --login --pin "$PIN" --test
head -c 100 /dev/urandom >/tmp/data
emit data /tmp/data
signed sig-0 0

# Detach, then attach again: a second connection through the guestfwd.
echo "@@BEGIN detach"
port=$(usbip port 2>/dev/null | sed -n 's/^Port \([0-9]*\):.*/\1/p' | head -n 1)
usbip detach -p "${port:-0}" 2>&1 && poll 30 no_reader
s=$?
usbip port 2>&1 | grep -v usb.ids
echo "@@END detach $s"
[ $s = 0 ] || failed="$failed detach"
attach_step reattach
pcscd_restart
state reattached 0 present
signed sig-reattached 0

# SIGKILL and restart of the reader: the link dies, vhci drops the device,
# and the guest attaches the new reader.
host_wait kill
echo "@@BEGIN gone"
poll 30 no_reader
s=$?
usbip port 2>&1 | grep -v usb.ids
echo "@@END gone $s"
[ $s = 0 ] || failed="$failed gone"
attach_step reattach-restarted
pcscd_restart
state restarted 0 present
signed sig-restarted 0
finish_steps
