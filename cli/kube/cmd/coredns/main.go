// Command coredns is CoreDNS with its standard plugin set (the same main as upstream's coredns.go).
package main

import (
	_ "github.com/coredns/coredns/core/plugin" // registers every in-tree plugin, kubernetes included
	"github.com/coredns/coredns/coremain"
)

func main() {
	coremain.Run()
}
