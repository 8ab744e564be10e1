"""No message wedges a partition: whatever a hostile producer sends is parked in the
DLQ with a reason, however large, and the change behind it is applied."""

import base64
import hashlib
import json

import pytest

from conftest import Pipeline, query, wait_until
from test_dlq import change, dlq_records, encoded


def with_raw(emp_id, field, raw):
    """A change whose `field` is the raw JSON text given."""
    text = encoded(change(emp_id)).decode()
    return text.replace(f'"{field}": {json.dumps(change(emp_id)[field])}', f'"{field}": {raw}').encode()


DEEP = "[" * 5000 + "]" * 5000
HOSTILE = {
    "deep_nesting": (b"9001", with_raw(9001, "city", DEEP), "unreadable JSON: RecursionError"),
    "deep_nesting_alone": (b"9002", ('{"a":' + DEEP + "}").encode(), "unreadable JSON: RecursionError"),
    "huge_integer": (b"9003", with_raw(9003, "salary", "9" * 5000), "unreadable JSON: ValueError"),
    "huge_integer_in_range_of_int_digits": (b"9004", with_raw(9004, "salary", "9" * 4000),
                                            "salary: " + "9" * 70),
    "float_for_int": (b"9005", with_raw(9005, "salary", "1.0"), "salary: expected an integer, got 1.0"),
    "float_for_action_id": (b"9006", with_raw(9006, "action_id", "1.0"),
                            "action_id: expected an integer, got 1.0"),
    "float_overflow": (b"9007", with_raw(9007, "emp_id", "1e400"),
                       "emp_id: expected an integer, got Infinity"),
    "duplicate_key": (b"9009", encoded(change(9008))[:-1] + b', "emp_id": 9009}',
                      'malformed JSON: field "emp_id" appears more than once'),
    "huge_string": (b"9010", encoded(change(9010, first_name="x" * 900_000)),
                    "first_name: 900000 characters, longer than the column's 100"),
    "huge_bad_date": (b"9011", encoded(change(9011, dob="9" * 900_000)),
                      "is not a date in YYYY-MM-DD form"),
    # Digits that Python's date parser and a regular expression's \d read, and
    # PostgreSQL does not.
    "arabic_indic_digits_in_date": (b"9014", encoded(change(9014, dob="\u0661\u0669\u0669\u0660-01-01")),
                                    "is not a date in YYYY-MM-DD form"),
    "nul_character": (b"9012", encoded(change(9012, city="a\u0000b")),
                      "city: contains the character U+0000"),
    "lone_surrogate": (b"9013", with_raw(9013, "last_name", '"a\\ud800b"'),
                       "last_name: contains a lone UTF-16 surrogate"),
}

# Values whose DLQ record would pass the broker's 1 MB: base64 grows the first by a
# third, JSON escaping doubles the second.
OVERSIZED = {
    "not_utf8_760_kb": (b"9101", b"\xff" * 760_000, "value is not UTF-8"),
    "quotes_600_kb": (b"9102", b'"' * 600_000, "malformed JSON"),
}


@pytest.fixture(scope="module")
def running(services, tmp_path_factory):
    pipeline = Pipeline("hostile", tmp_path_factory.mktemp("hostile"))
    pipeline.consumer()
    yield pipeline
    pipeline.close()


def park_then_apply_next(pipeline, key, value, next_emp_id):
    """Produces the value and a valid change after it; returns the value's DLQ record
    once the valid change is applied."""
    partition, offset = pipeline.produce(key, value)
    pipeline.produce(str(next_emp_id).encode(), encoded(change(next_emp_id)))
    wait_until(lambda: query("dest", "SELECT 1 FROM employees WHERE emp_id = %s", (next_emp_id,)),
               60, f"emp_id {next_emp_id}, sent after the hostile message, to be applied",
               pipeline.daemons)
    [record] = wait_until(lambda: [r for r in dlq_records(pipeline)
                                   if (r["partition"], r["offset"]) == (partition, offset)],
                          30, "the hostile message in the DLQ", pipeline.daemons)
    return record


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_message_is_parked_with_its_reason(running, kind):
    key, value, reason = HOSTILE[kind]
    record = park_then_apply_next(running, key, value, 9500 + list(HOSTILE).index(kind))
    assert reason in record["error"]
    assert len(record["error"]) < 300
    assert record["headers"]["dlq.error_class"] == "InvalidChange"
    assert query("dest", "SELECT 1 FROM employees WHERE emp_id = %s", (int(key),)) == []


@pytest.mark.parametrize("kind", OVERSIZED)
def test_a_record_too_large_for_the_dlq_is_parked_cut_down_and_named(running, kind):
    key, value, reason = OVERSIZED[kind]
    record = park_then_apply_next(running, key, value, 9600 + list(OVERSIZED).index(kind))
    assert reason in record["error"]
    assert record["original_value_cut"] is True
    assert record["original_value_size"] == len(value)
    assert record["original_value_sha256"] == hashlib.sha256(value).hexdigest()
    kept = record["original_value"]
    kept = (base64.b64decode(kept) if record.get("original_value_encoding") == "base64"
            else kept.encode())
    assert 0 < len(kept) < len(value) and value.startswith(kept)
    # The whole original is where the record says.
    [original] = [m for m in running.messages()
                  if (m["partition"], m["offset"]) == (record["partition"], record["offset"])]
    assert original["value"] == value
