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

Headers: dlq.stage (producer or consumer), dlq.error_class, dlq.attempts.
"""

import base64
import json
import time

STAGE = "dlq.stage"
ERROR_CLASS = "dlq.error_class"
ATTEMPTS = "dlq.attempts"


def _encode(record, field, data):
    if data is None:
        record[field] = None
        return
    try:
        record[field] = data.decode("utf-8")
    except UnicodeDecodeError:
        record[field] = base64.b64encode(data).decode("ascii")
        record[f"{field}_encoding"] = "base64"


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
    record.update(error=error, partition=partition, offset=offset, timestamp=time.time())
    if action_id is not None:
        record["action_id"] = action_id
    headers = [(STAGE, stage), (ERROR_CLASS, error_class), (ATTEMPTS, str(attempts))]
    return key, json.dumps(record, ensure_ascii=False).encode(), headers
