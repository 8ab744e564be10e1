"""The Employee model both daemons share: a row of `employees`, and a change of one.

A change travels as one flat JSON object:
    {"action_id": 7, "emp_id": 1, "first_name": "John", "last_name": "Doe",
     "dob": "1990-01-01", "city": "New York", "salary": 75000, "action": "INSERT"}
Every field is required; all but action_id, emp_id and action may be null.
A TRUNCATE of the table travels as one change with action "TRUNCATE", its action_id,
and every employee field null; its Kafka key is null.
Validation raises InvalidChange with a message that names the field.
"""

import calendar
import json
import re
from datetime import date
from dataclasses import dataclass, fields
from json.encoder import encode_basestring

import orjson

TRUNCATE = "TRUNCATE"
ACTIONS = ("INSERT", "UPDATE", "DELETE", TRUNCATE)
TEXT_MAX_LENGTH = 100  # VARCHAR(100) in scripts/source/init.sql and scripts/destination/init.sql
INT_MIN, INT_MAX = -2**31, 2**31 - 1  # PostgreSQL INT
BIGINT_MAX = 2**63 - 1

# PostgreSQL prints dates as YYYY-MM-DD (DateStyle ISO), with more year digits after
# 9999, " BC" before year 1, and the special values infinity and -infinity.
# [0-9], not \d: \d and date.fromisoformat() read any script's digits ("\u0661\u0669\u0669\u0660"
# is 1990 to them), and PostgreSQL refuses them.
_DATE = re.compile(r"([0-9]{4,})-([0-9]{2})-([0-9]{2})( BC)?")
# PostgreSQL's first and last date, as (year, month, day), 4714 BC being year -4713
DATE_MIN, DATE_MAX = (-4713, 11, 24), (5874897, 12, 31)
SHOWN_MAX = 80  # characters of a bad value an error shows: a hostile one may be megabytes


class InvalidChange(ValueError):
    """A change that cannot be applied; the message says which field and why."""


def _reject_constant(name):
    # Python reads NaN and Infinity, which JSON (and PostgreSQL) does not have.
    raise InvalidChange(f"malformed JSON: {name} is not a JSON value")


def _unique_fields(pairs):
    # Python keeps the last of a repeated field and so does PostgreSQL's jsonb, but
    # which one the sender meant is anyone's guess: refused.
    data = dict(pairs)
    if len(data) < len(pairs):
        seen = set()
        repeated = next(name for name, _ in pairs if name in seen or seen.add(name))
        raise InvalidChange(f"malformed JSON: field {_shown(repeated)} appears more than once")
    return data


def _shown(value):
    """A value for an error message, as JSON, cut short if long."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= SHOWN_MAX else f"{text[:SHOWN_MAX]}... ({len(text)} characters)"


# Made once: json.dumps and json.loads with options build a new one on every call.
_ENCODER = json.JSONEncoder(ensure_ascii=False)
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_fields)


def _check_int(field, value, low, high, nullable):
    if type(value) is int and low <= value <= high:
        return  # the common case, first: this runs for every field of every change
    if value is None:
        if not nullable:
            raise InvalidChange(f"{field}: missing or null")
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidChange(f"{field}: expected an integer, got {_shown(value)}")
    if not low <= value <= high:
        raise InvalidChange(f"{field}: {_shown(value)} is out of range ({low} to {high})")


def _check_text(field, value):
    if value is None or type(value) is str and len(value) <= TEXT_MAX_LENGTH and value.isascii() \
            and "\x00" not in value:
        return  # the common case, first: ASCII holds no surrogate
    if not isinstance(value, str):
        raise InvalidChange(f"{field}: expected a string or null, got {_shown(value)}")
    if len(value) > TEXT_MAX_LENGTH:
        raise InvalidChange(f"{field}: {len(value)} characters, longer than the column's "
                            f"{TEXT_MAX_LENGTH}")
    _check_characters(field, value)


def _check_characters(field, value):
    # JSON can carry both, PostgreSQL text holds neither, and a lone surrogate cannot
    # even be written back as UTF-8.
    if "\x00" in value:
        raise InvalidChange(f"{field}: contains the character U+0000, which PostgreSQL text cannot hold")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidChange(f"{field}: contains a lone UTF-16 surrogate, which is not a character") from None


def _check_date(field, value):
    if value is None or value in ("infinity", "-infinity"):
        return
    if not isinstance(value, str):
        raise InvalidChange(f"{field}: expected an ISO date string or null, got {_shown(value)}")
    if len(value) == 10 and value[4] == value[7] == "-" and value.isascii():
        try:
            date.fromisoformat(value)  # the common case, checked at C speed
            return
        except ValueError:
            pass
    match = _DATE.fullmatch(value) if len(value) <= SHOWN_MAX else None
    if not match:
        raise InvalidChange(f"{field}: {_shown(value)} is not a date in YYYY-MM-DD form")
    year, month, day = int(match[1]), int(match[2]), int(match[3])
    # 1 BC is year 0 of the proleptic Gregorian calendar, so it is a leap year.
    leap = calendar.isleap(1 - year if match[4] else year)
    if year == 0 or not 1 <= month <= 12 or not 1 <= day <= calendar.mdays[month] + (month == 2 and leap):
        raise InvalidChange(f"{field}: {value!r} is not a valid date")
    if not DATE_MIN <= (1 - year if match[4] else year, month, day) <= DATE_MAX:
        raise InvalidChange(f"{field}: {value!r} is out of range (4714-11-24 BC to 5874897-12-31)")


@dataclass(slots=True)
class Employee:
    emp_id: int
    first_name: str | None
    last_name: str | None
    dob: str | None  # ISO date as PostgreSQL prints it
    city: str | None
    salary: int | None

    def __post_init__(self):
        _check_int("emp_id", self.emp_id, INT_MIN, INT_MAX, nullable=False)
        _check_text("first_name", self.first_name)
        _check_text("last_name", self.last_name)
        _check_text("city", self.city)
        _check_date("dob", self.dob)
        _check_int("salary", self.salary, INT_MIN, INT_MAX, nullable=True)


EMPLOYEE_FIELDS = tuple(field.name for field in fields(Employee))
CHANGE_FIELDS = ("action_id", *EMPLOYEE_FIELDS, "action")


@dataclass(slots=True)
class Change:
    """One captured INSERT, UPDATE or DELETE: the row as the change left it (for a
    DELETE, as it was), numbered by action_id in the order the source made them.
    Or a TRUNCATE, which has no employee."""

    action_id: int
    action: str
    employee: Employee | None

    def __post_init__(self):
        _check_int("action_id", self.action_id, 1, BIGINT_MAX, nullable=False)
        if self.action not in ACTIONS:
            raise InvalidChange(f"action: {_shown(self.action)} is not one of {', '.join(ACTIONS)}")

    @property
    def emp_id(self):
        return None if self.employee is None else self.employee.emp_id

    @property
    def key(self):
        """The Kafka key: emp_id as UTF-8 text, so one employee's changes share a
        partition; None for a TRUNCATE, which concerns them all."""
        return None if self.employee is None else str(self.emp_id).encode()

    @classmethod
    def _of(cls, action_id, action, employee_fields):
        if action != TRUNCATE:
            return cls(action_id, action, Employee(*employee_fields))
        named = [name for name, value in zip(EMPLOYEE_FIELDS, employee_fields) if value is not None]
        if named:
            raise InvalidChange(f"{', '.join(named)}: a TRUNCATE has no employee, expected null")
        return cls(action_id, action, None)

    @classmethod
    def from_row(cls, row):
        """From an emp_cdc row selected as (action_id, <employee fields>, action),
        with dob as text."""
        action_id, *employee, action = row
        return cls._of(action_id, action, employee)

    @classmethod
    def from_dict(cls, data):
        if not isinstance(data, dict):
            raise InvalidChange(f"expected a JSON object, got {type(data).__name__}")
        missing = [name for name in CHANGE_FIELDS if name not in data]
        if missing:
            raise InvalidChange(f"{', '.join(missing)}: missing")
        return cls._of(data["action_id"], data["action"], [data[name] for name in EMPLOYEE_FIELDS])

    @classmethod
    def from_json(cls, text):
        """The change a JSON text holds. Whatever a hostile text makes parsing or
        validation raise becomes InvalidChange: RecursionError for deep nesting,
        ValueError for a number of thousands of digits, and anything else."""
        # The common case at C speed: orjson reads it, and a text with no more colons
        # than its object has fields names no field twice (each field takes a colon; a
        # colon in a string only adds one). Anything else, valid or not, is read again
        # the strict way below, whose errors say what is wrong.
        try:
            data = orjson.loads(text)
            if type(data) is dict and text.count(":") == len(data):
                return cls.from_dict(data)
        except Exception:
            pass
        try:
            return cls.from_dict(_DECODER.decode(text))
        except InvalidChange:
            raise
        except json.JSONDecodeError as error:
            raise InvalidChange(f"malformed JSON: {error}") from None
        except Exception as error:
            raise InvalidChange(f"unreadable JSON: {type(error).__name__}: "
                                f"{str(error)[:SHOWN_MAX * 2]}") from None

    def to_dict(self):
        employee = self.employee
        if employee is None:
            return {"action_id": self.action_id, **dict.fromkeys(EMPLOYEE_FIELDS), "action": self.action}
        return {"action_id": self.action_id, "emp_id": employee.emp_id,
                "first_name": employee.first_name, "last_name": employee.last_name,
                "dob": employee.dob, "city": employee.city, "salary": employee.salary,
                "action": self.action}

    def to_json(self):
        """The text json.dumps(self.to_dict(), ensure_ascii=False) makes, as UTF-8,
        written out field by field: four times as fast, and the producer writes one
        for every change."""
        employee = self.employee
        if employee is None:
            return _ENCODER.encode(self.to_dict()).encode()
        return (f'{{"action_id": {self.action_id}, "emp_id": {employee.emp_id}, '
                f'"first_name": {_json_text(employee.first_name)}, '
                f'"last_name": {_json_text(employee.last_name)}, "dob": {_json_text(employee.dob)}, '
                f'"city": {_json_text(employee.city)}, '
                f'"salary": {"null" if employee.salary is None else employee.salary}, '
                f'"action": "{self.action}"}}').encode()

    def __str__(self):
        return f"action_id={self.action_id}, emp_id={self.emp_id}, action={self.action}"


def _json_text(value):
    return "null" if value is None else encode_basestring(value)


def json_array(changes):
    """The changes as one JSON array text, as the destination's apply reads them."""
    return orjson.dumps([change.to_dict() for change in changes]).decode()
