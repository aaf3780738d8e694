package postgres

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/lockergate/lockergate/fleet"
)

// A health batch is written as one stream of protocol messages, encoded
// here into a reused buffer, sent with one write and answered in one round
// trip (writeHealth). Through pgx the same transaction (BEGIN, COPY, UPDATE,
// COMMIT) took five round trips and allocated its parameters three times
// over; under load each round trip waited for the writer goroutine to be
// scheduled again among thousands of client goroutines, and the garbage
// made collections, whose marking stalls ingest, more frequent.
//
// The stream, for rows and latest health together:
//
//	Query     BEGIN; [SET LOCAL synchronous_commit = off;] COPY health (...) FROM STDIN BINARY
//	CopyData  every row (binary COPY format)
//	CopyDone
//	Parse, Bind, Execute   updateLatestSQL, its six arrays in binary
//	Parse, Bind, Execute   COMMIT
//	Sync
//
// With Options.HealthAsyncCommit (the embedded broker) a health commit
// does not wait for its WAL to reach the disk (the SET LOCAL above, for
// that transaction only; the walwriter flushes it, usually within 3 x
// wal_writer_delay, 0.6 s by default, and later while the disk is slow to
// flush). Waiting made the one writer's batches wait for fsyncs of up to
// megabytes of WAL, so a slow flush stalled ingest, while it bought health
// little there: the embedded broker acknowledges a report to its locker
// when it is queued, before any commit, and a lost report shows as a gap
// in seq that the next report stands for. What a crash of PostgreSQL or of
// the machine loses is the health committed but not yet flushed, usually
// under a second's worth; a crash of the gateway loses more (its queue).
// Behind an external broker, which is acknowledged only after the commit,
// health commits wait for the disk. Everything else (events, commands and
// their results, the audit) always commits to disk before anyone is
// answered.
//
// The server answers the simple query with ReadyForQuery, then the rest with
// another after Sync. If anything fails, nothing commits: an error in the
// simple query ends it (PostgreSQL drops the CopyData and CopyDone that
// follow an error) and leaves the transaction aborted, so the UPDATE and
// COMMIT fail too; an error in the UPDATE skips the COMMIT up to Sync. A
// transaction left open is rolled back before the connection is reused.
// With only rows the stream is the COPY alone (after the SET LOCAL, if
// any, in the implicit transaction of a simple query of two statements),
// with only latest health the UPDATE alone (after asyncCommitSQL, if
// asynchronous, in the implicit transaction of a pipeline): its own
// transaction, and one ReadyForQuery.
//
// Once the stream is written the server has the whole transaction, so its
// answer is awaited even after the caller gives up (for answerGrace): a
// batch reported lost is retried, and stored twice if it was in fact
// committed. That can still happen when the answer takes longer, or when a
// cancelled write was cut off after the COMMIT's Execute (its last bytes
// are the Sync), as with any answer lost on the way.

// copyHealthSQL is the COPY whose data appendHealthCopy encodes.
const copyHealthSQL = `COPY health (device_id, received_at, ts, seq, body) FROM STDIN BINARY`

// asyncCopyHealthSQL is the same COPY after the statement that lets its
// commit go without waiting for the disk (see above). Two statements in
// one simple query run in one implicit transaction, in which SET LOCAL
// holds.
const asyncCopyHealthSQL = "SET LOCAL synchronous_commit = off; " + copyHealthSQL

// asyncCommitSQL does what asyncCopyHealthSQL's SET LOCAL does for a
// pipeline: the latest health's UPDATE alone, which runs in the pipeline's
// implicit transaction, committed at Sync.
const asyncCommitSQL = "SELECT set_config('synchronous_commit', 'off', true)"

// healthStatements returns the simple query that starts a batch with rows
// and the statement a batch of latest health alone runs before its UPDATE
// ("" for none), for a batch whose commit does not wait for the disk
// (async) or does.
func healthStatements(rows, latest, async bool) (query, before string) {
	switch {
	case async && latest:
		query = "BEGIN; " + asyncCopyHealthSQL
	case async:
		query = asyncCopyHealthSQL
	case latest:
		query = "BEGIN; " + copyHealthSQL
	default:
		query = copyHealthSQL
	}
	if async && !rows {
		before = asyncCommitSQL
	}
	return query, before
}

// updateLatestSQL writes the latest health of lockers. Never older than
// what is stored: with several writers or gateway instances, a later batch
// can carry an earlier message. Gaps are those inside the run plus any
// before its first message, counted as fleet.SeqGap does; no sum
// overflows, whatever seqs a locker sends (each is 0 to 2^63-1, the run's
// gaps at most 2^40).
//
// "d.id = ANY($1)" repeats the join condition for the planner: it makes
// the batch's lockers an index condition on devices. Without it, a batch
// of a few hundred lockers was a hash join over a sequential scan of the
// whole devices table (10,000 rows: the join took 12-24 ms under load
// against 6-9 ms by index), a cost that grows with the fleet rather than
// with the batch.
//
// The rows are locked in id order first (lockDevicesCTE): a control
// shard's batch of the same lockers would otherwise deadlock with it.
var updateLatestSQL = `
	WITH ` + lockDevicesCTE + `
	UPDATE devices d SET health = u.body::json, health_at = u.at, last_seen = greatest(d.last_seen, u.at),
		health_gaps = least(d.health_gaps, 4611686018427387904) + u.gaps + CASE WHEN d.health_seq > 0 AND u.first > d.health_seq
			AND u.first - d.health_seq - 1 <= ` + strconv.Itoa(fleet.MaxSeqGap) + ` THEN u.first - d.health_seq - 1 ELSE 0 END,
		health_seq = u.seq
	FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[], $5::bigint[], $6::bigint[])
		AS u(id, body, at, seq, first, gaps) JOIN locked l ON l.id = u.id
	WHERE d.id = u.id AND d.id = ANY($1::text[]) AND (d.health_at IS NULL OR u.at >= d.health_at)`

// Type OIDs of updateLatestSQL's arrays and their elements.
const (
	oidText, oidTextArray               = 25, 1009
	oidInt8, oidInt8Array               = 20, 1016
	oidTimestamptz, oidTimestamptzArray = 1184, 1185
)

// healthBufs holds the stream buffers between batches.
var healthBufs = sync.Pool{New: func() any { return new([]byte) }}

// maxKeptHealthBuf bounds a buffer given back to healthBufs: an unusually
// large batch does not pin its buffer.
const maxKeptHealthBuf = 4 << 20

// writeHealth stores rows and latest health (either may be empty, not both)
// in one transaction over pc, which must be idle.
func writeHealth(ctx context.Context, pc *pgconn.PgConn, rows []fleet.HealthRecord, latest []fleet.LatestHealth, async bool) error {
	p := healthBufs.Get().(*[]byte)
	b, err := appendHealthTx((*p)[:0], rows, latest, async)
	if err == nil {
		err = exchange(ctx, pc, b, rows, latest)
	}
	if cap(b) <= maxKeptHealthBuf {
		*p = b[:0]
		healthBufs.Put(p)
	}
	return err
}

// answerGrace is how long exchange still waits for the answer to a batch
// it has sent once its caller has given up: the server has the whole
// transaction, COMMIT included, and a batch reported lost that was in fact
// stored would be stored again (its messages are not acknowledged).
const answerGrace = 5 * time.Second

// exchange sends stream b (appendHealthTx of rows and latest) and reads
// the answers up to the last ReadyForQuery.
func exchange(ctx context.Context, pc *pgconn.PgConn, b []byte, rows []fleet.HealthRecord, latest []fleet.LatestHealth) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := send(ctx, pc.Conn(), b); err != nil {
		closeBroken(pc)
		return fmt.Errorf("send health batch: %w", err)
	}
	// Sent: the outcome is awaited past a cancellation, for answerGrace.
	actx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	defer context.AfterFunc(ctx, func() {
		select {
		case <-actx.Done(): // answered
		case <-time.After(answerGrace):
			cancel()
		}
	})()
	// One ReadyForQuery for rows alone (one simple query) or latest health
	// alone (one pipeline), two for the simple query and the pipeline after
	// it.
	want := 1
	if len(rows) > 0 && len(latest) > 0 {
		want = 2
	}
	var first error // the first statement's error: it is the cause of the rest
	for got := 0; got < want; {
		msg, err := pc.ReceiveMessage(actx)
		if err != nil {
			closeBroken(pc) // the rest of the answer would confuse the next user
			return errors.Join(first, err)
		}
		switch msg := msg.(type) {
		case *pgproto3.ErrorResponse:
			if first == nil {
				what := "copy health"
				if len(rows) == 0 || got > 0 {
					what = "update latest health"
				}
				first = fmt.Errorf("%s: %w", what, pgconn.ErrorResponseToPgError(msg))
			}
		case *pgproto3.ReadyForQuery:
			got++
		}
	}
	if first != nil && pc.TxStatus() != 'I' {
		// Not ctx: a cancelled caller must still end its transaction.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := pc.Exec(rctx, "ROLLBACK").Close(); err != nil {
			closeBroken(pc)
		}
	}
	return first
}

// send writes b to conn, giving up when ctx ends. pgconn watches ctx while
// it reads (ReceiveMessage); this write is ours, so is its deadline. On an
// error the deadline is left in the past, so that closing the connection
// does not wait to send its Terminate.
func send(ctx context.Context, conn net.Conn, b []byte) error {
	var mu sync.Mutex
	sent := false
	stop := context.AfterFunc(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		if !sent { // not after: the connection may be someone else's by then
			_ = conn.SetWriteDeadline(time.Now())
		}
	})
	_, err := conn.Write(b)
	mu.Lock()
	sent = true
	mu.Unlock()
	stop()
	if err != nil {
		_ = conn.SetWriteDeadline(time.Now())
		if cerr := ctx.Err(); cerr != nil {
			err = errors.Join(cerr, err)
		}
		return err
	}
	return conn.SetWriteDeadline(time.Time{})
}

// closeBroken closes pc after a failed exchange, so the pool drops it.
func closeBroken(pc *pgconn.PgConn) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = pc.Close(ctx)
}

// appendHealthTx appends to b the protocol messages that store rows and
// latest health in one transaction (see the top of this file).
func appendHealthTx(b []byte, rows []fleet.HealthRecord, latest []fleet.LatestHealth, async bool) ([]byte, error) {
	if len(rows) == 0 && len(latest) == 0 {
		return b, errors.New("nothing to write")
	}
	// The exact size, so that a buffer the pool lost (it is emptied by
	// collections) is allocated once, not grown.
	b = slices.Grow(b, healthTxSize(rows, latest, async))
	sql, before := healthStatements(len(rows) > 0, len(latest) > 0, async)
	if len(rows) > 0 {
		at := begin(&b, 'Q')
		b = appendCString(b, sql)
		end(b, at)
		at = begin(&b, 'd')
		var err error
		if b, err = appendHealthCopy(b, rows); err != nil {
			return b, err
		}
		end(b, at)
		at = begin(&b, 'c')
		end(b, at)
	}
	if len(latest) > 0 {
		if before != "" {
			b = appendExec(b, before, nil)
		}
		b = appendLatestUpdate(b, latest)
		if len(rows) > 0 {
			b = appendExec(b, "COMMIT", nil)
		}
		at := begin(&b, 'S')
		end(b, at)
	}
	return b, nil
}

// healthTxSize is the length of appendHealthTx's messages.
func healthTxSize(rows []fleet.HealthRecord, latest []fleet.LatestHealth, async bool) int {
	const (
		header = 5             // type and length
		bind   = 1 + 1 + 2 + 2 // portal, statement, one format for all
	)
	n := 0
	sql, before := healthStatements(len(rows) > 0, len(latest) > 0, async)
	if len(rows) > 0 {
		n += header + len(sql) + 1 + // Query
			header + copySize(rows) + // CopyData
			header // CopyDone
	}
	if len(latest) > 0 {
		n += header + 1 + len(updateLatestSQL) + 1 + 2 + 6*4 + // Parse
			header + bind + 2 + latestParamsSize(latest) + 2 + // Bind
			header + 1 + 4 // Execute
		if len(rows) > 0 {
			n += execSize("COMMIT")
		}
		if before != "" {
			n += execSize(before)
		}
		n += header // Sync
	}
	return n
}

// execSize is the length of appendExec's messages for sql without
// parameters.
func execSize(sql string) int {
	const header = 5
	return header + 1 + len(sql) + 1 + 2 + // Parse
		header + 1 + 1 + 2 + 2 + 2 + 2 + // Bind
		header + 1 + 4 // Execute
}

// begin starts a message of type t in *b and returns where its length goes.
func begin(b *[]byte, t byte) int {
	*b = append(*b, t, 0, 0, 0, 0)
	return len(*b) - 4
}

// end writes the length of the message whose length is at at.
func end(b []byte, at int) {
	binary.BigEndian.PutUint32(b[at:], uint32(len(b)-at))
}

func appendCString(b []byte, s string) []byte {
	return append(append(b, s...), 0)
}

// appendExec appends Parse, Bind and Execute of sql (unnamed statement and
// portal) with params in binary.
func appendExec(b []byte, sql string, params []paramArray) []byte {
	at := begin(&b, 'P')
	b = appendCString(b, "")
	b = appendCString(b, sql)
	b = binary.BigEndian.AppendUint16(b, uint16(len(params)))
	for _, p := range params {
		b = binary.BigEndian.AppendUint32(b, p.oid)
	}
	end(b, at)
	at = begin(&b, 'B')
	b = appendCString(b, "") // portal
	b = appendCString(b, "") // statement
	b = binary.BigEndian.AppendUint16(b, 1)
	b = binary.BigEndian.AppendUint16(b, 1) // every parameter binary
	b = binary.BigEndian.AppendUint16(b, uint16(len(params)))
	for _, p := range params {
		size := len(b)
		b = append(b, 0, 0, 0, 0)
		b = p.fill(b)
		binary.BigEndian.PutUint32(b[size:], uint32(len(b)-size-4))
	}
	b = binary.BigEndian.AppendUint16(b, 0) // results in their default format
	end(b, at)
	at = begin(&b, 'E')
	b = appendCString(b, "")
	b = binary.BigEndian.AppendUint32(b, 0) // all rows
	end(b, at)
	return b
}

// paramArray is a binary array parameter: its type and its encoder.
type paramArray struct {
	oid  uint32
	fill func([]byte) []byte
}

// appendLatestUpdate appends updateLatestSQL with latest as its arrays.
func appendLatestUpdate(b []byte, latest []fleet.LatestHealth) []byte {
	n := len(latest)
	return appendExec(b, updateLatestSQL, []paramArray{
		{oidTextArray, func(b []byte) []byte {
			b = appendArrayHeader(b, oidText, n)
			for i := range latest {
				b = appendField(b, latest[i].DeviceID)
			}
			return b
		}},
		{oidTextArray, func(b []byte) []byte {
			b = appendArrayHeader(b, oidText, n)
			for i := range latest {
				b = appendField(b, latest[i].Body)
			}
			return b
		}},
		{oidTimestamptzArray, func(b []byte) []byte {
			b = appendArrayHeader(b, oidTimestamptz, n)
			for i := range latest {
				b = appendTimestamptz(b, latest[i].ReceivedAt)
			}
			return b
		}},
		int8Array(latest, func(l *fleet.LatestHealth) int64 { return l.Seq }),
		int8Array(latest, func(l *fleet.LatestHealth) int64 { return l.FirstSeq }),
		int8Array(latest, func(l *fleet.LatestHealth) int64 { return l.Gaps }),
	})
}

func int8Array(latest []fleet.LatestHealth, v func(*fleet.LatestHealth) int64) paramArray {
	return paramArray{oidInt8Array, func(b []byte) []byte {
		b = appendArrayHeader(b, oidInt8, len(latest))
		for i := range latest {
			b = binary.BigEndian.AppendUint32(b, 8)
			b = binary.BigEndian.AppendUint64(b, uint64(v(&latest[i])))
		}
		return b
	}}
}

// appendArrayHeader appends the binary header of a one-dimensional array
// of n elements of type elem, without nulls, indexed from 1.
func appendArrayHeader(b []byte, elem uint32, n int) []byte {
	b = binary.BigEndian.AppendUint32(b, 1) // dimensions
	b = binary.BigEndian.AppendUint32(b, 0) // no nulls
	b = binary.BigEndian.AppendUint32(b, elem)
	b = binary.BigEndian.AppendUint32(b, uint32(n))
	return binary.BigEndian.AppendUint32(b, 1) // lower bound
}

// latestParamsSize is the size of appendLatestUpdate's six parameters with
// their lengths.
func latestParamsSize(latest []fleet.LatestHealth) int {
	n := 6 * (4 + 20)
	for i := range latest {
		n += 4 + len(latest[i].DeviceID) + 4 + len(latest[i].Body) + 4*(4+8)
	}
	return n
}

// copySize is the size of appendHealthCopy's data for rows.
func copySize(rows []fleet.HealthRecord) int {
	n := 11 + 4 + 4 + 2
	for i := range rows {
		n += 2 + 4 + len(rows[i].DeviceID) + 3*(4+8) + 4 + len(rows[i].Body)
	}
	return n
}

// appendHealthCopy appends rows to b as binary COPY data (header, one tuple
// per record, trailer) for the columns of copyHealthSQL.
func appendHealthCopy(b []byte, rows []fleet.HealthRecord) ([]byte, error) {
	b = append(b, "PGCOPY\n\xff\r\n\x00"...)
	b = binary.BigEndian.AppendUint32(b, 0) // flags
	b = binary.BigEndian.AppendUint32(b, 0) // header extension length
	for i := range rows {
		h := &rows[i]
		if len(h.Body) == 0 {
			return b, fmt.Errorf("health of %s seq %d: empty body", h.DeviceID, h.Seq)
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
