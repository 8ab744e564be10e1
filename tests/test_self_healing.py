"""An outage of the destination heals with no command typed: what was parked because
the destination was out of reach is re-driven by the consumer once it answers."""

import json
import subprocess
import sys
import time

from conftest import ROOT, query, stack, wait_until
from workload import Writers


def dlq_records(pipeline):
    return [{**json.loads(message["value"]), "error_class": message["headers"]["dlq.error_class"]}
            for message in pipeline.messages(pipeline.dlq_topic)
            if "dlq.replayed" not in message["headers"]]


def test_an_outage_under_steady_writes_heals_itself(pipeline):
    pipeline.producer()
    consumer = pipeline.consumer(MAX_RETRIES="1", REDRIVE_INTERVAL="1")
    pipeline.produce(b"1", b"not json")  # a content reject: stays parked for a person
    with Writers(threads=2, keys=300) as writers:
        time.sleep(1)
        assert stack("down", "dest").returncode == 0
        try:
            wait_until(lambda: len(dlq_records(pipeline)) >= 20, 120,
                       "changes parked while the destination is down", [consumer])
            time.sleep(2)
        finally:
            assert stack("up", "dest").returncode == 0
        time.sleep(3)
    assert writers.committed > 0
    pipeline.wait_for_equal(timeout=120)
    consumer.wait_for_log("The destination answers again: re-drove ")
    unreachable = [r for r in dlq_records(pipeline) if r["error_class"] == b"OperationalError"]
    assert len(unreachable) >= 20
    waiting = subprocess.run([sys.executable, str(ROOT / "admin.py"), "dlq", "list"], env=pipeline.env,
                             capture_output=True, text=True, timeout=120).stdout
    assert waiting.startswith(f"1 DLQ record(s) in {pipeline.dlq_topic} not yet replayed")
    assert "malformed JSON" in waiting
    assert query("dest", "SELECT count(*) FROM employees") == query("source", "SELECT count(*) FROM employees")
