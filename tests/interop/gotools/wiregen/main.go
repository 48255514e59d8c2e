// Command wiregen writes the golden wire fixtures of tests/data/wire/: one file per
// representative Packet, each the bytes that upstream's generated Go code
// (konnectivity-client v0.36.0, package proto/client, marshalled with
// google.golang.org/protobuf) produces for it, and one file of gRPC-framed messages
// (5-byte prefix each) as a Proxy stream carries them.
//
// Invariant: the output is a pure function of this file (deterministic marshalling, fixed
// field values), so running it again rewrites the same bytes.
package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"google.golang.org/protobuf/proto"

	"sigs.k8s.io/apiserver-network-proxy/konnectivity-client/proto/client"
)

// fixture is one packet and the file it goes to.
type fixture struct {
	name   string
	packet *client.Packet
}

func fixtures() []fixture {
	payload := make([]byte, 300)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	return []fixture{
		{"dial_req", &client.Packet{Type: client.PacketType_DIAL_REQ,
			Payload: &client.Packet_DialRequest{DialRequest: &client.DialRequest{
				Protocol: "tcp", Address: "10.96.0.1:443", Random: 8674665223082153551}}}},
		{"dial_req_ipv6", &client.Packet{Type: client.PacketType_DIAL_REQ,
			Payload: &client.Packet_DialRequest{DialRequest: &client.DialRequest{
				Protocol: "tcp", Address: "[fd00::1]:10250", Random: 1}}}},
		{"dial_rsp", &client.Packet{Type: client.PacketType_DIAL_RSP,
			Payload: &client.Packet_DialResponse{DialResponse: &client.DialResponse{
				ConnectID: 1, Random: 8674665223082153551}}}},
		{"dial_rsp_error", &client.Packet{Type: client.PacketType_DIAL_RSP,
			Payload: &client.Packet_DialResponse{DialResponse: &client.DialResponse{
				Error:  "dial tcp 127.0.0.1:1: connect: connection refused",
				Random: -5}}}},
		{"close_req", &client.Packet{Type: client.PacketType_CLOSE_REQ,
			Payload: &client.Packet_CloseRequest{CloseRequest: &client.CloseRequest{
				ConnectID: 42}}}},
		{"close_rsp", &client.Packet{Type: client.PacketType_CLOSE_RSP,
			Payload: &client.Packet_CloseResponse{CloseResponse: &client.CloseResponse{
				ConnectID: 42}}}},
		{"close_rsp_error", &client.Packet{Type: client.PacketType_CLOSE_RSP,
			Payload: &client.Packet_CloseResponse{CloseResponse: &client.CloseResponse{
				Error: "connection not found", ConnectID: 1 << 40}}}},
		{"data", &client.Packet{Type: client.PacketType_DATA,
			Payload: &client.Packet_Data{Data: &client.Data{ConnectID: 3, Data: payload}}}},
		{"data_error", &client.Packet{Type: client.PacketType_DATA,
			Payload: &client.Packet_Data{Data: &client.Data{ConnectID: 3, Error: "EOF"}}}},
		{"data_empty", &client.Packet{Type: client.PacketType_DATA,
			Payload: &client.Packet_Data{Data: &client.Data{ConnectID: 3}}}},
		{"dial_cls", &client.Packet{Type: client.PacketType_DIAL_CLS,
			Payload: &client.Packet_CloseDial{CloseDial: &client.CloseDial{
				Random: -8674665223082153551}}}},
		{"drain", &client.Packet{Type: client.PacketType_DRAIN,
			Payload: &client.Packet_Drain{Drain: &client.Drain{}}}},
	}
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: wiregen OUTPUT-FOLDER")
		os.Exit(2)
	}
	out := os.Args[1]
	if err := os.MkdirAll(out, 0o755); err != nil {
		fail(err)
	}
	opts := proto.MarshalOptions{Deterministic: true}
	var stream bytes.Buffer
	var names []string
	for _, f := range fixtures() {
		b, err := opts.Marshal(f.packet)
		if err != nil {
			fail(err)
		}
		if err := os.WriteFile(filepath.Join(out, f.name+".bin"), b, 0o644); err != nil {
			fail(err)
		}
		// gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length.
		var prefix [5]byte
		binary.BigEndian.PutUint32(prefix[1:], uint32(len(b)))
		stream.Write(prefix[:])
		stream.Write(b)
		names = append(names, f.name)
	}
	if err := os.WriteFile(filepath.Join(out, "stream.grpc"), stream.Bytes(), 0o644); err != nil {
		fail(err)
	}
	// The order of the messages in stream.grpc, for the tests.
	order := strings.Join(names, "\n") + "\n"
	if err := os.WriteFile(filepath.Join(out, "stream.order"), []byte(order), 0o644); err != nil {
		fail(err)
	}
	sort.Strings(names)
	fmt.Println(strings.Join(names, " "))
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "wiregen:", err)
	os.Exit(1)
}
