package main

import (
	"context"
	"fmt"
)

// runServe is replaced by the vpcd transport work.
func runServe(_ context.Context, _ *environ, _ []string) error {
	return fmt.Errorf("serve: not implemented yet")
}
