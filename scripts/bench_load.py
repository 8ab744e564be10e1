"""The parts of scripts/bench.py that put the source under load: pgbench for the
source's cost, a steady stream of small transactions for commit->applied latency,
a backlog for the drain, and the daemons' peak memory.

Latency comes from timestamps the databases record, both on this machine's clock:
emp_cdc.changed_at on the source (the start of the writer's one-statement
transaction, within a millisecond of its commit) and bench_applied.applied_at on the
destination, written by a trigger of the benchmark's own database when the consumer
applies the row. Each change sets a salary no other change sets, so (emp_id, salary)
finds it on both sides.
"""

import itertools
import re
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path

import psycopg2

# In the benchmark's destination database only: when each row was applied, in a table
# of its own (the destination's employees keeps its six columns).
NOTE_APPLIED = """
CREATE TABLE bench_applied (emp_id INT, salary INT, applied_at TIMESTAMPTZ DEFAULT clock_timestamp());
CREATE FUNCTION bench_note_applied() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_applied (emp_id, salary) VALUES (NEW.emp_id, NEW.salary);
    RETURN NULL;
END;
$$;
CREATE TRIGGER bench_note_applied AFTER INSERT OR UPDATE ON employees
    FOR EACH ROW EXECUTE FUNCTION bench_note_applied();
"""

CHANGED = """
SELECT emp_id, salary, extract(epoch FROM changed_at) FROM emp_cdc
WHERE action_id > %s AND action = 'UPDATE'
ORDER BY action_id
"""
APPLIED = "SELECT emp_id, salary, extract(epoch FROM applied_at) FROM bench_applied"

PGBENCH_SCRIPTS = {
    "UPDATE": "\\set id random(1, :rows)\n"
              "UPDATE employees SET salary = salary + 1 WHERE emp_id = :id;\n",
    "INSERT": "\\set id random(200000000, 2000000000)\n"
              "INSERT INTO employees VALUES (:id, 'F', 'L', '1990-01-01', 'C', 1) ON CONFLICT DO NOTHING;\n",
}

# Salaries the load sets, each once; far above those of the table's rows.
SALARIES = itertools.count(1_000_000_000)


def pgbench_tps(settings, database, statement, rows, seconds, clients=8):
    """Transactions per second pgbench sustained with `clients` clients of one-row
    `statement` (UPDATE or INSERT) transactions on `database` of the source server."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
        script.write(PGBENCH_SCRIPTS[statement])
        script.flush()
        result = subprocess.run(
            ["pgbench", "-h", settings.source_host, "-p", str(settings.source_port),
             "-U", settings.source_user, "-n", "-c", str(clients), "-j", "2", "-T", str(seconds),
             "-D", f"rows={rows}", "-f", script.name, database],
            env={"PGPASSWORD": settings.source_password, "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True)
    found = re.search(r"^tps = ([\d.]+)", result.stdout, re.MULTILINE)
    if result.returncode != 0 or not found:
        raise SystemExit(f"Error: pgbench failed: {(result.stderr or result.stdout).strip()[-300:]}")
    return float(found[1])


def pgbench_missing():
    return shutil.which("pgbench") is None


class SteadyLoad:
    """`writers` threads, each on its own connection, updating the salary of a random
    employee in one-statement transactions at `rate` changes per second in all (None:
    as fast as they can), until stop()."""

    def __init__(self, connect, rows, rate=None, writers=4):
        self.connect, self.rows, self.rate, self.writers = connect, rows, rate, writers
        self.stopping = threading.Event()
        self.counts = [0] * writers  # changes committed by each writer
        self.errors = []
        self.threads = [threading.Thread(target=self.write, args=(number,), daemon=True)
                        for number in range(writers)]

    def __enter__(self):
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
        self.seconds = time.monotonic() - self.started
        self.offered = sum(self.counts)
        if self.errors:
            raise SystemExit(f"Error: a writer of the load failed: {self.errors[0]}")

    def write(self, number):
        spacing = self.writers / self.rate if self.rate else 0
        due = time.monotonic()
        try:
            with closing(self.connect()) as db, db.cursor() as cursor:
                emp_ids = itertools.cycle(range(number + 1, self.rows + 1, self.writers))
                while not self.stopping.is_set():
                    cursor.execute("UPDATE employees SET salary = %s WHERE emp_id = %s",
                                   (next(SALARIES), next(emp_ids)))
                    self.counts[number] += 1
                    due += spacing
                    pause = due - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
        except psycopg2.Error as error:
            self.errors.append(error)


def latencies(source, dest, after_action_id, timeout=120):
    """Commit->applied seconds of every UPDATE past after_action_id, keyed by
    (emp_id, salary), with the epoch of each commit; waits up to `timeout` seconds for
    the destination to have them all. Returns (samples, seconds the destination
    trailed the last commit, changes never applied)."""
    source.execute(CHANGED, (after_action_id,))
    changes = source.fetchall()
    deadline = time.monotonic() + timeout
    while True:
        dest.execute(APPLIED)
        applied = {(emp_id, salary): at for emp_id, salary, at in dest.fetchall()}
        samples, missing = visible_after(changes, applied)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    trailed = max((float(at) for at in applied.values()), default=0) - max(
        (float(at) for _, _, at in changes), default=0)
    return sorted(samples), trailed, missing


def visible_after(changes, applied):
    """Of changes given in action_id order: (commit epoch, seconds until the destination
    had it) of each it has, and how many it has not. A batch writes only the newest
    change of each employee it holds: one it passed over is timed to the next change of
    that employee the destination wrote, which carried it forward."""
    samples, missing = [], 0
    applied_next = {}  # emp_id: applied epoch of its next change the destination wrote
    for emp_id, salary, at in reversed(changes):
        if (emp_id, salary) in applied:
            applied_next[emp_id] = applied[(emp_id, salary)]
        if emp_id in applied_next:
            samples.append((float(at), float(applied_next[emp_id]) - float(at)))
        else:
            missing += 1
    return samples, missing


def distribution(seconds):
    """p50 / p95 / p99 / max of latencies in seconds, as text in milliseconds."""
    ordered = sorted(seconds)
    if not ordered:
        return "no samples"
    rank = [ordered[min(len(ordered) - 1, int(share * len(ordered)))] for share in (0.5, 0.95, 0.99)]
    return "p50 {:.1f} / p95 {:.1f} / p99 {:.1f} / max {:.1f} ms".format(
        *(value * 1000 for value in (*rank, ordered[-1])))


def peak_rss_mb(pid):
    """The peak resident memory of a running process, in MB (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024
