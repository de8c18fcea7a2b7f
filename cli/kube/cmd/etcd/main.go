// Command etcd runs a single-member etcd server from go.etcd.io/etcd/server/v3/embed, with just the
// flags a one-machine Kubernetes control plane needs. It stops cleanly on SIGTERM or SIGINT.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/api/v3/version"
	"go.etcd.io/etcd/server/v3/embed"
)

func urls(flagName, list string) []url.URL {
	var out []url.URL
	for _, s := range strings.Split(list, ",") {
		u, err := url.Parse(strings.TrimSpace(s))
		if err != nil || u.Host == "" {
			log.Fatalf("etcd: --%s: bad URL %q", flagName, s)
		}
		out = append(out, *u)
	}
	return out
}

func main() {
	dataDir := flag.String("data-dir", "default.etcd", "directory for the etcd data")
	name := flag.String("name", "default", "member name")
	listenClient := flag.String("listen-client-urls", "http://127.0.0.1:2379", "comma-separated URLs to serve clients on")
	advertiseClient := flag.String("advertise-client-urls", "", "comma-separated client URLs to advertise (default: --listen-client-urls)")
	listenPeer := flag.String("listen-peer-urls", "http://127.0.0.1:2380", "comma-separated URLs to serve peers on (also advertised)")
	logLevel := flag.String("log-level", "warn", "debug, info, warn, error, panic or fatal")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Printf("etcd Version: %s\nGo Version: %s\nGo OS/Arch: %s/%s\n", version.Version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		return
	}
	if *advertiseClient == "" {
		*advertiseClient = *listenClient
	}

	cfg := embed.NewConfig()
	cfg.Name, cfg.Dir, cfg.LogLevel = *name, *dataDir, *logLevel
	cfg.ListenClientUrls = urls("listen-client-urls", *listenClient)
	cfg.AdvertiseClientUrls = urls("advertise-client-urls", *advertiseClient)
	cfg.ListenPeerUrls = urls("listen-peer-urls", *listenPeer)
	cfg.AdvertisePeerUrls = cfg.ListenPeerUrls
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		log.Fatalf("etcd: start: %v", err)
	}
	select {
	case <-e.Server.ReadyNotify():
		log.Printf("etcd %s ready, serving clients on %s", version.Version, *listenClient)
	case <-time.After(60 * time.Second):
		e.Server.Stop()
		log.Fatal("etcd: not ready after 60s")
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case s := <-sig:
		log.Printf("etcd: %v, shutting down", s)
		e.Close()
	case err := <-e.Err():
		e.Close()
		log.Fatalf("etcd: %v", err)
	}
}
