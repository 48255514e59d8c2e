// Command goclient is the test suite's independent Go dialer peer for a Konnectivity
// proxy-server: it opens tunnels with the published konnectivity-client library (gRPC
// mode) or with a plain HTTP/1.1 CONNECT request (http-connect mode), over a Unix socket
// or over TCP with mutual TLS, dials -target through each, exchanges bytes and prints one
// JSON document describing what happened on stdout.
//
// Invariants: it never writes anything but the JSON result to stdout (klog goes to
// stderr); every run ends within -timeout (a watchdog prints a timeout result and exits);
// exit status 0 means every connection succeeded, 1 that one failed, 2 a usage error,
// 3 the watchdog.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"sigs.k8s.io/apiserver-network-proxy/konnectivity-client/pkg/client"
)

// options are the command-line settings.
type options struct {
	mode        string
	uds         string
	proxyHost   string
	proxyPort   int
	caCert      string
	clientCert  string
	clientKey   string
	serverName  string
	target      string
	connections int
	rounds      int
	size        int
	io          string
	hold        time.Duration
	timeout     time.Duration
	dialTimeout time.Duration
	tunnel      string
}

// connResult is what happened on one tunnel/connection.
type connResult struct {
	Index         int    `json:"index"`
	Dialed        bool   `json:"dialed"`
	OK            bool   `json:"ok"`
	Error         string `json:"error,omitempty"`
	GRPCCode      string `json:"grpc_code,omitempty"`
	DialFailure   string `json:"dial_failure_reason,omitempty"`
	HTTPStatus    int    `json:"http_status,omitempty"`
	HTTPBody      string `json:"http_body,omitempty"`
	Sent          int    `json:"sent"`
	Received      int    `json:"received"`
	Match         bool   `json:"match"`
	ReceivedSHA   string `json:"received_sha256,omitempty"`
	CloseError    string `json:"close_error,omitempty"`
	Cancelled     bool   `json:"cancelled,omitempty"`
	DialMillis    int64  `json:"dial_ms"`
	ExchangeMilli int64  `json:"exchange_ms"`
}

// result is the JSON document printed on stdout.
type result struct {
	Mode        string       `json:"mode"`
	Transport   string       `json:"transport"`
	Target      string       `json:"target"`
	OK          bool         `json:"ok"`
	Error       string       `json:"error,omitempty"`
	Tunnel      string       `json:"tunnel"`
	Connections []connResult `json:"connections"`
}

func main() {
	o, err := parseFlags()
	if err != nil {
		fmt.Fprintln(os.Stderr, "goclient:", err)
		os.Exit(2)
	}
	var printMu sync.Mutex
	printed := false
	emit := func(r result, code int) {
		printMu.Lock()
		defer printMu.Unlock()
		if printed {
			return
		}
		printed = true
		out, _ := json.Marshal(r)
		fmt.Println(string(out))
		os.Exit(code)
	}
	base := result{Mode: o.mode, Transport: transportName(o), Target: o.target, Tunnel: o.tunnel}
	// The watchdog: konnectivity-client connections have no deadlines, so a stuck read
	// is only ended by leaving the process.
	time.AfterFunc(o.timeout, func() {
		r := base
		r.Error = fmt.Sprintf("timeout after %s", o.timeout)
		emit(r, 3)
	})
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()

	tlsConfig, err := loadTLS(o)
	if err != nil {
		r := base
		r.Error = err.Error()
		emit(r, 1)
	}
	var shared dialer
	if o.mode == "grpc" && o.tunnel == "reusable" {
		// One gRPC connection for every dial: each dial is a stream of its own.
		shared, err = newReusableTunnel(ctx, o, grpcOptions(o, tlsConfig))
		if err != nil {
			r := base
			r.Error = err.Error()
			emit(r, 1)
		}
		defer shared.Close()
	}
	results := make([]connResult, o.connections)
	var wg sync.WaitGroup
	for i := range o.connections {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			results[i] = runOne(ctx, o, tlsConfig, shared, i)
		}(i)
	}
	wg.Wait()
	r := base
	r.OK = true
	r.Connections = results
	for _, c := range results {
		r.OK = r.OK && c.OK
	}
	if r.OK {
		emit(r, 0)
	}
	emit(r, 1)
}

func parseFlags() (options, error) {
	var o options
	fs := flag.NewFlagSet("goclient", flag.ContinueOnError)
	fs.StringVar(&o.mode, "mode", "grpc", "grpc or http-connect")
	fs.StringVar(&o.uds, "uds", "", "proxy-server's Unix socket (instead of -proxy-host/-proxy-port)")
	fs.StringVar(&o.proxyHost, "proxy-host", "127.0.0.1", "proxy-server's TCP host (mTLS)")
	fs.IntVar(&o.proxyPort, "proxy-port", 0, "proxy-server's TCP port (mTLS)")
	fs.StringVar(&o.caCert, "ca-cert", "", "CA bundle that signed the proxy-server's certificate")
	fs.StringVar(&o.clientCert, "client-cert", "", "client certificate for mTLS")
	fs.StringVar(&o.clientKey, "client-key", "", "client key for mTLS")
	fs.StringVar(&o.serverName, "server-name", "", "TLS server name (default: -proxy-host)")
	fs.StringVar(&o.target, "target", "", "host:port to dial through the proxy")
	fs.IntVar(&o.connections, "connections", 1, "number of tunnels, run concurrently")
	fs.IntVar(&o.rounds, "rounds", 1, "write/read exchanges per connection (io=echo)")
	fs.IntVar(&o.size, "size", 1024, "bytes written per exchange")
	fs.StringVar(&o.io, "io", "echo",
		"echo: write -size bytes and read them back, -rounds times; "+
			"read: read until EOF; write: write -rounds*-size bytes; none: dial and close")
	fs.DurationVar(&o.hold, "hold", 0, "keep each connection open this long before closing")
	fs.DurationVar(&o.timeout, "timeout", 30*time.Second, "bound on the whole run")
	fs.DurationVar(&o.dialTimeout, "dial-timeout", 0,
		"give up (cancel) a dial not answered within this long; 0: only -timeout bounds it")
	fs.StringVar(&o.tunnel, "tunnel", "single",
		"grpc mode: single (a gRPC connection per dial) or reusable (one for all dials; "+
			"only in the binary built with -tags reusable)")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return o, err
	}
	switch {
	case o.mode != "grpc" && o.mode != "http-connect":
		return o, fmt.Errorf("-mode must be grpc or http-connect, not %q", o.mode)
	case o.target == "":
		return o, errors.New("-target is required")
	case o.uds == "" && o.proxyPort == 0:
		return o, errors.New("one of -uds or -proxy-port is required")
	case o.uds == "" && (o.caCert == "" || o.clientCert == "" || o.clientKey == ""):
		return o, errors.New("TCP needs -ca-cert, -client-cert and -client-key")
	case o.connections < 1 || o.rounds < 0 || o.size < 0:
		return o, errors.New("-connections must be >= 1, -rounds and -size >= 0")
	case o.io != "echo" && o.io != "duplex" && o.io != "read" && o.io != "write" && o.io != "none":
		return o, fmt.Errorf("-io must be echo, duplex, read, write or none, not %q", o.io)
	case o.tunnel != "single" && o.tunnel != "reusable":
		return o, fmt.Errorf("-tunnel must be single or reusable, not %q", o.tunnel)
	}
	if o.serverName == "" {
		o.serverName = o.proxyHost
	}
	return o, nil
}

func transportName(o options) string {
	if o.uds != "" {
		return "uds"
	}
	return "mtls"
}

func loadTLS(o options) (*tls.Config, error) {
	if o.uds != "" {
		return nil, nil
	}
	pair, err := tls.LoadX509KeyPair(o.clientCert, o.clientKey)
	if err != nil {
		return nil, fmt.Errorf("client key pair: %w", err)
	}
	pem, err := os.ReadFile(o.caCert)
	if err != nil {
		return nil, fmt.Errorf("CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, errors.New("CA: no certificate found")
	}
	return &tls.Config{
		Certificates: []tls.Certificate{pair},
		RootCAs:      pool,
		ServerName:   o.serverName,
		MinVersion:   tls.VersionTLS12,
	}, nil
}

func runOne(ctx context.Context, o options, tlsConfig *tls.Config, shared dialer,
	index int) connResult {
	r := connResult{Index: index}
	start := time.Now()
	var conn net.Conn
	var reader io.Reader
	var err error
	dialCtx := ctx
	if o.dialTimeout > 0 {
		var cancel context.CancelFunc
		dialCtx, cancel = context.WithTimeout(ctx, o.dialTimeout)
		defer cancel()
	}
	switch {
	case shared != nil:
		conn, err = shared.DialContext(dialCtx, "tcp", o.target)
		reader = conn
	case o.mode == "grpc":
		conn, err = dialGRPC(ctx, dialCtx, o, tlsConfig)
		reader = conn
	default:
		conn, reader, err = dialConnect(ctx, dialCtx, o, tlsConfig, &r)
	}
	r.DialMillis = time.Since(start).Milliseconds()
	if err != nil {
		r.Error = err.Error()
		// The dial deadline ends an HTTP-CONNECT dial as a socket timeout.
		r.Cancelled = dialCtx.Err() != nil || errors.Is(err, os.ErrDeadlineExceeded)
		if s, ok := status.FromError(err); ok && s.Code() != 0 {
			r.GRPCCode = s.Code().String()
		}
		if isDial, reason := client.GetDialFailureReason(err); isDial {
			r.DialFailure = string(reason)
		}
		return r
	}
	r.Dialed = true
	start = time.Now()
	err = exchange(o, conn, reader, index, &r)
	r.ExchangeMilli = time.Since(start).Milliseconds()
	if o.hold > 0 {
		time.Sleep(o.hold)
	}
	if cerr := conn.Close(); cerr != nil {
		r.CloseError = cerr.Error()
	}
	if err != nil {
		r.Error = err.Error()
		return r
	}
	r.OK = true
	return r
}

// dialer is what a reusable tunnel offers (konnectivity-client's ReusableTunnel).
type dialer interface {
	DialContext(ctx context.Context, protocol, address string) (net.Conn, error)
	Close() error
}

// grpcAddress is the target given to gRPC: the Unix socket is reached by a context dialer.
func grpcAddress(o options) string {
	if o.uds != "" {
		return "unix-socket"
	}
	return fmt.Sprintf("%s:%d", o.proxyHost, o.proxyPort)
}

func grpcOptions(o options, tlsConfig *tls.Config) []grpc.DialOption {
	if o.uds != "" {
		return []grpc.DialOption{
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", o.uds)
			}),
		}
	}
	return []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tlsConfig))}
}

func dialGRPC(ctx, dialCtx context.Context, o options, tlsConfig *tls.Config) (net.Conn, error) {
	opts := append([]grpc.DialOption{grpc.WithBlock()}, grpcOptions(o, tlsConfig)...)
	tunnel, err := client.CreateSingleUseGrpcTunnelWithContext(ctx, ctx, grpcAddress(o), opts...)
	if err != nil {
		return nil, err
	}
	conn, err := tunnel.DialContext(dialCtx, "tcp", o.target)
	if err != nil {
		// A given-up dial sends its DIAL_CLS from a goroutine, then closes the tunnel:
		// wait for that (bounded) so that exiting does not cut it off.
		select {
		case <-tunnel.Done():
		case <-time.After(tunnelCloseWait):
		}
	}
	return conn, err
}

// tunnelCloseWait bounds the wait for a failed dial's tunnel to close.
const tunnelCloseWait = 5 * time.Second

func dialConnect(ctx, dialCtx context.Context, o options, tlsConfig *tls.Config,
	r *connResult) (net.Conn, io.Reader, error) {
	var d net.Dialer
	var conn net.Conn
	var err error
	if o.uds != "" {
		conn, err = d.DialContext(ctx, "unix", o.uds)
	} else {
		td := tls.Dialer{NetDialer: &d, Config: tlsConfig}
		conn, err = td.DialContext(ctx, "tcp", fmt.Sprintf("%s:%d", o.proxyHost, o.proxyPort))
	}
	if err != nil {
		return nil, nil, err
	}
	// The dial deadline bounds the CONNECT answer; closing the connection is how an
	// HTTP client gives up on a dial. The whole-run deadline bounds the tunnel after.
	if deadline, ok := dialCtx.Deadline(); ok {
		_ = conn.SetDeadline(deadline)
	}
	req := fmt.Sprintf("CONNECT %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: goclient\r\n\r\n",
		o.target, o.target)
	if _, err := io.WriteString(conn, req); err != nil {
		conn.Close()
		return nil, nil, err
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("reading CONNECT response: %w", err)
	}
	r.HTTPStatus = resp.StatusCode
	if deadline, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(deadline)
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		r.HTTPBody = string(body)
		conn.Close()
		return nil, nil, fmt.Errorf("CONNECT answered %s", resp.Status)
	}
	return conn, br, nil
}

// pattern is the deterministic payload of one exchange: it differs per connection and
// round so that crossed streams are noticed.
func pattern(index, round, size int) []byte {
	seed := fmt.Sprintf("c%d-r%d:", index, round)
	out := make([]byte, size)
	for i := range out {
		out[i] = seed[i%len(seed)] ^ byte(i/len(seed))
	}
	return out
}

func exchange(o options, conn net.Conn, reader io.Reader, index int, r *connResult) error {
	switch o.io {
	case "none":
		r.Match = true
		return nil
	case "read":
		h := sha256.New()
		n, err := io.Copy(h, reader)
		r.Received = int(n)
		r.ReceivedSHA = hex.EncodeToString(h.Sum(nil))
		r.Match = true
		return err
	case "write":
		for round := range o.rounds {
			n, err := conn.Write(pattern(index, round, o.size))
			r.Sent += n
			if err != nil {
				return err
			}
		}
		r.Match = true
		return nil
	}
	if o.io == "duplex" {
		return duplex(o, conn, reader, index, r)
	}
	r.Match = true
	buf := make([]byte, o.size)
	for round := range o.rounds {
		want := pattern(index, round, o.size)
		n, err := conn.Write(want)
		r.Sent += n
		if err != nil {
			return fmt.Errorf("write in round %d: %w", round, err)
		}
		n, err = io.ReadFull(reader, buf)
		r.Received += n
		if err != nil {
			r.Match = false
			return fmt.Errorf("read in round %d: %w", round, err)
		}
		if !bytes.Equal(buf, want) {
			r.Match = false
			return fmt.Errorf("round %d: echoed bytes differ", round)
		}
	}
	return nil
}

// duplex writes -rounds blocks of -size bytes while reading the echo concurrently, so
// that both directions carry the whole volume at once (an echo of more than the tunnel's
// buffering would deadlock a write-then-read exchange).
func duplex(o options, conn net.Conn, reader io.Reader, index int, r *connResult) error {
	writeErr := make(chan error, 1)
	go func() {
		for round := range o.rounds {
			n, err := conn.Write(pattern(index, round, o.size))
			r.Sent += n
			if err != nil {
				writeErr <- fmt.Errorf("write in round %d: %w", round, err)
				return
			}
		}
		writeErr <- nil
	}()
	r.Match = true
	buf := make([]byte, o.size)
	var readErr error
	for round := range o.rounds {
		n, err := io.ReadFull(reader, buf)
		r.Received += n
		if err != nil {
			r.Match = false
			readErr = fmt.Errorf("read in round %d: %w", round, err)
			break
		}
		if !bytes.Equal(buf, pattern(index, round, o.size)) {
			r.Match = false
			readErr = fmt.Errorf("round %d: echoed bytes differ", round)
			break
		}
	}
	if readErr != nil {
		return readErr
	}
	return <-writeErr
}
