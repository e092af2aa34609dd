package guest

import (
	"os/exec"
	"syscall"
)

// setParentDeath kills QEMU if the test process dies without cleaning up.
func setParentDeath(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
