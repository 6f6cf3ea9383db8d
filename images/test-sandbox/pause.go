// The sandbox ("pause") process of the test node's pods: it holds the pod's namespaces and
// does nothing else until the runtime stops it. Built as a static binary by
// tests/servers/cluster/images.py into the local image psft-test/sandbox; it is ours, so the
// tests need neither a registry nor registry.k8s.io/pause.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	children := make(chan os.Signal, 8)
	signal.Notify(children, syscall.SIGCHLD)
	for {
		select {
		case <-signals:
			os.Exit(0)
		case <-children:
			// PID 1 of the pod: reap whatever was re-parented to us
			for {
				var status syscall.WaitStatus
				pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
		}
	}
}
