package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"strings"

	"github.com/vscard/vscard/internal/ctl"
)

const ctlUsage = `usage: vscard ctl [--control PATH] COMMAND [ARGS]

Sends one command to a running 'vscard connect' or 'vscard reader' through its control socket
and prints the answer; exits 1 if the command failed. Without --control, the
only live socket in ` + "`%s`" + ` is used.

` + connectCommands + `

flags:
`

// runCtl implements "vscard ctl".
func runCtl(ctx context.Context, env *environ, args []string) error {
	fs := flag.NewFlagSet("ctl", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	control := fs.String("control", "", "control socket `PATH` that 'vscard connect' printed at start")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), ctlUsage, ctl.DefaultDir())
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() == 0 {
		return fmt.Errorf("%w: no command; want one of insert, remove, list, status, debug LEVEL, quit", errUsage)
	}
	path := *control
	if path == "" {
		p, err := ctl.Find(ctl.DefaultDir())
		if err != nil {
			return err
		}
		path = p
	}
	answer, err := ctl.Send(ctx, path, strings.Join(fs.Args(), " "))
	if err != nil {
		if errors.Is(err, ctl.ErrNotRunning) {
			return fmt.Errorf("%v: is vscard connect or vscard reader running? (each prints its control socket at start)", err)
		}
		return err
	}
	fmt.Fprint(env.stdout, answer)
	if ctl.IsError(answer) {
		return errCtlFailed
	}
	return nil
}

// errCtlFailed makes "vscard ctl" exit 1 after printing the error answer,
// which already says what went wrong.
var errCtlFailed = errors.New("the command failed")
