package pgtest

import (
	"fmt"
	"io"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// Proxy forwards TCP connections to a PostgreSQL server's unix socket, and
// breaks them as networks do: DropAll closes them, Freeze leaves them open
// and silent (a half-open connection: what either side sends is lost, and
// neither is told).
type Proxy struct {
	ln     net.Listener
	target atomic.Value // string: the server's unix socket
	mu     sync.Mutex
	pipes  []*pipe
}

// pipe is one client connection and its connection to the server.
type pipe struct {
	client, server net.Conn
	frozen         atomic.Bool
}

// NewProxy listens on a loopback port; it stops, and closes every
// connection, when the test ends. SetTarget says where to.
func NewProxy(tb testing.TB) *Proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	p := &Proxy{ln: ln}
	tb.Cleanup(func() { ln.Close(); p.DropAll() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.serve(c)
		}
	}()
	return p
}

// SetTarget makes new connections go to the server of dsn (a unix socket
// host, as pgcluster's and NewDB's DSNs have).
func (p *Proxy) SetTarget(tb testing.TB, dsn string) {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		tb.Fatal(err)
	}
	p.target.Store(filepath.Join(cfg.Host, fmt.Sprintf(".s.PGSQL.%d", cfg.Port)))
}

// DSN is dsn's user and database through the proxy.
func (p *Proxy) DSN(tb testing.TB, dsn string) string {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		tb.Fatal(err)
	}
	a := p.ln.Addr().(*net.TCPAddr)
	return fmt.Sprintf("host=127.0.0.1 port=%d user=%s dbname=%s sslmode=disable", a.Port, cfg.User, cfg.Database)
}

func (p *Proxy) serve(c net.Conn) {
	target, _ := p.target.Load().(string)
	up, err := net.Dial("unix", target)
	if err != nil {
		c.Close()
		return
	}
	pp := &pipe{client: c, server: up}
	p.mu.Lock()
	p.pipes = append(p.pipes, pp)
	p.mu.Unlock()
	go func() { pp.copy(up, c); up.Close() }()
	pp.copy(c, up)
	c.Close()
}

// copy forwards src to dst until src ends; once the pipe is frozen it reads
// and drops.
func (pp *pipe) copy(dst io.Writer, src io.Reader) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !pp.frozen.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// DropAll closes every connection made so far.
func (p *Proxy) DropAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, pp := range p.pipes {
		pp.client.Close()
		pp.server.Close()
	}
	p.pipes = nil
}

// Freeze makes every connection made so far half-open: open, and silent
// both ways. Connections made later forward as before.
func (p *Proxy) Freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, pp := range p.pipes {
		pp.frozen.Store(true)
	}
}
