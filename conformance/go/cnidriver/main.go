// cnidriver drives CNI plugins through libcni, the library containerd and
// CRI-O use, so Tabby's conformance tests and benchmarks exercise the plugin
// exactly as a real runtime does (config injection, prevResult, result
// parsing and the result cache).
//
// It is built offline in GOPATH mode against Debian's
// golang-github-appc-cni-dev (libcni 1.1.2):
//
//	GO111MODULE=off GOPATH=DIR:/usr/share/gocode go build -o bin/cnidriver ./cnidriver
//
// Usage:
//
//	cnidriver add|check|del --conflist F --bin-dirs D1:D2 --cache-dir C \
//	    --netns PATH --container-id ID [--ifname eth0] [--args 'K=V;K2=V2'] \
//	    [--capability-args JSON]
//	cnidriver bench --conflist F --bin-dirs D --cache-dir C \
//	    --netns-pattern /run/netns/pod-%d --count N --concurrency K --id-prefix P
//
// add prints the result JSON (as parsed by libcni) on stdout. Any failure
// exits non-zero with the error on stderr. bench ADDs then DELs N pods, K at a
// time, into netns that the caller created, and prints one JSON summary line
// per operation (latency percentiles and wall time).
//
// libcni 1.1.2 implements CNI spec 1.0.0 and rejects "1.1.0" results. For a
// 1.1.0 config the driver keeps libcni's bookkeeping at 1.0.0 and its exec
// adapter (spec11Exec) gives the plugin the config and prevResult labelled
// "1.1.0", checks that the plugin answers "1.1.0", and relabels the answer for
// libcni. A 1.1.0 ADD result has the same schema as a 1.0.0 one, so libcni
// still parses every field.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/ioutil"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
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
	// bench only
	netnsPattern string
	count        int
	concurrency  int
	idPrefix     string
	timeout      time.Duration
}

func main() {
	if len(os.Args) < 2 {
		fatalf("usage: cnidriver add|check|del|bench [flags] (see the source header)")
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
	case "bench":
		err = d.bench(o)
	default:
		err = fmt.Errorf("unknown command %q (want add, check, del or bench)", cmd)
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
	list      *libcni.NetworkConfigList
	cni       *libcni.CNIConfig
	requested string // cniVersion the config asked for
}

func newDriver(o options) (*driver, error) {
	if o.conflist == "" {
		return nil, errors.New("--conflist is required")
	}
	raw, err := ioutil.ReadFile(o.conflist)
	if err != nil {
		return nil, fmt.Errorf("read conflist: %w", err)
	}
	list, err := libcni.ConfListFromBytes(raw)
	if err != nil {
		return nil, err
	}
	d := &driver{list: list, requested: list.CNIVersion}
	var exec invoke.Exec
	if list.CNIVersion == "1.1.0" {
		list.CNIVersion = "1.0.0"
		exec = &spec11Exec{inner: &invoke.DefaultExec{
			RawExec:       &invoke.RawExec{Stderr: os.Stderr},
			PluginDecoder: version.PluginDecoder{},
		}}
	}
	d.cni = libcni.NewCNIConfigWithCacheDir(strings.Split(o.binDirs, ":"), o.cacheDir, exec)
	return d, nil
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

// printResult prints the libcni-parsed result, labelled with the version the
// config asked for (see spec11Exec for 1.1.0).
func (d *driver) printResult(res types.Result) error {
	raw, err := json.Marshal(res)
	if err != nil {
		return err
	}
	var m map[string]interface{}
	if err := json.Unmarshal(raw, &m); err != nil {
		return err
	}
	if d.requested == "1.1.0" {
		m["cniVersion"] = "1.1.0"
	}
	out, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	fmt.Println(string(out))
	return nil
}

// spec11Exec lets libcni 1.1.2 drive a plugin in CNI spec 1.1.0: plugins see
// "1.1.0" in the config and in prevResult, their answers must say "1.1.0",
// and libcni sees "1.0.0" (same result schema).
type spec11Exec struct {
	inner invoke.Exec
}

func (e *spec11Exec) ExecPlugin(ctx context.Context, path string, stdin []byte, environ []string) ([]byte, error) {
	if envValue(environ, "CNI_COMMAND") == "VERSION" {
		return e.inner.ExecPlugin(ctx, path, stdin, environ)
	}
	conf, err := relabel(stdin, "1.0.0", "1.1.0", true)
	if err != nil {
		return nil, fmt.Errorf("spec 1.1.0 adapter: config: %w", err)
	}
	out, err := e.inner.ExecPlugin(ctx, path, conf, environ)
	if err != nil || len(strings.TrimSpace(string(out))) == 0 {
		return out, err
	}
	var head struct {
		CNIVersion string `json:"cniVersion"`
	}
	if err := json.Unmarshal(out, &head); err != nil {
		return nil, fmt.Errorf("spec 1.1.0 adapter: plugin output is not JSON: %w", err)
	}
	if head.CNIVersion != "1.1.0" {
		return nil, fmt.Errorf("plugin %s answered a 1.1.0 config with a %q result", path, head.CNIVersion)
	}
	return relabel(out, "1.1.0", "1.0.0", false)
}

func (e *spec11Exec) FindInPath(plugin string, paths []string) (string, error) {
	return e.inner.FindInPath(plugin, paths)
}

func (e *spec11Exec) Decode(b []byte) (version.PluginInfo, error) { return e.inner.Decode(b) }

// relabel rewrites cniVersion from -> to at the top level (and in prevResult
// when withPrev is set) of a JSON object.
func relabel(doc []byte, from, to string, withPrev bool) ([]byte, error) {
	var m map[string]interface{}
	if err := json.Unmarshal(doc, &m); err != nil {
		return nil, err
	}
	if m["cniVersion"] == from {
		m["cniVersion"] = to
	}
	if prev, ok := m["prevResult"].(map[string]interface{}); ok && withPrev && prev["cniVersion"] == from {
		prev["cniVersion"] = to
	}
	return json.Marshal(m)
}

func envValue(environ []string, key string) string {
	for _, kv := range environ {
		if strings.HasPrefix(kv, key+"=") {
			return kv[len(key)+1:]
		}
	}
	return ""
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
