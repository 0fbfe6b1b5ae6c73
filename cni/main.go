// stockade-cni is the last plugin of a node's CNI conflist. It is a relay with no policy of its
// own: it passes ADD, CHECK and DEL, with the pod's identity (CNI_ARGS), its network namespace
// and the whole network configuration (the previous plugin's result included), to the stockade
// agent over the agent's unix socket, waits for the agent's answer, and on ADD prints the
// previous result unchanged. Every decision (which host-side veth is the pod's, pending or not,
// how long to wait) is the agent's; docs/install.md describes each failure mode.
//
// The request is one JSON object per connection, terminated by a newline:
//
//	{"command": "ADD", "containerID": ..., "netns": ..., "ifName": ..., "args": ...,
//	 "config": <the network configuration as received on stdin>}
//
// and the answer one JSON object: {"ok": true} or {"ok": false, "error": "..."}.
//
// Configuration keys (besides the standard ones): "socket", the agent's socket (default
// /run/stockade/cni.sock); "failOpen", what ADD does when the agent cannot be reached: false
// (the default) fails the ADD, so the runtime retries the pod later and it never runs
// unenforced; true lets the pod start, and the agent's interface watch puts it in the pending
// state when the agent comes back.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

const (
	defaultSocket = "/run/stockade/cni.sock"
	// The agent answers within its own budget (2 s by default); this only bounds a hung agent.
	answerTimeout = 60 * time.Second
)

type netConf struct {
	types.PluginConf
	Socket   string `json:"socket,omitempty"`
	FailOpen bool   `json:"failOpen,omitempty"`
}

type request struct {
	Command     string          `json:"command"`
	ContainerID string          `json:"containerID"`
	Netns       string          `json:"netns"`
	IfName      string          `json:"ifName"`
	Args        string          `json:"args"`
	Config      json.RawMessage `json:"config"`
}

type answer struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// errUnreachable: the agent's socket could not be reached at all (as opposed to an answer
// that says no).
var errUnreachable = errors.New("the stockade agent is unreachable")

func parse(args *skel.CmdArgs) (*netConf, error) {
	conf := &netConf{}
	if err := json.Unmarshal(args.StdinData, conf); err != nil {
		return nil, fmt.Errorf("stockade-cni: bad network configuration: %w", err)
	}
	if conf.Socket == "" {
		conf.Socket = defaultSocket
	}
	return conf, nil
}

func relay(command string, conf *netConf, args *skel.CmdArgs) error {
	conn, err := net.DialTimeout("unix", conf.Socket, 5*time.Second)
	if err != nil {
		return fmt.Errorf("%w at %s: %v", errUnreachable, conf.Socket, err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(answerTimeout)); err != nil {
		return err
	}
	body, err := json.Marshal(request{
		Command: command, ContainerID: args.ContainerID, Netns: args.Netns,
		IfName: args.IfName, Args: args.Args, Config: args.StdinData,
	})
	if err != nil {
		return err
	}
	if _, err := conn.Write(append(body, '\n')); err != nil {
		return fmt.Errorf("%w at %s: %v", errUnreachable, conf.Socket, err)
	}
	line, err := bufio.NewReader(conn).ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("stockade-cni: no answer from the agent at %s: %v", conf.Socket, err)
	}
	var got answer
	if err := json.Unmarshal(line, &got); err != nil {
		return fmt.Errorf("stockade-cni: bad answer from the agent: %v", err)
	}
	if !got.OK {
		return fmt.Errorf("stockade-cni: the agent refused %s: %s", command, got.Error)
	}
	return nil
}

func cmdAdd(args *skel.CmdArgs) error {
	conf, err := parse(args)
	if err != nil {
		return err
	}
	if conf.RawPrevResult == nil {
		return fmt.Errorf("stockade-cni: no prevResult: it must be chained after the pod's network plugin")
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return fmt.Errorf("stockade-cni: bad prevResult: %w", err)
	}
	if err := relay("ADD", conf, args); err != nil && !(conf.FailOpen && errors.Is(err, errUnreachable)) {
		return err
	}
	return types.PrintResult(conf.PrevResult, conf.CNIVersion)
}

func cmdCheck(args *skel.CmdArgs) error {
	conf, err := parse(args)
	if err != nil {
		return err
	}
	return relay("CHECK", conf, args)
}

// cmdDel never fails for an unreachable agent: DEL must be idempotent and may come after the
// agent is gone; the agent detaches what belongs to no pod on its next sync.
func cmdDel(args *skel.CmdArgs) error {
	conf, err := parse(args)
	if err != nil {
		return err
	}
	if err := relay("DEL", conf, args); err != nil && !errors.Is(err, errUnreachable) {
		return err
	}
	return nil
}

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{Add: cmdAdd, Check: cmdCheck, Del: cmdDel},
		version.All, "stockade-cni: relays CNI ADD, CHECK and DEL to the stockade agent")
}
