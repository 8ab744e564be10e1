"""The initial snapshot (`admin.py snapshot`): copies the rows of the source's
employees that predate capture into emp_cdc, where the producer publishes them as
INSERT changes like any other.

Each chunk of rows, in emp_id order, is copied in a short transaction of its own that
reads the rows FOR SHARE, as PgQ and Netflix's DBLog interleave a snapshot with the
change log. A writer holding an uncommitted change of a row is waited for, and the
row is read as it left it; a writer that comes later waits for the chunk to commit.
So the snapshot's copy of a row always takes an action_id above every change made to
that row before it and below every change made after: the consumer's version gate
(cdc_applied) lets no snapshot row overwrite a newer change. The progress lives in
cdc_snapshot and moves in the chunk's transaction: a snapshot killed at any point
resumes where it stopped and copies no row twice.
"""

import sys
import time

import psycopg2

import config

SNAPSHOT_LOCK = 0x62665F736E6170  # advisory lock key held by the running snapshot ("bf_snap")

START = """
INSERT INTO cdc_snapshot (id, next_emp_id) VALUES (1, -2147483648)
ON CONFLICT (id) DO NOTHING
"""

RESTART = "DELETE FROM cdc_snapshot WHERE id = 1"

PROGRESS = """
SELECT next_emp_id, rows_copied, finished_at,
       (SELECT count(*) FROM employees WHERE emp_id >= next_emp_id)
FROM cdc_snapshot WHERE id = 1
"""

# One chunk. `bound` is the chunk's last emp_id, found without locks (NULL: the rest
# of the table). The rows are locked FOR SHARE in emp_id order, the order writers
# lock in too, so they wait on each other without deadlock: FOR SHARE conflicts with
# every UPDATE and DELETE (FOR KEY SHARE would let an UPDATE of other columns by).
# A row whose emp_id a writer moves out of the range is skipped here; the trigger
# logged it under its new emp_id. nextval() runs after the lock is held, so the copy's
# action_id is above that of the writer it waited for. The next chunk starts past `high`
# as a bigint: after emp_id 2147483647, an int's + 1 overflowed.
COPY_CHUNK = """
WITH bound AS (
    SELECT next_emp_id AS low,
           (SELECT emp_id FROM employees WHERE emp_id >= next_emp_id
            ORDER BY emp_id OFFSET %(chunk)s - 1 LIMIT 1) AS high
    FROM cdc_snapshot WHERE id = 1
),
chunk AS (
    SELECT e.emp_id, e.first_name, e.last_name, e.dob, e.city, e.salary
    FROM employees e, bound
    -- Both bounds in the index condition: the scan stops at the chunk's end.
    WHERE e.emp_id BETWEEN bound.low AND COALESCE(bound.high, 2147483647)
    ORDER BY e.emp_id
    FOR SHARE OF e
),
copied AS (
    INSERT INTO emp_cdc (emp_id, first_name, last_name, dob, city, salary, action)
    SELECT emp_id, first_name, last_name, dob, city, salary, 'INSERT' FROM chunk ORDER BY emp_id
    RETURNING emp_id
)
UPDATE cdc_snapshot AS snapshot
SET next_emp_id = COALESCE(bound.high::bigint + 1, snapshot.next_emp_id),
    rows_copied = snapshot.rows_copied + (SELECT count(*) FROM copied),
    finished_at = CASE WHEN bound.high IS NULL THEN now() END
FROM bound
WHERE snapshot.id = 1
RETURNING snapshot.rows_copied, snapshot.finished_at IS NOT NULL
"""


def run(settings):
    # Each chunk finds its rows through the primary key, whatever the statistics say.
    # On a table filled since its last ANALYZE (restored, bulk-loaded), which a role that
    # does not own it cannot ANALYZE, the planner thinks it nearly empty and read all of
    # it for every chunk: 1,000,000 rows took 44 s to copy instead of 10.
    db = config.connect(settings, "source", application_name="cdc-snapshot",
                        options="-c enable_seqscan=off")
    try:
        with db.cursor() as cursor:
            _take_lock(cursor)
            rows_done, remaining = _start(cursor, settings.restart)
            db.commit()
            if remaining is None:
                print("The snapshot is already finished; --restart takes a new one.")
                return 0
            progress = Progress(rows_done, rows_done + remaining)
            try:
                while not _copy_chunk(db, cursor, settings.snapshot_chunk, progress):
                    pass
            except KeyboardInterrupt:
                db.rollback()
                progress.finish()
                print(f"Snapshot stopped after {progress.rows:,} rows; run it again to resume.")
                return 130
        progress.finish()
        print(f"Snapshot finished: {progress.rows:,} rows copied into emp_cdc; "
              "the producer publishes them.")
        return 0
    finally:
        db.close()


def _take_lock(cursor):
    cursor.execute("SELECT pg_try_advisory_lock(%s)", (SNAPSHOT_LOCK,))
    if not cursor.fetchone()[0]:
        raise config.ConfigError("another snapshot is running on this source; "
                                 "it resumes where this one would start")


def _start(cursor, restart):
    """Starts a snapshot or resumes the unfinished one; returns the rows copied so
    far and those left (None if the snapshot is finished)."""
    try:
        if restart:
            cursor.execute(RESTART)
        cursor.execute(START)
    except psycopg2.errors.UndefinedTable:
        raise config.ConfigError("the source has no cdc_snapshot table "
                                 "(apply scripts/source/init.sql)") from None
    cursor.execute(PROGRESS)
    _, rows_copied, finished_at, remaining = cursor.fetchone()
    return rows_copied, None if finished_at else remaining


def _copy_chunk(db, cursor, chunk, progress):
    """Copies one chunk and commits; returns whether the snapshot is finished."""
    try:
        cursor.execute(COPY_CHUNK, {"chunk": chunk})
        rows_copied, finished = cursor.fetchone()
        db.commit()
    except (psycopg2.errors.DeadlockDetected, psycopg2.errors.LockNotAvailable):
        # A writer locking rows in another order than emp_id's, or a writer holding a
        # row past a lock_timeout the database or role sets: the chunk is taken again.
        db.rollback()
        return False
    progress.show(rows_copied)
    return finished


class Progress:
    """Rows, rows/s and ETA: a bar redrawn in place on a terminal, a line every
    few seconds otherwise."""

    LINE_EVERY = 5  # seconds between plain lines

    def __init__(self, rows, total):
        self.first_rows = self.rows = rows
        self.total = max(total, 1)
        self.started = time.monotonic()
        self.next_line = self.started + self.LINE_EVERY
        self.terminal = sys.stdout.isatty()

    def show(self, rows):
        self.rows = rows
        self.total = max(self.total, rows)
        now = time.monotonic()
        if self.terminal:
            print("\r" + self.text(now), end="", flush=True)
        elif now >= self.next_line:
            self.next_line = now + self.LINE_EVERY
            print(self.text(now), flush=True)

    def text(self, now):
        rate = (self.rows - self.first_rows) / max(now - self.started, 1e-3)
        eta = (self.total - self.rows) / rate if rate else 0
        done = self.rows / self.total
        bar = "#" * int(done * 30)
        return (f"[{bar:<30}] {self.rows:,}/{self.total:,} rows  {rate:,.0f} rows/s  "
                f"ETA {eta:.0f} s")

    def finish(self):
        if self.terminal:
            print()
        else:
            print(self.text(time.monotonic()), flush=True)
