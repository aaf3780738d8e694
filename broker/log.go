package broker

import (
	"context"
	"log/slog"
)

// mochiHandler is the slog.Handler given to mochi. It passes warnings and
// errors only, drops the lines the broker reports better itself, strips
// packet dumps (they would carry payloads, and provisioning answers hold
// secrets, into the log and let any client write kilobytes per line), and
// bounds the rate: several of mochi's warnings fire once per client or packet.
type mochiHandler struct {
	h   slog.Handler
	lim *logLimiter
}

func newMochiHandler(h slog.Handler) mochiHandler {
	return mochiHandler{h: h, lim: newLogLimiter(10, 50)}
}

// mochiDropped are mochi messages that duplicate the broker's own reporting.
var mochiDropped = map[string]bool{
	"":                     true, // listener: a connection ended with an error (counted as a disconnect or refusal)
	"publish packet error": true, // OnPublish's negative PUBACK for oversize payloads (counted as too_large)
}

// mochiPacketKeys name the attributes in which mochi logs whole packets.
var mochiPacketKeys = map[string]bool{"pk": true, "packet": true, "will": true}

func (m mochiHandler) Enabled(ctx context.Context, level slog.Level) bool {
	return level >= slog.LevelWarn && m.h.Enabled(ctx, level)
}

func (m mochiHandler) Handle(ctx context.Context, r slog.Record) error {
	if mochiDropped[r.Message] {
		return nil
	}
	ok, suppressed := m.lim.allow(r.Time)
	if !ok {
		return nil
	}
	out := slog.NewRecord(r.Time, r.Level, r.Message, r.PC)
	if suppressed > 0 {
		out.AddAttrs(slog.Int64("suppressed", suppressed))
	}
	r.Attrs(func(a slog.Attr) bool {
		if !mochiPacketKeys[a.Key] {
			out.AddAttrs(a)
		}
		return true
	})
	return m.h.Handle(ctx, out)
}

func (m mochiHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	kept := make([]slog.Attr, 0, len(attrs))
	for _, a := range attrs {
		if !mochiPacketKeys[a.Key] {
			kept = append(kept, a)
		}
	}
	return mochiHandler{h: m.h.WithAttrs(kept), lim: m.lim}
}

func (m mochiHandler) WithGroup(name string) slog.Handler {
	return mochiHandler{h: m.h.WithGroup(name), lim: m.lim}
}
