package main

import (
	"context"
	"fmt"
)

// runCard is replaced by the card store work (token/store).
func runCard(_ context.Context, _ *environ, _ []string) error {
	return fmt.Errorf("card: not implemented yet")
}
