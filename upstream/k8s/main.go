// Command kube is a multi-call binary of the Kubernetes components Tabby's
// tests and lab run (like the old hyperkube): it links them once and
// dispatches on the name it was called by (a symlink named kube-apiserver,
// kubelet, ...), or else on its first argument (`kube kubelet --version`).
// Each branch does what k8s.io/kubernetes/cmd/<name>/<name>.go does.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	_ "time/tzdata" // for timeZone support in CronJob (kube-apiserver, kube-controller-manager)

	"github.com/spf13/cobra"

	_ "k8s.io/client-go/plugin/pkg/client/auth" // kubectl: client auth plugins
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"

	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

// servers are the components whose main is `os.Exit(cli.Run(command))`.
var servers = map[string]func() *cobra.Command{
	"kube-apiserver":          apiserver.NewAPIServerCommand,
	"kube-controller-manager": controllermanager.NewControllerManagerCommand,
	"kube-scheduler":          func() *cobra.Command { return scheduler.NewSchedulerCommand() },
	"kubelet":                 func() *cobra.Command { return kubelet.NewKubeletCommand(context.Background()) },
	"kube-proxy":              proxy.NewProxyCommand,
}

func names() []string {
	n := []string{"kubectl"}
	for k := range servers {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

func main() {
	name := strings.TrimSuffix(filepath.Base(os.Args[0]), ".exe")
	if !known(name) && len(os.Args) > 1 && known(os.Args[1]) {
		name = os.Args[1]
		os.Args = os.Args[1:]
		os.Args[0] = name
	}
	if name == "kubectl" {
		runKubectl()
		return
	}
	newCommand, ok := servers[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "usage: %s COMPONENT [ARGS...], or call it by a symlink named COMPONENT\ncomponents: %s\n",
			filepath.Base(os.Args[0]), strings.Join(names(), ", "))
		os.Exit(2)
	}
	os.Exit(cli.Run(newCommand()))
}

func known(name string) bool {
	_, ok := servers[name]
	return ok || name == "kubectl"
}

// runKubectl is k8s.io/kubernetes/cmd/kubectl/kubectl.go.
func runKubectl() {
	logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) // nolint:errcheck
	command := kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err)
	}
}
