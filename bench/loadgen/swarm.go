package main

// The swarm (bench/server_scale.py drives it): many lightweight fake agents, so that only
// the proxy-server's cost of holding agents is measured, not an agent program's. Each fake
// agent is what a real one costs the server and nothing more: one TLS connection (client
// certificate, ALPN h2) and one /AgentService/Connect stream with its agentid; it answers
// what the server sends as an agent with a backend inside would: DIAL_REQ with DIAL_RSP (a
// connectID of its own), DATA by the backend's protocol (opSetup: a setupReply-byte reply;
// anything else echoed), CLOSE_REQ with CLOSE_RSP.
//
//	loadgen swarm -target=127.0.0.1:PORT -ca=F -cert=F -key=F -conns=N -batch=B [-servers=K]
//
// -servers=K (K > 1): the address is K proxy-servers behind one address (replicas behind a
// load balancer, or one proxy-server's K worker processes sharing its listening sockets), and
// each fake agent does what a real agent does there: it dials, reads the server's `serverid`
// response header, and dials again (at once, not after a real agent's backoff) until it holds
// K connections to K distinct server IDs, closing each duplicate; at most
// maxDialsPerServer*K dials (see there). One agent's connect lasts until it holds all K.
//
// Protocol with the orchestrator, in lines on stdin / stdout:
//
//	JOIN   connect every agent, at most -batch agents connecting at once; then
//	       "JOINED <json>": connected (agents holding all K), failures, dials (connections
//	       made in all, duplicates included), seconds (first start to last header),
//	       p50_ms and max_ms of one agent's connect (dial + TLS + Connect + headers, K
//	       times and more), servers (connections held per server ID), server_counts
//	       (connections held per `servercount` header value)
//	LEAVE  close every agent's connections; "LEFT <seconds>"
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

// With -servers=K, an agent gives up after maxDialsPerServer*K dials without holding K
// distinct server IDs. Which server a dial lands on is not the agent's choice: a balancer's
// round robin is shared by all the agents dialling at once, and worker processes sharing
// one listening socket take connections as they come (a busy one less often). Were it
// random and even, collecting K distinct IDs takes K*(1 + 1/2 + ... + 1/K) dials on
// average (3 for K = 2), and needing more than 20*K is a (1/2)^39 chance for K = 2; a
// bound far above that average still ends an agent that can never see all K (a server
// missing, or the address not balancing at all) instead of dialling forever.
const maxDialsPerServer = 20

// The response headers naming the server and telling how many there are (upstream's
// pkg/server: header.ServerID, header.ServerCount).
const (
	serverIDHeader    = "serverid"
	serverCountHeader = "servercount"
)

var connectDesc = &grpc.StreamDesc{StreamName: "Connect", ServerStreams: true, ClientStreams: true}

type swarmFlags struct {
	target, ca, cert, key  string
	agents, batch, servers int
}

// agentConn is one connection of a fake agent to one server.
type agentConn struct {
	cc          *grpc.ClientConn
	cancel      context.CancelFunc
	serverID    string
	serverCount string
}

func (c *agentConn) close() {
	c.cancel()
	c.cc.Close()
}

// fakeAgent is one agent: one connection per server (-servers of them).
type fakeAgent struct {
	conns []*agentConn
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
	fs.IntVar(&f.servers, "servers", 1, "servers behind the address: each agent holds one connection to each")
	_ = fs.Parse(args)
	if f.servers < 1 {
		fmt.Fprintln(os.Stderr, "swarm: -servers must be at least 1")
		os.Exit(2)
	}
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
	var failures, dials atomic.Int64
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
			a, n, err := connectAll(f, cfg, fmt.Sprintf("swarm-%d", i))
			dials.Add(int64(n))
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
	servers, counts := map[string]int{}, map[string]int{}
	for i, a := range agents {
		if a != nil {
			ok = append(ok, lat[i])
			held = append(held, a)
			for _, c := range a.conns {
				servers[c.serverID]++
				counts[c.serverCount]++
			}
		}
	}
	p50, _ := percentiles(ok)
	worst := time.Duration(0)
	for _, l := range ok {
		worst = max(worst, l)
	}
	r := map[string]any{
		"connected": len(held), "failures": failures.Load(), "seconds": seconds,
		"p50_ms": p50, "max_ms": worst.Seconds() * 1e3, "dials": dials.Load(),
		"servers": servers, "server_counts": counts,
	}
	if e := firstErr.Load(); e != nil {
		r["error"] = e
	}
	return held, r
}

// connectAll: one agent's connections, one to each of -servers distinct server IDs, and
// the number of dials it took (duplicates and failed dials included). With -servers=1,
// one dial, whatever the server's ID. On an error, or without K distinct IDs after
// maxDialsPerServer*K dials, every connection it held is closed.
func connectAll(f swarmFlags, cfg *tls.Config, id string) (*fakeAgent, int, error) {
	a := &fakeAgent{}
	seen := map[string]bool{}
	limit := maxDialsPerServer * f.servers
	if f.servers == 1 {
		limit = 1
	}
	dials := 0
	for len(a.conns) < f.servers && dials < limit {
		dials++
		c, err := connectAgent(f.target, cfg, id)
		if err != nil {
			leave([]*fakeAgent{a})
			return nil, dials, err
		}
		if f.servers > 1 && seen[c.serverID] {
			c.close()
			continue
		}
		seen[c.serverID] = true
		a.conns = append(a.conns, c)
	}
	if len(a.conns) < f.servers {
		got := len(a.conns)
		leave([]*fakeAgent{a})
		return nil, dials, fmt.Errorf("%s: %d of %d distinct server IDs after %d dials", id, got, f.servers, dials)
	}
	return a, dials, nil
}

// connectAgent: one TLS connection and its Connect stream, returned once the server's
// headers came (the server has registered the agent by then), with the server's ID.
func connectAgent(target string, cfg *tls.Config, id string) (*agentConn, error) {
	cc, err := grpc.NewClient("passthrough:///"+target,
		grpc.WithTransportCredentials(credentials.NewTLS(cfg.Clone())))
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	md := metadata.Pairs("agentid", id)
	stream, err := cc.NewStream(metadata.NewOutgoingContext(ctx, md), connectDesc, "/AgentService/Connect")
	var header metadata.MD
	if err == nil {
		header, err = waitHeaders(stream)
	}
	if err != nil {
		cancel()
		cc.Close()
		return nil, err
	}
	go serveAgent(stream)
	return &agentConn{cc: cc, cancel: cancel,
		serverID: firstValue(header, serverIDHeader), serverCount: firstValue(header, serverCountHeader)}, nil
}

func firstValue(md metadata.MD, key string) string {
	if v := md.Get(key); len(v) > 0 {
		return v[0]
	}
	return ""
}

type headerResult struct {
	md  metadata.MD
	err error
}

func waitHeaders(stream grpc.ClientStream) (metadata.MD, error) {
	done := make(chan headerResult, 1)
	go func() {
		md, err := stream.Header()
		done <- headerResult{md, err}
	}()
	select {
	case r := <-done:
		return r.md, r.err
	case <-time.After(swarmConnectTimeout):
		return nil, errors.New("no headers within the connect bound")
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
		for _, c := range a.conns {
			c.close()
		}
	}
}
