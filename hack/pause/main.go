// The sandbox ("pause") container of a real node's pods: it holds the pod's namespaces open and
// reaps zombie processes until it is told to stop. Kubernetes' own is registry.k8s.io/pause,
// which cannot be pulled where no registry is reachable, so `hack/tools.sh pause` builds this
// one (static, no libc) and `edgellm dev up --real-node` imports it as containerd's sandbox image.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if os.Getpid() != 1 {
		os.Stderr.WriteString("pause: to be run as a container's first process\n")
	}
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for { // reap every child that has exited, as PID 1 must
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
