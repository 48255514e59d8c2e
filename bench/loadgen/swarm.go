package main

// The swarm (bench/server_scale.py drives it): many lightweight fake agents, so that only
// the proxy-server's cost of holding agents is measured, not an agent program's. Each fake
// agent is what a real one costs the server and nothing more: one TLS connection (client
// certificate, ALPN h2) and one /AgentService/Connect stream with its agentid; it answers
// what the server sends as an agent with a backend inside would: DIAL_REQ with DIAL_RSP (a
// connectID of its own), DATA by the backend's protocol (opSetup: a setupReply-byte reply;
// anything else echoed), CLOSE_REQ with CLOSE_RSP.
//
//	loadgen swarm -target=127.0.0.1:PORT -ca=F -cert=F -key=F -conns=N -batch=B
//
// Protocol with the orchestrator, in lines on stdin / stdout:
//
//	JOIN   connect every agent, at most -batch connecting at once; then
//	       "JOINED <json>": connected, failures, seconds (first start to last header),
//	       p50_ms and max_ms of one agent's connect (dial + TLS + Connect + headers)
//	LEAVE  close every agent's connection; "LEFT <seconds>"
//	QUIT   (or stdin closed) exit
//
// Rounds of JOIN / LEAVE are agents churning; the agent IDs are the same every round
// (swarm-<i>), as agents restarting in place.

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "sigs.k8s.io/apiserver-network-proxy/konnectivity-client/proto/client"
)

// Bound on one agent's connect (dial, TLS, Connect, the server's headers).
const swarmConnectTimeout = 60 * time.Second

var connectDesc = &grpc.StreamDesc{StreamName: "Connect", ServerStreams: true, ClientStreams: true}

type swarmFlags struct {
	target, ca, cert, key string
	agents, batch         int
}

type fakeAgent struct {
	cc     *grpc.ClientConn
	cancel context.CancelFunc
}

func runSwarm(args []string) {
	f := parseSwarmFlags(args)
	cfg, err := swarmTLS(f)
	if err != nil {
		fmt.Fprintln(os.Stderr, "swarm:", err)
		os.Exit(1)
	}
	say("READY")
	in := bufio.NewScanner(os.Stdin)
	var agents []*fakeAgent
	for in.Scan() {
		switch strings.TrimSpace(in.Text()) {
		case "JOIN":
			var r map[string]any
			agents, r = join(f, cfg)
			out, _ := json.Marshal(r)
			fmt.Printf("JOINED %s\n", out)
		case "LEAVE":
			start := time.Now()
			leave(agents)
			agents = nil
			fmt.Printf("LEFT %.3f\n", time.Since(start).Seconds())
		case "QUIT":
			leave(agents)
			return
		}
	}
	leave(agents)
}

func parseSwarmFlags(args []string) swarmFlags {
	var f swarmFlags
	fs := flag.NewFlagSet("swarm", flag.ExitOnError)
	fs.StringVar(&f.target, "target", "", "the server's agent address, host:port")
	fs.StringVar(&f.ca, "ca", "", "CA of the server's certificate")
	fs.StringVar(&f.cert, "cert", "", "the agents' client certificate")
	fs.StringVar(&f.key, "key", "", "its key")
	fs.IntVar(&f.agents, "conns", 1000, "agents")
	fs.IntVar(&f.batch, "batch", 100, "agents connecting at once")
	_ = fs.Parse(args)
	return f
}

func swarmTLS(f swarmFlags) (*tls.Config, error) {
	pem, err := os.ReadFile(f.ca)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, errors.New("no certificate in " + f.ca)
	}
	pair, err := tls.LoadX509KeyPair(f.cert, f.key)
	if err != nil {
		return nil, err
	}
	// No session cache: every connect is a full handshake, as an agent's after a restart.
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}, ServerName: "localhost"}, nil
}

func join(f swarmFlags, cfg *tls.Config) ([]*fakeAgent, map[string]any) {
	agents := make([]*fakeAgent, f.agents)
	lat := make([]time.Duration, f.agents)
	var failures atomic.Int64
	var firstErr atomic.Value
	sem := make(chan struct{}, max(f.batch, 1))
	var wg sync.WaitGroup
	start := time.Now()
	for i := range f.agents {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			t0 := time.Now()
			a, err := connectAgent(f.target, cfg, fmt.Sprintf("swarm-%d", i))
			if err != nil {
				failures.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
				return
			}
			lat[i] = time.Since(t0)
			agents[i] = a
		}(i)
	}
	wg.Wait()
	seconds := time.Since(start).Seconds()
	var ok []time.Duration
	var held []*fakeAgent
	for i, a := range agents {
		if a != nil {
			ok = append(ok, lat[i])
			held = append(held, a)
		}
	}
	p50, _ := percentiles(ok)
	worst := time.Duration(0)
	for _, l := range ok {
		worst = max(worst, l)
	}
	r := map[string]any{
		"connected": len(held), "failures": failures.Load(), "seconds": seconds,
		"p50_ms": p50, "max_ms": worst.Seconds() * 1e3,
	}
	if e := firstErr.Load(); e != nil {
		r["error"] = e
	}
	return held, r
}

// connectAgent: one TLS connection and its Connect stream, returned once the server's
// headers came (the server has registered the agent by then).
func connectAgent(target string, cfg *tls.Config, id string) (*fakeAgent, error) {
	cc, err := grpc.NewClient("passthrough:///"+target,
		grpc.WithTransportCredentials(credentials.NewTLS(cfg.Clone())))
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	md := metadata.Pairs("agentid", id)
	stream, err := cc.NewStream(metadata.NewOutgoingContext(ctx, md), connectDesc, "/AgentService/Connect")
	if err == nil {
		err = waitHeaders(stream)
	}
	if err != nil {
		cancel()
		cc.Close()
		return nil, err
	}
	go serveAgent(stream)
	return &fakeAgent{cc: cc, cancel: cancel}, nil
}

func waitHeaders(stream grpc.ClientStream) error {
	done := make(chan error, 1)
	go func() {
		_, err := stream.Header()
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(swarmConnectTimeout):
		return errors.New("no headers within the connect bound")
	}
}

// serveAgent answers the server until the stream ends. Only this goroutine sends.
func serveAgent(stream grpc.ClientStream) {
	var next int64
	for {
		in := new(pb.Packet)
		if err := stream.RecvMsg(in); err != nil {
			return
		}
		out := answer(in, &next)
		if out != nil && stream.SendMsg(out) != nil {
			return
		}
	}
}

func answer(in *pb.Packet, next *int64) *pb.Packet {
	switch in.GetType() {
	case pb.PacketType_DIAL_REQ:
		*next++
		rsp := &pb.DialResponse{Random: in.GetDialRequest().GetRandom(), ConnectID: *next}
		return &pb.Packet{Type: pb.PacketType_DIAL_RSP, Payload: &pb.Packet_DialResponse{DialResponse: rsp}}
	case pb.PacketType_DATA:
		data := in.GetData()
		payload := data.GetData()
		if len(payload) == 1 && payload[0] == opSetup {
			payload = make([]byte, setupReply)
		}
		d := &pb.Data{ConnectID: data.GetConnectID(), Data: payload}
		return &pb.Packet{Type: pb.PacketType_DATA, Payload: &pb.Packet_Data{Data: d}}
	case pb.PacketType_CLOSE_REQ:
		rsp := &pb.CloseResponse{ConnectID: in.GetCloseRequest().GetConnectID()}
		return &pb.Packet{Type: pb.PacketType_CLOSE_RSP, Payload: &pb.Packet_CloseResponse{CloseResponse: rsp}}
	}
	return nil
}

func leave(agents []*fakeAgent) {
	for _, a := range agents {
		a.cancel()
		a.cc.Close()
	}
}
