// cnidriver drives CNI plugins through libcni, the library containerd and
// CRI-O use, so Tabby's conformance tests and benchmarks exercise the plugin
// exactly as a real runtime does (config injection, prevResult, result
// parsing, the result cache, GC of cached attachments and STATUS).
//
// It is a Go module of its own on github.com/containernetworking/cni v1.3.1
// (CNI spec up to 1.1.0), built by scripts/build-cnidriver.sh:
//
//	GOFLAGS=-mod=mod go build -o ../bin/cnidriver .
//
// Usage:
//
//	cnidriver add|check|del --conflist F --bin-dirs D1:D2 --cache-dir C \
//	    --netns PATH --container-id ID [--ifname eth0] [--args 'K=V;K2=V2'] \
//	    [--capability-args JSON]
//	cnidriver gc --conflist F --bin-dirs D --cache-dir C [--valid 'ID/IF,ID2/IF']
//	cnidriver status --conflist F --bin-dirs D --cache-dir C
//	cnidriver bench --conflist F --bin-dirs D --cache-dir C \
//	    --netns-pattern /run/netns/pod-%d --count N --concurrency K --id-prefix P
//
// add prints the result JSON (as parsed by libcni) on stdout. gc DELs every
// attachment in the cache that --valid does not name, then (cniVersion >=
// 1.1.0) sends GC with cni.dev/valid-attachments to every plugin. status sends
// STATUS to every plugin. Any failure exits non-zero with the error on stderr.
// bench ADDs then DELs N pods, K at a time, into netns that the caller
// created, and prints one JSON summary line per operation (latency
// percentiles and wall time).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

// options holds every flag of every sub-command.
type options struct {
	conflist       string
	binDirs        string
	cacheDir       string
	netns          string
	containerID    string
	ifname         string
	args           string
	capabilityArgs string
	valid          string // gc only
	// bench only
	netnsPattern string
	count        int
	concurrency  int
	idPrefix     string
	timeout      time.Duration
}

func main() {
	if len(os.Args) < 2 {
		fatalf("usage: cnidriver add|check|del|gc|status|bench [flags] (see the source header)")
	}
	cmd := os.Args[1]
	var o options
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	fs.StringVar(&o.conflist, "conflist", "", "network configuration list file")
	fs.StringVar(&o.binDirs, "bin-dirs", "/opt/cni/bin", "plugin directories, ':'-separated (becomes CNI_PATH)")
	fs.StringVar(&o.cacheDir, "cache-dir", "/var/lib/cni", "libcni result cache directory")
	fs.StringVar(&o.netns, "netns", "", "network namespace path (CNI_NETNS)")
	fs.StringVar(&o.containerID, "container-id", "", "container ID (CNI_CONTAINERID)")
	fs.StringVar(&o.ifname, "ifname", "eth0", "interface name (CNI_IFNAME)")
	fs.StringVar(&o.args, "args", "", "CNI_ARGS as 'K=V;K2=V2'")
	fs.StringVar(&o.capabilityArgs, "capability-args", "", "JSON object of capability args (runtimeConfig), e.g. portMappings")
	fs.StringVar(&o.valid, "valid", "", "gc: attachments still in use, as 'ID/IFNAME,ID2/IFNAME'")
	fs.StringVar(&o.netnsPattern, "netns-pattern", "", "bench: netns path with one %d for the pod index")
	fs.IntVar(&o.count, "count", 10, "bench: number of pods")
	fs.IntVar(&o.concurrency, "concurrency", 1, "bench: operations in flight at once")
	fs.StringVar(&o.idPrefix, "id-prefix", "bench", "bench: container ID prefix")
	fs.DurationVar(&o.timeout, "timeout", 60*time.Second, "timeout of one plugin-list operation")
	_ = fs.Parse(os.Args[2:])

	d, err := newDriver(o)
	if err != nil {
		fatalf("%v", err)
	}
	switch cmd {
	case "add", "check", "del":
		err = d.single(cmd, o)
	case "gc":
		err = d.gc(o)
	case "status":
		err = d.status(o)
	case "bench":
		err = d.bench(o)
	default:
		err = fmt.Errorf("unknown command %q (want add, check, del, gc, status or bench)", cmd)
	}
	if err != nil {
		fatalf("%v", err)
	}
}

func fatalf(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "cnidriver: "+format+"\n", a...)
	os.Exit(1)
}

// driver is one libcni configuration list plus the runtime around it.
type driver struct {
	list *libcni.NetworkConfigList
	cni  *libcni.CNIConfig
}

func newDriver(o options) (*driver, error) {
	if o.conflist == "" {
		return nil, errors.New("--conflist is required")
	}
	raw, err := os.ReadFile(o.conflist)
	if err != nil {
		return nil, fmt.Errorf("read conflist: %w", err)
	}
	list, err := libcni.ConfListFromBytes(raw)
	if err != nil {
		return nil, err
	}
	cni := libcni.NewCNIConfigWithCacheDir(strings.Split(o.binDirs, ":"), o.cacheDir, nil)
	return &driver{list: list, cni: cni}, nil
}

// runtimeConf builds libcni's per-attachment arguments.
func runtimeConf(o options, containerID, netns string) (*libcni.RuntimeConf, error) {
	rt := &libcni.RuntimeConf{ContainerID: containerID, NetNS: netns, IfName: o.ifname}
	if o.args != "" {
		for _, kv := range strings.Split(o.args, ";") {
			parts := strings.SplitN(kv, "=", 2)
			if len(parts) != 2 {
				return nil, fmt.Errorf("--args: %q is not K=V", kv)
			}
			rt.Args = append(rt.Args, [2]string{parts[0], parts[1]})
		}
	}
	if o.capabilityArgs != "" {
		if err := json.Unmarshal([]byte(o.capabilityArgs), &rt.CapabilityArgs); err != nil {
			return nil, fmt.Errorf("--capability-args: %w", err)
		}
	}
	return rt, nil
}

// single runs one ADD, CHECK or DEL of the whole list.
func (d *driver) single(cmd string, o options) error {
	if o.containerID == "" {
		return errors.New("--container-id is required")
	}
	rt, err := runtimeConf(o, o.containerID, o.netns)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	switch cmd {
	case "add":
		res, err := d.cni.AddNetworkList(ctx, d.list, rt)
		if err != nil {
			return err
		}
		return d.printResult(res)
	case "check":
		return d.cni.CheckNetworkList(ctx, d.list, rt)
	default:
		return d.cni.DelNetworkList(ctx, d.list, rt)
	}
}

// printResult prints the result as libcni parsed it.
func (d *driver) printResult(res types.Result) error {
	raw, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return err
	}
	fmt.Println(string(raw))
	return nil
}

// gc DELs the cached attachments of the list that --valid does not name and
// sends GC (1.1.0 and later) with the valid ones to every plugin.
func (d *driver) gc(o options) error {
	args := &libcni.GCArgs{ValidAttachments: []types.GCAttachment{}}
	if o.valid != "" {
		for _, a := range strings.Split(o.valid, ",") {
			id, ifname, ok := strings.Cut(a, "/")
			if !ok || id == "" || ifname == "" {
				return fmt.Errorf("--valid: %q is not ID/IFNAME", a)
			}
			args.ValidAttachments = append(args.ValidAttachments, types.GCAttachment{ContainerID: id, IfName: ifname})
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	return d.cni.GCNetworkList(ctx, d.list, args)
}

// status sends STATUS (1.1.0 and later) to every plugin of the list.
func (d *driver) status(o options) error {
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	return d.cni.GetStatusNetworkList(ctx, d.list)
}

// phase is the JSON summary of one bench operation over all pods.
type phase struct {
	Op          string  `json:"op"`
	Count       int     `json:"count"`
	Concurrency int     `json:"concurrency"`
	OK          int     `json:"ok"`
	Failed      int     `json:"failed"`
	WallMs      float64 `json:"wall_ms"`
	P50Ms       float64 `json:"p50_ms"`
	P90Ms       float64 `json:"p90_ms"`
	P99Ms       float64 `json:"p99_ms"`
	MaxMs       float64 `json:"max_ms"`
	FirstError  string  `json:"first_error,omitempty"`
}

// bench ADDs then DELs o.count pods, o.concurrency at a time.
func (d *driver) bench(o options) error {
	if !strings.Contains(o.netnsPattern, "%d") {
		return errors.New("--netns-pattern must contain %d")
	}
	if o.concurrency < 1 {
		o.concurrency = 1
	}
	failed := 0
	for _, op := range []string{"ADD", "DEL"} {
		p := d.runPhase(op, o)
		failed += p.Failed
		line, _ := json.Marshal(p)
		fmt.Println(string(line))
	}
	if failed > 0 {
		return fmt.Errorf("%d operations failed", failed)
	}
	return nil
}

func (d *driver) runPhase(op string, o options) phase {
	lat := make([]time.Duration, o.count)
	errs := make([]error, o.count)
	jobs := make(chan int)
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < o.concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				lat[i], errs[i] = d.benchOne(op, o, i)
			}
		}()
	}
	for i := 0; i < o.count; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	wall := time.Since(start)

	p := phase{Op: op, Count: o.count, Concurrency: o.concurrency, WallMs: ms(wall)}
	var ok []time.Duration
	for i, err := range errs {
		if err != nil {
			p.Failed++
			if p.FirstError == "" {
				p.FirstError = fmt.Sprintf("pod %d: %v", i, err)
			}
			continue
		}
		ok = append(ok, lat[i])
	}
	p.OK = len(ok)
	sort.Slice(ok, func(a, b int) bool { return ok[a] < ok[b] })
	p.P50Ms, p.P90Ms, p.P99Ms = ms(pct(ok, 50)), ms(pct(ok, 90)), ms(pct(ok, 99))
	if len(ok) > 0 {
		p.MaxMs = ms(ok[len(ok)-1])
	}
	return p
}

func (d *driver) benchOne(op string, o options, i int) (time.Duration, error) {
	id := fmt.Sprintf("%s-%d", o.idPrefix, i)
	rt, err := runtimeConf(o, id, fmt.Sprintf(o.netnsPattern, i))
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	start := time.Now()
	if op == "ADD" {
		_, err = d.cni.AddNetworkList(ctx, d.list, rt)
	} else {
		err = d.cni.DelNetworkList(ctx, d.list, rt)
	}
	return time.Since(start), err
}

// pct is the nearest-rank percentile of sorted durations.
func pct(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := (p*len(sorted) + 99) / 100
	if rank < 1 {
		rank = 1
	}
	return sorted[rank-1]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
