// Command h2floor is Go's own floor for SSE over HTTPS and HTTP/2: the least
// a net/http server does to push Redis pub/sub messages to event streams.
// bench/compare.sh measures caddy-sse and Nginx + Nchan against it.
//
// One goroutine reads the Redis subscription and hands each message, framed
// once as "data: <payload>\n\n", to every stream of its channel through a
// small channel per stream (a stream that falls that far behind is ended).
// A handler per stream (GET /sub/<channel>) writes and flushes what it is
// handed. TLS with a self-signed ECDSA P-256 certificate made at start (or
// -cert and -key); net/http negotiates HTTP/2. No logging, no metrics, no
// keepalives, no history: anything a real server does costs more.
// -pprof serves the profiles on a listener of their own.
//
//	h2floor -listen 127.0.0.1:8443 -redis 127.0.0.1:6379
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"flag"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// queueLen is each stream's channel: frames the reader may be ahead of it.
const queueLen = 16

// hub maps channels to their streams and subscribes a channel in Redis
// while it has streams.
type hub struct {
	ps   *redis.PubSub
	mu   sync.Mutex
	subs map[string]map[*stream]struct{}
}

type stream struct {
	frames chan []byte
	gone   chan struct{} // closed by the reader when the stream fell behind
	once   sync.Once
}

func (h *hub) attach(ctx context.Context, ch string, s *stream) error {
	h.mu.Lock()
	set := h.subs[ch]
	first := set == nil
	if first {
		set = map[*stream]struct{}{}
		h.subs[ch] = set
	}
	set[s] = struct{}{}
	h.mu.Unlock()
	if first {
		return h.ps.Subscribe(ctx, ch)
	}
	return nil
}

func (h *hub) detach(ch string, s *stream) {
	h.mu.Lock()
	set := h.subs[ch]
	delete(set, s)
	last := len(set) == 0
	if last {
		delete(h.subs, ch)
	}
	h.mu.Unlock()
	if last {
		_ = h.ps.Unsubscribe(context.Background(), ch)
	}
}

// read is the one Redis reader: it frames each message once and hands it
// to the channel's streams without blocking.
func (h *hub) read(ctx context.Context) {
	for {
		msg, err := h.ps.ReceiveMessage(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Printf("redis: %v", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		frame := make([]byte, 0, len(msg.Payload)+8)
		frame = append(frame, "data: "...)
		frame = append(frame, msg.Payload...)
		frame = append(frame, "\n\n"...)
		h.mu.Lock()
		for s := range h.subs[msg.Channel] {
			select {
			case s.frames <- frame:
			default:
				s.once.Do(func() { close(s.gone) })
			}
		}
		h.mu.Unlock()
	}
}

func (h *hub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ch, ok := strings.CutPrefix(r.URL.Path, "/sub/")
	if !ok || ch == "" || r.Method != http.MethodGet {
		http.NotFound(w, r)
		return
	}
	s := &stream{frames: make(chan []byte, queueLen), gone: make(chan struct{})}
	if err := h.attach(r.Context(), ch, s); err != nil {
		h.detach(ch, s)
		http.Error(w, "redis: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	defer h.detach(ch, s)
	hd := w.Header()
	hd.Set("Content-Type", "text/event-stream; charset=utf-8")
	hd.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if _, err := w.Write([]byte(":\n")); err != nil || rc.Flush() != nil {
		return
	}
	for {
		select {
		case f := <-s.frames:
			if _, err := w.Write(f); err != nil {
				return
			}
			// Whatever else is queued goes out with the same flush.
			for more := true; more; {
				select {
				case f := <-s.frames:
					if _, err := w.Write(f); err != nil {
						return
					}
				default:
					more = false
				}
			}
			if rc.Flush() != nil {
				return
			}
		case <-s.gone:
			return
		case <-r.Context().Done():
			return
		}
	}
}

// selfSigned makes an ECDSA P-256 certificate for 127.0.0.1 and localhost,
// the key type Caddy's internal CA issues.
func selfSigned() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "h2floor"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8443", "HTTPS address")
	redisAddr := flag.String("redis", "127.0.0.1:6379", "Redis address")
	certFile := flag.String("cert", "", "PEM certificate (default: a self-signed one made at start)")
	keyFile := flag.String("key", "", "PEM key of -cert")
	pprofAddr := flag.String("pprof", "", "serve /debug/pprof/ over plain HTTP at this address (default: off)")
	flag.Parse()

	if *pprofAddr != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		go func() { log.Print(http.ListenAndServe(*pprofAddr, mux)) }()
	}

	var cert tls.Certificate
	var err error
	if *certFile != "" {
		cert, err = tls.LoadX509KeyPair(*certFile, *keyFile)
	} else {
		cert, err = selfSigned()
	}
	if err != nil {
		log.Fatal(err)
	}
	ctx := context.Background()
	rdb := redis.NewClient(&redis.Options{Addr: *redisAddr})
	if err := rdb.Ping(ctx).Err(); err != nil {
		log.Fatal(err)
	}
	h := &hub{ps: rdb.Subscribe(ctx), subs: map[string]map[*stream]struct{}{}}
	go h.read(ctx)

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{
		Handler:           h,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}},
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          log.New(discard{}, "", 0),
	}
	log.Printf("h2floor: https://%s/sub/<channel>, Redis %s", ln.Addr(), *redisAddr)
	log.Fatal(srv.ServeTLS(ln, "", ""))
}

// discard drops net/http's error log (TLS handshakes cut by the load tool).
type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }
