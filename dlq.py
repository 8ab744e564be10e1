"""The dead letter queue record, as the seed defines it, written by the producer and
the consumer and read by `admin.py dlq`.

Value (JSON):
    {"original_topic": "bf_employee_cdc", "original_key": "103",
     "original_value": "{...}", "error": "why", "partition": 0, "offset": 3,
     "timestamp": 1234567890.123}
original_key and original_value keep the exact bytes: as text when they are UTF-8,
else base64 with "original_key_encoding" / "original_value_encoding": "base64".
partition and offset are null for a change the producer could not publish; its
action_id is then in "action_id".

A record stays under the broker's 1 MB however large the original: when it would not,
each original over 64 KB is cut to its first 64 KB (whole characters, for text) and
named by "original_value_size" (bytes), "original_value_sha256" and
"original_value_cut": true (the same for the key); the whole original is still in
original_topic at partition and offset. The error is cut to 2,000 characters.

Headers: dlq.stage (producer or consumer), dlq.error_class, dlq.attempts.
"""

import base64
import hashlib
import json
import time

STAGE = "dlq.stage"
ERROR_CLASS = "dlq.error_class"
ATTEMPTS = "dlq.attempts"

# librdkafka's message.max.bytes is 1,000,000 and the broker's a little more; headers
# and framing need some room. JSON escaping may double text, base64 adds a third.
RECORD_MAX = 900_000
CUT_TO = 65_536  # bytes of an original kept in a record that would be too large
ERROR_MAX = 2_000  # characters of the error kept


def _encode(record, field, data, limit=None):
    """Puts data in record[field]: as text if UTF-8, else base64; with a limit, only
    its first `limit` bytes, and its size and sha256 to name the whole."""
    if data is None:
        record[field] = None
        return
    kept = data if limit is None else data[:limit]
    try:
        data.decode("utf-8")
        # "ignore" drops nothing but a character the cut split in two.
        record[field] = kept.decode("utf-8", "ignore")
    except UnicodeDecodeError:
        record[field] = base64.b64encode(kept).decode("ascii")
        record[f"{field}_encoding"] = "base64"
    if limit is not None:
        record.update({f"{field}_cut": True, f"{field}_size": len(data),
                       f"{field}_sha256": hashlib.sha256(data).hexdigest()})


def original(record, field):
    """The exact bytes of a record's original_key or original_value."""
    text = record.get(field)
    if text is None:
        return None
    if record.get(f"{field}_encoding") == "base64":
        return base64.b64decode(text)
    return text.encode("utf-8")


def message(*, topic, key, value, error, stage, error_class, attempts,
            partition=None, offset=None, action_id=None):
    """A DLQ message as (key, value, headers), ready for config.deliver()."""
    record = {"original_topic": topic}
    _encode(record, "original_key", key)
    _encode(record, "original_value", value)
    record.update(error=error[:ERROR_MAX], partition=partition, offset=offset, timestamp=time.time())
    if action_id is not None:
        record["action_id"] = action_id
    encoded = json.dumps(record, ensure_ascii=False).encode()
    if len(encoded) > RECORD_MAX:
        for field, data in (("original_key", key), ("original_value", value)):
            if data is not None and len(data) > CUT_TO:
                record.pop(f"{field}_encoding", None)
                _encode(record, field, data, CUT_TO)
        encoded = json.dumps(record, ensure_ascii=False).encode()
    headers = [(STAGE, stage), (ERROR_CLASS, error_class), (ATTEMPTS, str(attempts))]
    # The key is kept whole only while it is small: Kafka counts it in the record's size.
    return key if key is None or len(key) <= CUT_TO else key[:CUT_TO], encoded, headers
