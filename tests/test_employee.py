"""The Employee model: row -> change -> JSON -> change, and validation that names the field."""

import json

import pytest

from employee import Change, InvalidChange

ROW = (7, 42, "Zoë", "O'Brien", "1990-01-01", "Zürich", 75000, "UPDATE")


def as_json(**changes):
    data = Change.from_row(ROW).to_dict()
    data.update(changes)
    return json.dumps(data)


def test_row_to_json_and_back():
    change = Change.from_row(ROW)
    assert change.key == b"42"
    assert json.loads(change.to_json()) == {
        "action_id": 7, "emp_id": 42, "first_name": "Zoë", "last_name": "O'Brien",
        "dob": "1990-01-01", "city": "Zürich", "salary": 75000, "action": "UPDATE"}
    assert Change.from_json(change.to_json().decode()) == change
    assert str(change) == "action_id=7, emp_id=42, action=UPDATE"


@pytest.mark.parametrize("dob", ["0001-01-01", "9999-12-31", "2000-02-29", "infinity", "-infinity",
                                 "0044-03-15 BC", "0001-02-29 BC", "5874897-12-31", "4714-11-24 BC",
                                 None])
def test_dates_postgresql_can_hold_are_accepted(dob):
    assert Change.from_json(as_json(dob=dob)).employee.dob == dob


@pytest.mark.parametrize("dob", ["2023-02-30", "1900-02-29", "2023-13-01", "0000-01-01", "2023-1-1",
                                 "2021-W01-1", "20230101", "yesterday",
                                 # digits Python reads and PostgreSQL does not: Arabic-Indic, fullwidth
                                 "\u0661\u0669\u0669\u0660-\u0660\u0661-\u0660\u0661", "1990-01-0\uff11",
                                 "\u0661\u0669\u0669\u0660\u0660-01-01",
                                 # past PostgreSQL's range
                                 "5874898-01-01", "4714-11-23 BC", "99999999999-01-01"])
def test_impossible_dates_are_named(dob):
    with pytest.raises(InvalidChange, match=r"^dob: "):
        Change.from_json(as_json(dob=dob))


@pytest.mark.parametrize("fields, message", [
    ({"salary": "abc"}, 'salary: expected an integer, got "abc"'),
    ({"salary": 1.5}, "salary: expected an integer, got 1.5"),
    ({"salary": True}, "salary: expected an integer, got true"),
    ({"salary": 2**31}, "salary: 2147483648 is out of range (-2147483648 to 2147483647)"),
    ({"emp_id": None}, "emp_id: missing or null"),
    ({"emp_id": "42"}, 'emp_id: expected an integer, got "42"'),
    ({"action_id": 0}, "action_id: 0 is out of range"),
    ({"action": "MERGE"}, 'action: "MERGE" is not one of INSERT, UPDATE, DELETE'),
    ({"first_name": "x" * 101}, "first_name: 101 characters, longer than the column's 100"),
    ({"city": 12}, "city: expected a string or null, got 12"),
])
def test_bad_fields_are_named(fields, message):
    with pytest.raises(InvalidChange) as error:
        Change.from_json(as_json(**fields))
    assert str(error.value).startswith(message)


def test_missing_fields_are_all_named():
    with pytest.raises(InvalidChange, match=r"^emp_id, city: missing$"):
        Change.from_json('{"action_id": 1, "first_name": null, "last_name": null, "dob": null, '
                         '"salary": null, "action": "DELETE"}')


@pytest.mark.parametrize("text, message", [
    ('{"action_id": 1', "malformed JSON: "),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"salary": NaN}', "malformed JSON: NaN is not a JSON value"),
])
def test_what_is_not_a_change_object_is_named(text, message):
    with pytest.raises(InvalidChange) as error:
        Change.from_json(text)
    assert str(error.value).startswith(message)


def test_nulls_are_kept():
    change = Change.from_row((1, 5, None, None, None, None, None, "DELETE"))
    assert Change.from_json(change.to_json().decode()) == change


# Text that JSON must escape or that a fast reader might read otherwise: quotes,
# backslashes, control characters, the line separators JavaScript minds, non-ASCII
# letters, an emoji, a colon (the fast reader counts colons), braces.
AWKWARD_TEXTS = ['say "hi"', "back\\slash", "tab\there\nnewline\r\x01\x1f", "\u2028\u2029",
                 "Zoë Ærø", "😀", "a: b", "{}", "[,]", " ", ""]


@pytest.mark.parametrize("text", AWKWARD_TEXTS)
def test_the_wire_text_is_what_json_dumps_writes(text):
    for row in ((9, 3, text, text, "2000-01-01", text, -5, "INSERT"),
                (9, 3, None, text, None, None, None, "DELETE"),
                (9, None, None, None, None, None, None, "TRUNCATE")):
        change = Change.from_row(row)
        assert change.to_json() == json.dumps(change.to_dict(), ensure_ascii=False).encode()
        assert Change.from_json(change.to_json().decode()) == change


@pytest.mark.parametrize("text", [
    '{"action_id": 1, "emp_id": 2, "first_name": null, "last_name": null, "dob": null, '
    '"city": null, "salary": null, "action": "INSERT", "action": "DELETE"}',
    '{"action_id" : 1, "action_id" : 2, "emp_id": 2, "first_name": null, "last_name": null, '
    '"dob": null, "city": null, "salary": null}',
    '{"action_id": 18446744073709551617, "emp_id": 2, "first_name": null, "last_name": null, '
    '"dob": null, "city": null, "salary": null, "action": "INSERT"}',
    '{"action_id": 1, "emp_id": 2, "first_name": "\\ud800", "last_name": null, "dob": null, '
    '"city": null, "salary": null, "action": "INSERT"}',
])
def test_the_fast_reader_refuses_what_the_strict_one_refuses(text):
    """Repeated fields (spaced so that no '":' gives them away), a number past 64 bits,
    a lone surrogate: each refused with the strict reader's words."""
    with pytest.raises(InvalidChange) as error:
        Change.from_json(text)
    assert any(words in str(error.value) for words in ("appears more than once", "out of range",
                                                        "surrogate"))
