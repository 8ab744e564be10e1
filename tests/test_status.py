"""admin.py status: the verdict in each state, as exit code, text and JSON."""

import json
import subprocess
import sys
import time
from contextlib import closing

from conftest import ROOT, connect, query, wait_until


def status(pipeline, *args, **env):
    result = subprocess.run([sys.executable, str(ROOT / "admin.py"), "status", *args],
                            env={**pipeline.env, **env}, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_status_in_each_state(pipeline):
    pipeline.producer()
    consumer = pipeline.consumer()
    query("source", "INSERT INTO employees VALUES (1, 'A', 'B', NULL, NULL, 1)")
    pipeline.wait_for_equal()

    healthy = status(pipeline)
    assert healthy.returncode == 0, healthy.stdout
    assert healthy.stdout.startswith("Pipeline: HEALTHY\nProducer     running: pid ")
    assert "Destination  newest applied: action_id 1, " in healthy.stdout
    report = json.loads(status(pipeline, "--json").stdout)
    # Committed offsets trail the applied ones by up to 5 s: a lag of a few seconds is healthy.
    assert report["state"] == "healthy" and report["lag_seconds"] < 60
    assert report["producer"]["watermark"] == 1 and report["producer"]["unpublished"] == 0
    assert len(report["kafka"]["members"]) == 1
    assert sum(p["end"] for p in report["kafka"]["partitions"]) == 1

    # The DLQ not empty: degraded, unless STATUS_MAX_DLQ allows it.
    pipeline.produce(b"2", b"not json")
    wait_until(lambda: pipeline.messages(pipeline.dlq_topic), 30, "the bad message in the DLQ", [consumer])
    parked = status(pipeline)
    assert parked.returncode == 1
    assert "  ! dlq: 1 record(s) not replayed, over STATUS_MAX_DLQ (0)" in parked.stdout
    assert status(pipeline, STATUS_MAX_DLQ="1").returncode == 0

    # Lagging: the destination holds the consumer back while a change waits.
    with closing(connect("dest")) as blocker, blocker.cursor() as cursor:
        cursor.execute("BEGIN; LOCK TABLE employees")
        query("source", "INSERT INTO employees VALUES (3, 'C', 'D', NULL, NULL, 3)")
        time.sleep(2.5)
        lagging = status(pipeline, STATUS_MAX_DLQ="1", STATUS_MAX_LAG="1")
        cursor.execute("ROLLBACK")
    assert lagging.returncode == 1, lagging.stdout
    assert "  ! lag: " in lagging.stdout and "over STATUS_MAX_LAG (1 s)" in lagging.stdout
    pipeline.wait_for_equal()

    # A daemon stopped, or Kafka out of reach: down.
    assert consumer.stop() == 0
    stopped = status(pipeline, STATUS_MAX_DLQ="1")
    assert stopped.returncode == 2
    assert f"  ! consumer: group {pipeline.group} has no members" in stopped.stdout
    unreachable = status(pipeline, "--json", STATUS_MAX_DLQ="1", KAFKA_BOOTSTRAP_SERVERS="localhost:1")
    assert unreachable.returncode == 2
    assert json.loads(unreachable.stdout)["kafka"]["error"]
