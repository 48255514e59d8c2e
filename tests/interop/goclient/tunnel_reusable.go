//go:build reusable

package main

import (
	"context"

	"google.golang.org/grpc"

	"sigs.k8s.io/apiserver-network-proxy/konnectivity-client/pkg/client"
)

// newReusableTunnel opens konnectivity-client's reusable tunnel (v0.37.0 and later): one
// gRPC connection to the proxy-server, a Proxy stream per DialContext.
func newReusableTunnel(ctx context.Context, o options, opts []grpc.DialOption) (dialer, error) {
	return client.CreateGRPCTunnel(ctx, grpcAddress(o), opts...)
}
