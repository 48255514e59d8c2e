// Command loadgen is the tunnel benchmark's load generator and backend (bench/tunnel.py
// drives it). It runs as its own process so that the orchestrator can read its CPU time
// from /proc and check that it is not the bottleneck.
//
//	loadgen backend                        a TCP backend on 127.0.0.1 (see serveConn)
//	loadgen bulk|setup|rtt|idle|hol|slow [...]  clients, through a proxy-server or direct
//	loadgen swarm [...]                    fake agents of a proxy-server (see swarm.go)
//
// Clients reach the backend in one of three ways (-mode): "direct" (a TCP connection to
// -target, the physical limit), "http-connect" (an HTTP/1.1 CONNECT on the proxy-server's
// Unix socket -uds) or "grpc" (the published konnectivity-client library, one gRPC
// connection per tunnel as kube-apiserver's CreateSingleUseGrpcTunnel does).
//
// Protocol with the orchestrator, in lines: the client prints "READY" once its tunnels
// are set up, waits for "GO" on stdin, runs, and prints "RESULT <json>". The idle client
// prints "OPENED <n>" and waits for "CLOSE". Every run is bounded by -timeout (a watchdog
// prints an error result and exits 3). Progress and errors go to stderr only.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"sigs.k8s.io/apiserver-network-proxy/konnectivity-client/pkg/client"
)

// Backend operations: the first byte a client sends on a connection.
const (
	opSetup    = 'S' // the 1-byte request of a tunnel set-up: reply setupReply bytes
	opEcho     = 'E' // echo everything until EOF
	opDownload = 'D' // 8-byte big-endian length follows: the backend sends that many bytes
	opUpload   = 'U' // 8-byte big-endian length follows: the client sends them, then 1-byte ack
)

const (
	setupReply = 1024      // the 1 KiB reply of a set-up cycle
	chunk      = 256 << 10 // backend write size and client read size for bulk transfers
	// A stalled reader asks for more than any buffer between it and the backend can hold.
	stallBytes = 1 << 40
)

type options struct {
	mode      string
	uds       string
	target    string
	conns     int
	bytes     int64
	wsize     int
	direction string
	workers   int
	duration  time.Duration
	count     int
	size      int
	batch     int
	stall     time.Duration
	stallSize int64
	after     time.Duration
	probe     time.Duration
	window    time.Duration
	timeout   time.Duration
	// slow: a reader at `rate` beside an echo (kind "echo") or `conns` downloads ("down")
	kind      string
	rate      float64
	otherRate float64
	base      time.Duration
	fill      time.Duration
	measure   time.Duration
	from      time.Duration
	interval  time.Duration
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: loadgen backend|bulk|setup|rtt|idle|hol|slow|swarm [flags]")
		os.Exit(2)
	}
	cmd := os.Args[1]
	if cmd == "backend" {
		runBackend()
		return
	}
	if cmd == "swarm" { // lives until the orchestrator says QUIT (swarm.go)
		runSwarm(os.Args[2:])
		return
	}
	o := parseFlags(os.Args[2:])
	time.AfterFunc(o.timeout, func() {
		emit(map[string]any{"error": fmt.Sprintf("timeout after %s", o.timeout)})
		os.Exit(3)
	})
	var r map[string]any
	switch cmd {
	case "bulk":
		r = runBulk(o)
	case "setup":
		r = runSetup(o)
	case "rtt":
		r = runRTT(o)
	case "idle":
		r = runIdle(o)
	case "hol":
		r = runHOL(o)
	case "slow":
		r = runSlow(o)
	default:
		fmt.Fprintln(os.Stderr, "unknown command", cmd)
		os.Exit(2)
	}
	emit(r)
	os.Exit(0)
}

func parseFlags(args []string) options {
	var o options
	fs := flag.NewFlagSet("loadgen", flag.ExitOnError)
	fs.StringVar(&o.mode, "mode", "direct", "direct, http-connect or grpc")
	fs.StringVar(&o.uds, "uds", "", "proxy-server frontend Unix socket")
	fs.StringVar(&o.target, "target", "", "backend host:port")
	fs.IntVar(&o.conns, "conns", 1, "tunnels (bulk, idle, hol)")
	fs.Int64Var(&o.bytes, "bytes", 64<<20, "bytes per tunnel (bulk, hol)")
	fs.IntVar(&o.wsize, "wsize", 16<<10, "upload write size")
	fs.StringVar(&o.direction, "dir", "down", "down or up (bulk)")
	fs.IntVar(&o.workers, "workers", 1, "concurrent set-up loops (setup)")
	fs.DurationVar(&o.duration, "duration", 2*time.Second, "set-up loop duration")
	fs.IntVar(&o.count, "count", 1000, "round trips (rtt)")
	fs.IntVar(&o.size, "size", 1024, "round-trip message size (rtt)")
	fs.IntVar(&o.batch, "batch", 50, "tunnels opened at once (idle)")
	fs.DurationVar(&o.stall, "stall", time.Second, "time for the stalled tunnel to fill buffers (hol)")
	fs.Int64Var(&o.stallSize, "stall-bytes", stallBytes, "bytes the stalled tunnel asks for (hol)")
	fs.DurationVar(&o.after, "after", 0, "if set: measure once more this long after the stall began (hol)")
	fs.DurationVar(&o.probe, "probe", 5*time.Second, "bound on the new-tunnel probe (hol)")
	fs.DurationVar(&o.window, "window", 20*time.Second, "bound on each download phase (hol)")
	fs.StringVar(&o.kind, "kind", "echo", "beside the slow reader: echo or down (slow)")
	fs.Float64Var(&o.rate, "rate", 1e6, "bytes/s the slow reader reads; 0: never reads (slow)")
	fs.Float64Var(&o.otherRate, "other-rate", 0, "bytes/s each download reads; 0: as fast as it can (slow)")
	fs.DurationVar(&o.base, "base", 3*time.Second, "the phase without the slow reader (slow)")
	fs.DurationVar(&o.fill, "fill", 20*time.Second, "slow reading before the echo is measured (slow)")
	fs.DurationVar(&o.measure, "measure", 5*time.Second, "the measured phase after -fill (slow)")
	fs.DurationVar(&o.from, "from", time.Second, "downloads are counted from this long after the slow reader began (slow)")
	fs.DurationVar(&o.interval, "interval", 10*time.Millisecond, "one echo per interval at most (slow)")
	fs.DurationVar(&o.timeout, "timeout", 120*time.Second, "bound on the whole run")
	_ = fs.Parse(args)
	return o
}

var emitMu sync.Mutex

func emit(r map[string]any) {
	emitMu.Lock()
	defer emitMu.Unlock()
	out, _ := json.Marshal(r)
	fmt.Printf("RESULT %s\n", out)
}

func say(line string) { fmt.Println(line) }

// waitLine blocks until the orchestrator writes `word` on stdin.
var stdin = bufio.NewReader(os.Stdin)

func waitLine(word string) {
	for {
		line, err := stdin.ReadString('\n')
		if err != nil {
			fmt.Fprintln(os.Stderr, "stdin closed while waiting for", word)
			os.Exit(4)
		}
		if len(line) >= len(word) && line[:len(word)] == word {
			return
		}
	}
}

// ---- the backend ----------------------------------------------------------------------

func runBackend() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("READY %d\n", ln.Addr().(*net.TCPAddr).Port)
	// The backend lives until the orchestrator closes stdin (or kills it).
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	block := make([]byte, chunk)
	for i := range block {
		block[i] = byte(i % 251)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			continue
		}
		go serveConn(c, block)
	}
}

func serveConn(c net.Conn, block []byte) {
	defer c.Close()
	var op [9]byte
	if _, err := io.ReadFull(c, op[:1]); err != nil {
		return
	}
	switch op[0] {
	case opSetup:
		_, _ = c.Write(block[:setupReply])
		_, _ = io.Copy(io.Discard, c)
	case opEcho:
		_, _ = io.CopyBuffer(c, c, make([]byte, 64<<10))
	case opDownload, opUpload:
		if _, err := io.ReadFull(c, op[1:]); err != nil {
			return
		}
		n := int64(binary.BigEndian.Uint64(op[1:]))
		if op[0] == opDownload {
			for n > 0 {
				w := min(n, int64(len(block)))
				if _, err := c.Write(block[:w]); err != nil {
					return
				}
				n -= w
			}
			if tc, ok := c.(*net.TCPConn); ok {
				_ = tc.CloseWrite()
			}
		} else {
			if _, err := io.CopyBuffer(io.Discard, io.LimitReader(c, n), make([]byte, chunk)); err != nil {
				return
			}
			_, _ = c.Write([]byte{'K'})
		}
		_, _ = io.Copy(io.Discard, c)
	}
}

// ---- reaching the backend ---------------------------------------------------------------

// bufConn reads through the bufio.Reader that parsed the CONNECT response (it may hold
// the first tunnel bytes).
type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (b *bufConn) Read(p []byte) (int, error) { return b.r.Read(p) }

func dial(ctx context.Context, o options) (net.Conn, error) {
	switch o.mode {
	case "direct":
		var d net.Dialer
		return d.DialContext(ctx, "tcp", o.target)
	case "http-connect":
		var d net.Dialer
		conn, err := d.DialContext(ctx, "unix", o.uds)
		if err != nil {
			return nil, err
		}
		req := "CONNECT " + o.target + " HTTP/1.1\r\nHost: " + o.target + "\r\n\r\n"
		if _, err := io.WriteString(conn, req); err != nil {
			conn.Close()
			return nil, err
		}
		br := bufio.NewReaderSize(conn, 64<<10)
		resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
		if err != nil {
			conn.Close()
			return nil, fmt.Errorf("CONNECT response: %w", err)
		}
		if resp.StatusCode != http.StatusOK {
			conn.Close()
			return nil, fmt.Errorf("CONNECT answered %s", resp.Status)
		}
		return &bufConn{conn, br}, nil
	case "grpc":
		opts := []grpc.DialOption{
			grpc.WithBlock(),
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", o.uds)
			}),
		}
		tunnel, err := client.CreateSingleUseGrpcTunnelWithContext(ctx, ctx, "unix-socket", opts...)
		if err != nil {
			return nil, err
		}
		return tunnel.DialContext(ctx, "tcp", o.target)
	}
	return nil, fmt.Errorf("unknown mode %q", o.mode)
}

// dialMany opens n tunnels, at most `batch` dials at a time.
func dialMany(o options, n, batch int) ([]net.Conn, error) {
	conns := make([]net.Conn, n)
	errs := make([]error, n)
	sem := make(chan struct{}, max(batch, 1))
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			conns[i], errs[i] = dial(context.Background(), o)
		}(i)
	}
	wg.Wait()
	return conns, errors.Join(errs...)
}

func header(op byte, n int64) []byte {
	h := make([]byte, 9)
	h[0] = op
	binary.BigEndian.PutUint64(h[1:], uint64(n))
	return h
}

func fail(err error) map[string]any { return map[string]any{"error": err.Error()} }

// ---- bulk: one or more downloads or uploads at once -------------------------------------

func download(c net.Conn, n int64, got *atomic.Int64) error {
	if _, err := c.Write(header(opDownload, n)); err != nil {
		return err
	}
	buf := make([]byte, chunk)
	var total int64
	for total < n {
		k, err := c.Read(buf)
		total += int64(k)
		got.Add(int64(k))
		if err != nil {
			if err == io.EOF && total == n {
				break
			}
			return fmt.Errorf("after %d of %d bytes: %w", total, n, err)
		}
	}
	return nil
}

func upload(c net.Conn, n int64, wsize int, got *atomic.Int64) error {
	if _, err := c.Write(header(opUpload, n)); err != nil {
		return err
	}
	buf := make([]byte, wsize)
	for i := range buf {
		buf[i] = byte(i % 253)
	}
	for left := n; left > 0; {
		w := min(left, int64(wsize))
		k, err := c.Write(buf[:w])
		got.Add(int64(k))
		left -= int64(k)
		if err != nil {
			return err
		}
	}
	var ack [1]byte
	if _, err := io.ReadFull(c, ack[:]); err != nil {
		return fmt.Errorf("upload ack: %w", err)
	}
	return nil
}

func runBulk(o options) map[string]any {
	conns, err := dialMany(o, o.conns, o.conns)
	if err != nil {
		return fail(err)
	}
	say("READY")
	waitLine("GO")
	var got atomic.Int64
	errs := make([]error, len(conns))
	start := time.Now()
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Add(1)
		go func(i int, c net.Conn) {
			defer wg.Done()
			if o.direction == "up" {
				errs[i] = upload(c, o.bytes, o.wsize, &got)
			} else {
				errs[i] = download(c, o.bytes, &got)
			}
		}(i, c)
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	for _, c := range conns {
		c.Close()
	}
	r := map[string]any{"bytes": got.Load(), "seconds": elapsed}
	if err := errors.Join(errs...); err != nil {
		r["error"] = err.Error()
	}
	return r
}

// ---- tunnel set-up rate ------------------------------------------------------------------

func setupOnce(o options, buf []byte) error {
	return setupWithin(o, buf, 10*time.Second)
}

// setupWithin: one set-up cycle whose dial is bounded by `bound`.
func setupWithin(o options, buf []byte, bound time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	c, err := dial(ctx, o)
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Write([]byte{opSetup}); err != nil {
		return err
	}
	_, err = io.ReadFull(c, buf)
	return err
}

func percentiles(lat []time.Duration) (float64, float64) {
	if len(lat) == 0 {
		return 0, 0
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	at := func(q float64) float64 { return lat[int(q*float64(len(lat)-1))].Seconds() * 1e3 }
	return at(0.50), at(0.99)
}

func runSetup(o options) map[string]any {
	say("READY")
	waitLine("GO")
	deadline := time.Now().Add(o.duration)
	lats := make([][]time.Duration, o.workers)
	var failures atomic.Int64
	var firstErr atomic.Value
	start := time.Now()
	var wg sync.WaitGroup
	for w := range o.workers {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			buf := make([]byte, setupReply)
			for time.Now().Before(deadline) {
				t0 := time.Now()
				if err := setupOnce(o, buf); err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				lats[w] = append(lats[w], time.Since(t0))
			}
		}(w)
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	var all []time.Duration
	for _, l := range lats {
		all = append(all, l...)
	}
	p50, p99 := percentiles(all)
	r := map[string]any{
		"tunnels": len(all), "seconds": elapsed, "failures": failures.Load(),
		"p50_ms": p50, "p99_ms": p99,
	}
	if e := firstErr.Load(); e != nil {
		r["error"] = e
	}
	return r
}

// ---- round trips over one established tunnel ---------------------------------------------

func runRTT(o options) map[string]any {
	c, err := dial(context.Background(), o)
	if err != nil {
		return fail(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte{opEcho}); err != nil {
		return fail(err)
	}
	msg := make([]byte, o.size)
	back := make([]byte, o.size)
	// Warm-up round trips: the first ones pay for lazily set-up state on every hop.
	for range 50 {
		if _, err := c.Write(msg); err != nil {
			return fail(err)
		}
		if _, err := io.ReadFull(c, back); err != nil {
			return fail(err)
		}
	}
	say("READY")
	waitLine("GO")
	lat := make([]time.Duration, 0, o.count)
	start := time.Now()
	for i := range o.count {
		msg[0] = byte(i)
		t0 := time.Now()
		if _, err := c.Write(msg); err != nil {
			return fail(err)
		}
		if _, err := io.ReadFull(c, back); err != nil {
			return fail(err)
		}
		lat = append(lat, time.Since(t0))
		if back[0] != msg[0] {
			return fail(errors.New("echo differs"))
		}
	}
	elapsed := time.Since(start).Seconds()
	p50, p99 := percentiles(lat)
	return map[string]any{"count": len(lat), "seconds": elapsed, "p50_ms": p50, "p99_ms": p99}
}

// ---- idle tunnels ------------------------------------------------------------------------

func runIdle(o options) map[string]any {
	say("READY")
	waitLine("GO")
	conns, err := dialMany(o, o.conns, o.batch)
	if err != nil {
		return fail(err)
	}
	// One echoed byte per tunnel: the tunnel is established end to end, not only dialled.
	var wg sync.WaitGroup
	errs := make([]error, len(conns))
	for i, c := range conns {
		wg.Add(1)
		go func(i int, c net.Conn) {
			defer wg.Done()
			var b [2]byte
			if _, err := c.Write([]byte{opEcho, 'x'}); err != nil {
				errs[i] = err
				return
			}
			_, errs[i] = io.ReadFull(c, b[:1])
		}(i, c)
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fail(err)
	}
	say(fmt.Sprintf("OPENED %d", len(conns)))
	waitLine("CLOSE")
	for _, c := range conns {
		c.Close()
	}
	return map[string]any{"tunnels": len(conns)}
}

// ---- head-of-line blocking ---------------------------------------------------------------

// downloadsFor dials o.conns tunnels and downloads o.bytes through each, and returns the
// aggregate rate in bytes/s from the first dial on, bounded by o.window: a blocked phase
// (a dial or a download that never ends) reports what arrived within the window.
func downloadsFor(o options) (float64, bool, int) {
	var got atomic.Int64
	var dialFailures atomic.Int64
	ctx, cancel := context.WithTimeout(context.Background(), o.window)
	defer cancel()
	done := make(chan struct{})
	start := time.Now()
	var wg sync.WaitGroup
	for range o.conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := dial(ctx, o)
			if err != nil {
				dialFailures.Add(1)
				return
			}
			defer func() { go c.Close() }() // a blocked tunnel's Close may block too
			_ = download(c, o.bytes, &got)
		}()
	}
	go func() { wg.Wait(); close(done) }()
	finished := true
	select {
	case <-done:
	case <-ctx.Done():
		finished = false
	}
	elapsed := time.Since(start).Seconds()
	return float64(got.Load()) / elapsed, finished && dialFailures.Load() == 0, int(dialFailures.Load())
}

// probe sets up one new tunnel (the set-up cycle) within o.probe.
func probe(o options) (bool, float64) {
	res := make(chan error, 1)
	start := time.Now()
	go func() { res <- setupOnce(o, make([]byte, setupReply)) }()
	select {
	case err := <-res:
		return err == nil, time.Since(start).Seconds() * 1e3
	case <-time.After(o.probe):
		return false, time.Since(start).Seconds() * 1e3
	}
}

func runHOL(o options) map[string]any {
	say("READY")
	waitLine("GO")
	base, baseDone, baseDialFail := downloadsFor(o)
	stalled, err := dial(context.Background(), o)
	if err != nil {
		return fail(err)
	}
	if _, err := stalled.Write(header(opDownload, o.stallSize)); err != nil {
		return fail(err)
	}
	stallStart := time.Now()
	// Never read from `stalled`: let every buffer on its path fill up.
	time.Sleep(o.stall)
	with, withDone, withDialFail := downloadsFor(o)
	ok, probeMs := probe(o)
	out := map[string]any{
		"base_bps": base, "base_finished": baseDone, "base_dial_failures": baseDialFail,
		"stalled_bps": with, "stalled_finished": withDone, "stalled_dial_failures": withDialFail,
		"new_tunnel_ok": ok, "new_tunnel_ms": probeMs,
	}
	if o.after > 0 {
		// Still never read: does a proxy that gives up on the stalled tunnel let the
		// others go again?
		time.Sleep(time.Until(stallStart.Add(o.after)))
		afterBps, afterDone, afterDialFail := downloadsFor(o)
		afterOk, afterMs := probe(o)
		out["after_s"] = o.after.Seconds()
		out["after_bps"], out["after_finished"], out["after_dial_failures"] = afterBps, afterDone, afterDialFail
		out["after_new_tunnel_ok"], out["after_new_tunnel_ms"] = afterOk, afterMs
	}
	// The stalled connection must stay open (unread) until here: without this, the
	// collector may finalize it and close its socket mid-test.
	runtime.KeepAlive(stalled)
	return out
}

// ---- a slow but steady reader beside other tunnels ----------------------------------------

const (
	// A paced reader reads what is due every paceTick, in pieces of rate*paceTick bytes.
	paceTick = 10 * time.Millisecond
	// A paced reader held up (no data came) reads at most this much time's worth at once
	// when data comes back: it stays steady rather than catching up.
	paceDebt = 100 * time.Millisecond
	// Downloads are sampled this often for the time series.
	sampleEvery = 100 * time.Millisecond
	// Beside the echo, one new tunnel is set up this often (or back to back when slower).
	probeEvery = 250 * time.Millisecond
)

// tally counts what one reader got and the longest time it got nothing, counted from
// `from` (zero: not counted yet).
type tally struct {
	bytes  atomic.Int64
	mu     sync.Mutex
	last   time.Time
	from   time.Time
	maxGap time.Duration
}

func (t *tally) add(k int) {
	if k <= 0 {
		return
	}
	now := time.Now()
	t.bytes.Add(int64(k))
	t.mu.Lock()
	t.gapTo(now)
	t.last = now
	t.mu.Unlock()
}

// gapTo counts the gap from the last read (or `from`) to `now`; t.mu held.
func (t *tally) gapTo(now time.Time) {
	if t.from.IsZero() {
		return
	}
	prev := t.last
	if prev.Before(t.from) {
		prev = t.from
	}
	if g := now.Sub(prev); g > t.maxGap {
		t.maxGap = g
	}
}

// countGapsFrom starts counting gaps afresh at `at`.
func (t *tally) countGapsFrom(at time.Time) {
	t.mu.Lock()
	t.from, t.maxGap = at, 0
	t.mu.Unlock()
}

// longestGap up to `end`, the time since the last read included.
func (t *tally) longestGap(end time.Time) time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.gapTo(end)
	return t.maxGap
}

// readFast reads c as fast as it can until an error (a closed conn ends it).
func readFast(c net.Conn, t *tally) {
	buf := make([]byte, chunk)
	for {
		k, err := c.Read(buf)
		t.add(k)
		if err != nil {
			return
		}
	}
}

// readPaced reads c at `rate` bytes/s, what is due on every tick, until `stop` closes or
// an error; it never stops of its own. With rate 0 it never reads (a stalled reader).
func readPaced(c net.Conn, rate float64, t *tally, stop <-chan struct{}) {
	if rate <= 0 {
		<-stop
		return
	}
	buf := make([]byte, chunk)
	tick := time.NewTicker(paceTick)
	defer tick.Stop()
	start := time.Now()
	var done float64
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		due := rate*time.Since(start).Seconds() - done
		if most := rate * paceDebt.Seconds(); due > most {
			done += due - most
			due = most
		}
		for due >= 1 {
			k, err := c.Read(buf[:min(int(due), len(buf))])
			t.add(k)
			done += float64(k)
			due -= float64(k)
			if err != nil {
				return
			}
		}
	}
}

func startDownload(c net.Conn) error {
	_, err := c.Write(header(opDownload, stallBytes))
	return err
}

// echoFor runs one 1 KiB round trip per o.interval (or back to back when slower) for d
// on c (already in echo mode); a round trip still under way at d is waited for.
// timedOut: one round trip took more than o.probe (then it is counted as o.probe).
func echoFor(c net.Conn, o options, d time.Duration) (lat []time.Duration, timedOut bool, err error) {
	msg := make([]byte, o.size)
	back := make([]byte, o.size)
	end := time.Now().Add(d)
	next := time.Now()
	for i := 0; time.Now().Before(end); i++ {
		time.Sleep(time.Until(next))
		msg[0] = byte(i)
		t0 := time.Now()
		res := make(chan error, 1)
		go func() {
			if _, err := c.Write(msg); err != nil {
				res <- err
				return
			}
			_, err := io.ReadFull(c, back)
			res <- err
		}()
		select {
		case err := <-res:
			if err != nil {
				return lat, false, err
			}
		case <-time.After(o.probe):
			return append(lat, o.probe), true, nil
		}
		lat = append(lat, time.Since(t0))
		if back[0] != msg[0] {
			return lat, false, errors.New("echo differs")
		}
		next = t0.Add(o.interval)
	}
	return lat, false, nil
}

// probesFor sets up one new tunnel per probeEvery (or back to back when slower) for d,
// each bounded by o.probe; a set-up still under way at d is waited for (bounded too).
// A failed or timed-out set-up counts as o.probe.
func probesFor(o options, d time.Duration) (lat []time.Duration, failures int) {
	end := time.Now().Add(d)
	next := time.Now()
	for time.Now().Before(end) {
		time.Sleep(time.Until(next))
		t0 := time.Now()
		res := make(chan error, 1)
		go func() { res <- setupWithin(o, make([]byte, setupReply), o.probe) }()
		took := o.probe
		select {
		case err := <-res:
			if err != nil {
				failures++
			} else {
				took = time.Since(t0)
			}
		case <-time.After(o.probe):
			failures++
		}
		lat = append(lat, took)
		next = t0.Add(probeEvery)
	}
	return lat, failures
}

// echoAndProbes runs echoFor and probesFor at once for d; their results in `out`
// (keys prefixed "<prefix>echo_" and "<prefix>setup_").
func echoAndProbes(c net.Conn, o options, d time.Duration, prefix string, out map[string]any) error {
	var setups []time.Duration
	var failures int
	done := make(chan struct{})
	go func() {
		defer close(done)
		setups, failures = probesFor(o, d)
	}()
	lat, timedOut, err := echoFor(c, o, d)
	<-done
	if err != nil {
		return err
	}
	latencyStats(prefix+"echo_", lat, out)
	out[prefix+"echo_timed_out"] = timedOut
	latencyStats(prefix+"setup_", setups, out)
	out[prefix+"setup_failures"] = failures
	return nil
}

func latencyStats(prefix string, lat []time.Duration, out map[string]any) {
	p50, p99 := percentiles(lat)
	out[prefix+"p50_ms"], out[prefix+"p99_ms"] = p50, p99
	out[prefix+"max_ms"] = 0.0
	if len(lat) > 0 {
		out[prefix+"max_ms"] = lat[len(lat)-1].Seconds() * 1e3 // sorted by percentiles
	}
	out[prefix+"count"] = len(lat)
}

// runSlow: one tunnel downloads endlessly and is read steadily at o.rate while either a
// 1 KiB echo runs on another tunnel of the same agent (-kind=echo) or o.conns other
// tunnels download endlessly (-kind=down), each read as fast as it can or at o.otherRate.
// Every tunnel is dialled before READY; the slow download begins after o.base.
func runSlow(o options) map[string]any {
	slow, err := dial(context.Background(), o)
	if err != nil {
		return fail(err)
	}
	if o.kind == "echo" {
		return slowEcho(o, slow)
	}
	return slowDownloads(o, slow)
}

// startSlow begins the slow download; what the slow reader got, and a channel that stops it.
func startSlow(o options, slow net.Conn) (*tally, chan struct{}, time.Time, error) {
	t, stop := &tally{}, make(chan struct{})
	if err := startDownload(slow); err != nil {
		return nil, nil, time.Time{}, err
	}
	at := time.Now()
	go readPaced(slow, o.rate, t, stop)
	return t, stop, at, nil
}

// slowEcho: unloaded, the echo for o.base beside new tunnels set up one after another;
// then the slow reader for o.fill; then the echo and the new tunnels again for o.measure.
func slowEcho(o options, slow net.Conn) map[string]any {
	c, err := dial(context.Background(), o)
	if err != nil {
		return fail(err)
	}
	if _, err := c.Write([]byte{opEcho}); err != nil {
		return fail(err)
	}
	// Warm-up round trips: the first ones pay for lazily set-up state on every hop.
	warm := o
	warm.interval = 0
	if _, _, err := echoFor(c, warm, 200*time.Millisecond); err != nil {
		return fail(err)
	}
	say("READY")
	waitLine("GO")
	out := map[string]any{"rate": o.rate}
	if err := echoAndProbes(c, o, o.base, "alone_", out); err != nil {
		return fail(fmt.Errorf("echo alone: %w", err))
	}
	if out["alone_echo_timed_out"] == true { // its round trip may still be reading c
		return fail(fmt.Errorf("echo alone: a round trip took more than %s", o.probe))
	}
	t, stop, at, err := startSlow(o, slow)
	if err != nil {
		return fail(err)
	}
	time.Sleep(o.fill)
	if err := echoAndProbes(c, o, o.measure, "", out); err != nil {
		return fail(fmt.Errorf("echo beside the slow reader: %w", err))
	}
	elapsed := time.Since(at)
	close(stop)
	out["slow_bps"] = float64(t.bytes.Load()) / elapsed.Seconds()
	out["slow_s"] = elapsed.Seconds()
	runtime.KeepAlive(slow)
	return out
}

// slowDownloads: o.conns endless downloads, alone for o.base, then beside the slow
// reader for o.fill + o.measure; their throughput alone and from o.from after the slow
// reader began, and the longest time any of them got nothing, alone (after the warm-up)
// and from when the slow reader began.
func slowDownloads(o options, slow net.Conn) map[string]any {
	conns, err := dialMany(o, o.conns, o.conns)
	if err != nil {
		return fail(err)
	}
	say("READY")
	waitLine("GO")
	tallies := make([]*tally, len(conns))
	stop := make(chan struct{})
	for i, c := range conns {
		tallies[i] = &tally{}
		if err := startDownload(c); err != nil {
			return fail(err)
		}
		if o.otherRate > 0 {
			go readPaced(c, o.otherRate, tallies[i], stop)
		} else {
			go readFast(c, tallies[i])
		}
	}
	start := time.Now()
	total := func() int64 {
		var n int64
		for _, t := range tallies {
			n += t.bytes.Load()
		}
		return n
	}
	// The time series: every sampleEvery, the bytes each download (and the slow reader) got.
	slowTally := &tally{}
	var samples [][]int64
	var times []time.Duration
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(sampleEvery)
		defer tick.Stop()
		for {
			row := make([]int64, len(tallies)+1)
			for i, t := range tallies {
				row[i] = t.bytes.Load()
			}
			row[len(tallies)] = slowTally.bytes.Load()
			samples, times = append(samples, row), append(times, time.Since(start))
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	// Alone: from a warm-up (a quarter of the phase, at most 0.5 s) to the end of o.base.
	warm := min(o.base/4, 500*time.Millisecond)
	time.Sleep(warm)
	b0, t0 := total(), time.Now()
	for _, t := range tallies {
		t.countGapsFrom(t0)
	}
	time.Sleep(time.Until(start.Add(o.base)))
	b1, t1 := total(), time.Now()
	baseBps := float64(b1-b0) / t1.Sub(t0).Seconds()
	aloneGap := 0.0
	for _, t := range tallies {
		aloneGap = max(aloneGap, t.longestGap(t1).Seconds()*1e3)
	}
	if err := startDownload(slow); err != nil {
		return fail(err)
	}
	at := time.Now()
	go readPaced(slow, o.rate, slowTally, stop)
	for _, t := range tallies {
		t.countGapsFrom(at)
	}
	time.Sleep(time.Until(at.Add(o.from)))
	k0, f0 := total(), time.Now()
	time.Sleep(time.Until(at.Add(o.fill + o.measure)))
	k1, end := total(), time.Now()
	close(stop)
	<-sampled
	gaps := make([]float64, len(tallies))
	longest := 0.0
	for i, t := range tallies {
		gaps[i] = t.longestGap(end).Seconds() * 1e3
		longest = max(longest, gaps[i])
	}
	for _, c := range conns {
		go c.Close() // a blocked tunnel's Close may block too
	}
	// Per 100 ms rows: the series in KiB (one string of numbers per reader), and the worst
	// second (the lowest rate over ten rows) from o.from on.
	cols := make([]strings.Builder, len(tallies)+2) // t_ms, each download, the slow reader
	for r := 1; r < len(samples); r++ {
		sep := " "
		if r == 1 {
			sep = ""
		}
		fmt.Fprintf(&cols[0], "%s%d", sep, times[r].Milliseconds())
		for i := range len(tallies) + 1 {
			fmt.Fprintf(&cols[i+1], "%s%d", sep, (samples[r][i]-samples[r-1][i])>>10)
		}
	}
	kib := make([]string, len(tallies))
	for i := range kib {
		kib[i] = cols[i+1].String()
	}
	worst := -1.0
	for r := range samples {
		// Windows [r, r+10) that begin o.from after the slow reader began and end by `end`.
		w := r
		for w < len(samples) && times[w]-times[r] < time.Second {
			w++
		}
		if start.Add(times[r]).Before(at.Add(o.from)) || w >= len(samples) {
			continue
		}
		var n int64
		for i := range tallies {
			n += samples[w][i] - samples[r][i]
		}
		bps := float64(n) / (times[w] - times[r]).Seconds()
		if worst < 0 || bps < worst {
			worst = bps
		}
	}
	runtime.KeepAlive(slow)
	return map[string]any{
		"rate": o.rate, "other_rate": o.otherRate, "conns": len(conns),
		"base_bps": baseBps, "with_bps": float64(k1-k0) / end.Sub(f0).Seconds(),
		"nominal_bps": o.otherRate * float64(len(conns)), "alone_gap_ms": aloneGap,
		"worst_1s_bps": max(worst, 0), "longest_gap_ms": longest, "gaps_ms": gaps,
		"slow_bps":      float64(slowTally.bytes.Load()) / end.Sub(at).Seconds(),
		"slow_start_ms": at.Sub(start).Milliseconds(), "from_s": o.from.Seconds(),
		"series": map[string]any{
			"t_ms": cols[0].String(), "kib": kib, "slow_kib": cols[len(tallies)+1].String(),
		},
	}
}
