"""The daemons' Prometheus metrics, served over HTTP on PRODUCER_METRICS_PORT and
CONSUMER_METRICS_PORT (0: not served). Each daemon calls the functions below at the
point where what they count has happened for good: after Kafka's acknowledgement, after
the destination's commit, after the DLQ took a message.
"""

import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server

import dlq

# prometheus_client adds the _total suffix to counters.
PUBLISHED = Counter("cdc_changes_published", "Changes the producer published to the main topic")
APPLIED = Counter("cdc_changes_applied", "Changes the consumer applied to the destination")
SKIPPED = Counter("cdc_changes_skipped",
                  "Changes the consumer skipped as older than (or equal to) one already applied")
PARKED = Counter("cdc_changes_parked", "Changes sent to the DLQ", ["daemon", "error_class"])
REDRIVEN = Counter("cdc_changes_redriven",
                   "Parked changes the consumer replayed once the destination answered again")
ERRORS = Counter("cdc_errors", "Errors a daemon retried, by class", ["daemon", "error_class"])
BATCH_SIZE = Histogram("cdc_batch_size_changes", "Changes per batch", ["daemon"],
                       buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000, 50000))
BATCH_DURATION = Histogram("cdc_batch_duration_seconds",
                           "Seconds to publish (producer) or apply (consumer) a batch", ["daemon"])
LAST_BATCH = Gauge("cdc_last_batch_success_timestamp_seconds",
                   "Unix time of the last batch done for good", ["daemon"])
LAG = Gauge("cdc_end_to_end_lag_seconds",
            "Seconds from the publication of the newest change of the last batch to its apply")


def serve(port):
    if port:
        start_http_server(port)


def batch_done(daemon, size, started):
    """A batch published and acknowledged, or applied and committed; `started` is its
    time.monotonic() at the start."""
    BATCH_SIZE.labels(daemon).observe(size)
    BATCH_DURATION.labels(daemon).observe(time.monotonic() - started)
    LAST_BATCH.labels(daemon).set_to_current_time()


def set_lag(messages):
    """The consumer's batch applied: the lag of its newest message (Kafka timestamp, ms)."""
    newest = max(message.timestamp()[1] for message in messages)
    LAG.set(max(time.time() - newest / 1000, 0))


def applied_or_skipped(batch, newest_applied):
    """A batch of (message, change) committed; newest_applied: {emp_id: action_id} of
    the changes the destination took."""
    taken = sum(newest_applied.get(change.emp_id) == change.action_id for _, change in batch)
    APPLIED.inc(taken)
    SKIPPED.inc(len(batch) - taken)


def parked(daemon, messages):
    """DLQ messages, as (key, value, headers), that the DLQ acknowledged."""
    for _, _, headers in messages:
        PARKED.labels(daemon, dict(headers).get(dlq.ERROR_CLASS, "unknown")).inc()


def error(daemon, exception):
    ERRORS.labels(daemon, type(exception).__name__).inc()
