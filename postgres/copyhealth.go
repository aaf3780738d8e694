package postgres

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/lockergate/lockergate/fleet"
)

// copyHealthSQL is the COPY that copyHealth's data is for.
const copyHealthSQL = `COPY health (device_id, received_at, ts, seq, body) FROM STDIN BINARY`

// beginCopyHealthSQL opens a transaction and starts the same COPY in one
// round trip.
const beginCopyHealthSQL = "BEGIN; " + copyHealthSQL

// copyBufs holds copyHealth's buffers between batches.
var copyBufs = sync.Pool{New: func() any { return new([]byte) }}

// maxKeptCopyBuf bounds a buffer copyHealth gives back to copyBufs: an
// unusually large batch does not pin its buffer.
const maxKeptCopyBuf = 4 << 20

// copyHealth stores batch in the health table with one COPY, its rows
// encoded here in PostgreSQL's binary COPY format into a reused buffer.
// pgx's CopyFrom does the same with an encoder per value (an allocation for
// most) and a buffer it grows from scratch for every COPY: together a third
// of what the gateway allocated in health ingest.
//
// sql is copyHealthSQL, alone or after other statements of the same
// simple query (pgconn sends the data without waiting for the COPY to start).
func copyHealth(ctx context.Context, pc *pgconn.PgConn, sql string, batch []fleet.HealthRecord) error {
	p := copyBufs.Get().(*[]byte)
	b, err := appendHealthCopy((*p)[:0], batch)
	if err == nil {
		_, err = pc.CopyFrom(ctx, bytes.NewReader(b), sql)
	}
	if cap(b) <= maxKeptCopyBuf {
		*p = b
		copyBufs.Put(p)
	}
	return err
}

// appendHealthCopy appends batch to b as binary COPY data (header, one
// tuple per record, trailer) for the columns of copyHealthSQL.
func appendHealthCopy(b []byte, batch []fleet.HealthRecord) ([]byte, error) {
	// The exact size, so that a buffer the pool lost (it is emptied by
	// collections) is allocated once, not grown.
	n := 11 + 4 + 4 + 2
	for i := range batch {
		n += 2 + 4 + len(batch[i].DeviceID) + 3*(4+8) + 4 + len(batch[i].Body)
	}
	b = slices.Grow(b, n)
	b = append(b, "PGCOPY\n\xff\r\n\x00"...)
	b = binary.BigEndian.AppendUint32(b, 0) // flags
	b = binary.BigEndian.AppendUint32(b, 0) // header extension length
	for i := range batch {
		h := &batch[i]
		if len(h.Body) == 0 {
			return nil, fmt.Errorf("health of %s seq %d: empty body", h.DeviceID, h.Seq)
		}
		b = binary.BigEndian.AppendUint16(b, 5) // fields
		b = appendField(b, h.DeviceID)
		b = appendTimestamptz(b, h.ReceivedAt)
		b = appendTimestamptz(b, h.TS)
		b = binary.BigEndian.AppendUint32(b, 8)
		b = binary.BigEndian.AppendUint64(b, uint64(h.Seq))
		b = appendField(b, h.Body) // json's binary form is its text
	}
	return binary.BigEndian.AppendUint16(b, math.MaxUint16), nil // trailer: -1
}

func appendField[T ~string | ~[]byte](b []byte, v T) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
	return append(b, v...)
}

// y2k is PostgreSQL's timestamp epoch, 2000-01-01 UTC, in microseconds
// since the Unix epoch.
const y2k = 946684800 * 1000000

// appendTimestamptz appends t as a binary timestamptz: microseconds since
// 2000-01-01 UTC, truncated, as pgx encodes it.
func appendTimestamptz(b []byte, t time.Time) []byte {
	us := t.Unix()*1000000 + int64(t.Nanosecond())/1000 - y2k
	b = binary.BigEndian.AppendUint32(b, 8)
	return binary.BigEndian.AppendUint64(b, uint64(us))
}
