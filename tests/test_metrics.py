"""Each daemon serves Prometheus metrics on its port, and they move as changes flow."""

import json
import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import query, wait_until


def free_port():
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def scrape(port):
    """{(name, labels as a sorted tuple): value} of every sample served on the port."""
    with urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def test_metrics_are_served_and_move(pipeline):
    producer_port, consumer_port = free_port(), free_port()
    pipeline.producer(PRODUCER_METRICS_PORT=str(producer_port))
    consumer = pipeline.consumer(CONSUMER_METRICS_PORT=str(consumer_port))
    query("source", "INSERT INTO employees SELECT g, 'F', 'L', NULL, NULL, g FROM generate_series(1, 50) g")
    pipeline.wait_for_equal()
    wait_until(lambda: value(scrape(consumer_port), "cdc_changes_applied_total") == 50, 30,
               "50 applied changes in the consumer's metrics", [consumer])

    published = scrape(producer_port)
    assert value(published, "cdc_changes_published_total") == 50
    assert value(published, "cdc_batch_size_changes_sum", daemon="producer") == 50
    assert value(published, "cdc_last_batch_success_timestamp_seconds", daemon="producer") > 0
    applied = scrape(consumer_port)
    assert value(applied, "cdc_batch_size_changes_sum", daemon="consumer") == 50
    assert value(applied, "cdc_batch_duration_seconds_count", daemon="consumer") >= 1
    assert 0 <= value(applied, "cdc_end_to_end_lag_seconds") < 60

    # An old change again (a replay, say) is skipped; a bad one is parked.
    old = next(message for message in pipeline.messages() if message["key"] == b"7")
    pipeline.produce(b"7", old["value"])
    pipeline.produce(b"8", json.dumps({"emp_id": 8}).encode())
    wait_until(lambda: value(scrape(consumer_port), "cdc_changes_parked_total",
                             daemon="consumer", error_class="InvalidChange") == 1, 30,
               "the bad message counted as parked", [consumer])
    moved = scrape(consumer_port)
    assert value(moved, "cdc_changes_skipped_total") == 1
    assert value(moved, "cdc_changes_applied_total") == 50
