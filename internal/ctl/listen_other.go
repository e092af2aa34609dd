//go:build !unix

package ctl

import "net"

func listenPrivate(path string) (net.Listener, error) { return net.Listen("unix", path) }
