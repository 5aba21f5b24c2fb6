package broker

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

// rediss:// works end to end: the broker wraps the dialer of the
// subscription connection, TLS included.
func TestTLS(t *testing.T) {
	dir := t.TempDir()
	certPEM, keyPEM := selfSigned(t)
	cert, key := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(cert, certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(key, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	srv := redistest.Start(t, "--tls-port", strconv.Itoa(port), "--tls-cert-file", cert,
		"--tls-key-file", key, "--tls-auth-clients", "no")

	opts := parsedURL(t, "rediss://127.0.0.1:"+strconv.Itoa(port))
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(certPEM)
	opts.TLSConfig.RootCAs = roots
	rec := newRecorder()
	// No health check PING during the test: only the subscription
	// connection's own traffic may move the byte counter.
	b := startBroker(t, Options{Redis: opts, HealthCheck: time.Hour}, rec)
	ctx := ctxT(t)
	if err := b.Subscribe(ctx, "tls"); err != nil {
		t.Fatal(err)
	}
	seq, err := b.Publish(ctx, "tls", []byte("secret"), keep)
	if err != nil {
		t.Fatal(err)
	}
	if m := rec.waitMessages(t, 1)[0]; m.Seq != seq || string(m.Payload) != "secret" {
		t.Fatalf("got %+v", m)
	}
	if n := numsub(t, srv.Client(), "tls"); n != 1 {
		t.Fatalf("NUMSUB tls = %d", n)
	}
	// The watchdog counts the subscription connection's bytes, not the
	// pool's: replies to other commands must not hide a dead subscription.
	before := b.rx.Load()
	if before == 0 {
		t.Fatal("no bytes counted on the subscription connection")
	}
	for range 20 {
		if _, err := b.Replay(ctx, []string{"tls"}, 0); err != nil {
			t.Fatal(err)
		}
	}
	if after := b.rx.Load(); after != before {
		t.Fatalf("pool traffic counted as subscription traffic: %d -> %d bytes", before, after)
	}
}

func selfSigned(t *testing.T) (certPEM, keyPEM []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "redistest"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}
