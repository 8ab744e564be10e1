"""scripts/bench.py --quick runs every part and prints every row of its table, so
that the benchmark cannot rot. It asserts that it ran, never a speed."""

import os
import re
import subprocess
import sys

from conftest import KAFKA, PORTS, ROOT

ROWS = [r"single row +5 inserts one at a time.*median [\d.]+ ms, p95 [\d.]+ ms",
        r"one statement +1,000 inserts .* changes/s",
        r"one statement +1,000 updates .* changes/s",
        r"source cost +pgbench one-row UPDATEs.*bare [\d,]+ tps, captured [\d,]+ tps, kept \d+%",
        r"source cost +pgbench one-row INSERTs.*bare [\d,]+ tps, captured [\d,]+ tps, kept \d+%",
        r"capture cost +pgbench one-row UPDATEs.*daemons stopped, capture in C +"
        r"bare [\d,]+ tps, captured [\d,]+ tps, kept \d+%",
        r"capture cost +pgbench one-row INSERTs.*daemons stopped, capture in C +"
        r"bare [\d,]+ tps, captured [\d,]+ tps, kept \d+%",
        r"latency +1,000 changes/s, 4 writers.*p50 [\d.]+ / p95 [\d.]+ / p99 [\d.]+ / max [\d.]+ ms",
        r"latency +as fast as 8 writers go.*p50 [\d.]+ / p95 .* offered [\d,]+/s",
        r"long transaction +1,000/s with an xid open, minute 1 .*p50 [\d.]+",
        r"long transaction +1,000/s with an xid open, minute 2 .*p50 [\d.]+",
        r"drain +5,000 changes committed with the daemons stopped +[\d,]+ changes/s",
        r"snapshot +5,000 rows that predate capture, 8 writers at 1,000/s during the copy +"
        r"copied in [\d.]+ s; destination equal [\d.]+ s after the start",
        r"memory +peak RSS of each daemon.*producer \d+ MB, consumer \d+ MB"]


def test_quick_benchmark_prints_every_row(services):  # about 20 seconds
    env = {**os.environ, "SOURCE_DB_PORT": str(PORTS["source"]), "DEST_DB_PORT": str(PORTS["dest"]),
           "KAFKA_BOOTSTRAP_SERVERS": KAFKA}
    result = subprocess.run([sys.executable, str(ROOT / "scripts/bench.py"), "--quick"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == len(ROWS), result.stdout
    for line, row in zip(lines, ROWS):
        assert re.match(row, line), (row, line)
