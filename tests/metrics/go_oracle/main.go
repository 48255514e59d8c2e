// Command go_oracle prints the Prometheus text exposition that client_golang writes for a
// scenario read from standard input (JSON). tests/metrics/test_go_oracle.py runs the same
// scenario through konnectivity_fast.metrics and compares the two outputs byte for byte.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"net/http/httptest"
	"os"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/common/expfmt"
)

type metricSpec struct {
	Type    string   `json:"type"`
	Name    string   `json:"name"`
	Help    string   `json:"help"`
	Labels  []string `json:"labels"`
	Vec     bool     `json:"vec"`
	Buckets []string `json:"buckets"`
}

type opSpec struct {
	Metric int      `json:"m"`
	Labels []string `json:"l"`
	Op     string   `json:"op"`
	Value  string   `json:"v"`
}

type scenario struct {
	Metrics []metricSpec `json:"metrics"`
	Ops     []opSpec     `json:"ops"`
	Process bool         `json:"process"`
}

// instrument is what one op acts on: a counter, gauge or histogram child.
type instrument struct {
	counter   prometheus.Counter
	gauge     prometheus.Gauge
	histogram prometheus.Observer
}

func parse(s string) float64 {
	v, err := strconv.ParseFloat(s, 64)
	if err != nil {
		panic(err)
	}
	return v
}

// contentType prints the Content-Type that promhttp answers a scrape with, for each Accept
// header given (one per argument; "" for none).
func contentType(accepts []string) {
	handler := promhttp.HandlerFor(prometheus.NewRegistry(), promhttp.HandlerOpts{})
	for _, accept := range accepts {
		req := httptest.NewRequest("GET", "/metrics", nil)
		if accept != "" {
			req.Header.Set("Accept", accept)
		}
		rec := httptest.NewRecorder()
		handler.ServeHTTP(rec, req)
		fmt.Println(rec.Header().Get("Content-Type"))
	}
}

func main() {
	ct := flag.Bool("content-type", false, "print promhttp's Content-Type for each Accept argument")
	flag.Parse()
	if *ct {
		contentType(flag.Args())
		return
	}
	var sc scenario
	if err := json.NewDecoder(bufio.NewReader(os.Stdin)).Decode(&sc); err != nil {
		panic(err)
	}
	reg := prometheus.NewRegistry()
	if sc.Process {
		reg.MustRegister(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	lookups := make([]func([]string) instrument, len(sc.Metrics))
	for i, m := range sc.Metrics {
		lookups[i] = build(reg, m)
	}
	for _, op := range sc.Ops {
		in := lookups[op.Metric](op.Labels)
		apply(in, op)
	}
	families, err := reg.Gather()
	if err != nil {
		panic(err)
	}
	out := bufio.NewWriter(os.Stdout)
	for _, mf := range families {
		if _, err := expfmt.MetricFamilyToText(out, mf); err != nil {
			panic(err)
		}
	}
	if err := out.Flush(); err != nil {
		panic(err)
	}
}

func build(reg *prometheus.Registry, m metricSpec) func([]string) instrument {
	switch m.Type {
	case "counter":
		opts := prometheus.CounterOpts{Name: m.Name, Help: m.Help}
		if !m.Vec {
			c := prometheus.NewCounter(opts)
			reg.MustRegister(c)
			return func([]string) instrument { return instrument{counter: c} }
		}
		v := prometheus.NewCounterVec(opts, m.Labels)
		reg.MustRegister(v)
		return func(l []string) instrument { return instrument{counter: v.WithLabelValues(l...)} }
	case "gauge":
		opts := prometheus.GaugeOpts{Name: m.Name, Help: m.Help}
		if !m.Vec {
			g := prometheus.NewGauge(opts)
			reg.MustRegister(g)
			return func([]string) instrument { return instrument{gauge: g} }
		}
		v := prometheus.NewGaugeVec(opts, m.Labels)
		reg.MustRegister(v)
		return func(l []string) instrument { return instrument{gauge: v.WithLabelValues(l...)} }
	case "histogram":
		opts := prometheus.HistogramOpts{Name: m.Name, Help: m.Help}
		if m.Buckets != nil {
			opts.Buckets = make([]float64, len(m.Buckets))
			for i, b := range m.Buckets {
				opts.Buckets[i] = parse(b)
			}
		}
		if !m.Vec {
			h := prometheus.NewHistogram(opts)
			reg.MustRegister(h)
			return func([]string) instrument { return instrument{histogram: h} }
		}
		v := prometheus.NewHistogramVec(opts, m.Labels)
		reg.MustRegister(v)
		return func(l []string) instrument { return instrument{histogram: v.WithLabelValues(l...)} }
	}
	panic(fmt.Sprintf("unknown metric type %q", m.Type))
}

func apply(in instrument, op opSpec) {
	switch op.Op {
	case "inc":
		if in.counter != nil {
			in.counter.Inc()
		} else {
			in.gauge.Inc()
		}
	case "add":
		if in.counter != nil {
			in.counter.Add(parse(op.Value))
		} else {
			in.gauge.Add(parse(op.Value))
		}
	case "dec":
		in.gauge.Dec()
	case "sub":
		in.gauge.Sub(parse(op.Value))
	case "set":
		in.gauge.Set(parse(op.Value))
	case "observe":
		in.histogram.Observe(parse(op.Value))
	case "touch":
		// WithLabelValues alone creates the child.
	default:
		panic(fmt.Sprintf("unknown op %q", op.Op))
	}
}
