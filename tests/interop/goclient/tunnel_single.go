//go:build !reusable

package main

import (
	"context"
	"errors"

	"google.golang.org/grpc"
)

// newReusableTunnel is only in the binary built against a konnectivity-client that has
// the reusable tunnel (-tags reusable, go.reusable.mod).
func newReusableTunnel(context.Context, options, []grpc.DialOption) (dialer, error) {
	return nil, errors.New("-tunnel=reusable needs the goclient built with -tags reusable")
}
