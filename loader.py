"""Loads employees from a CSV file into the source: `python admin.py load employees.csv`.

The file has a header, the seed's (`Employee ID,First Name,Last Name,Date of Birth,City,
Salary`) or the column names (`emp_id,first_name,...`); Employee ID may be left out, and
the source then numbers the employees. Dates are M/D/YYYY (2/3/2002, the seed's) or
YYYY-MM-DD; spaces around a value are dropped; an empty value is NULL.

The rows go into `employees` with ordinary INSERT and UPDATE statements, so the capture
trigger logs each one and it replicates. With Employee IDs a row is inserted, updated,
or left alone when it is unchanged, so loading a file twice changes nothing the second
time. A bad row is named by its line and reason, and the rest is loaded.

The file is read as a stream, CHUNK_ROWS rows at a time: each chunk is copied into a
temporary staging table and written to `employees` by one statement, in a transaction
of its own, while the next chunk is read. With Employee IDs the chunk is split between
two connections by emp_id, each with its staging table, and the halves are written at
once; an employee's rows all go through one of them, in the file's order.
"""

import csv
import functools
import io
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import date

import psycopg2

import config
from employee import INT_MAX, INT_MIN, TEXT_MAX_LENGTH

CHUNK_ROWS = 20_000
PROGRESS_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal

# Header names, in lower case, and the column each one fills.
COLUMNS = {"employee id": "emp_id", "first name": "first_name", "last name": "last_name",
           "date of birth": "dob", "city": "city", "salary": "salary"}
COLUMNS.update({column: column for column in COLUMNS.values()})
REQUIRED = ("first_name", "last_name", "dob", "city", "salary")
FIELDS = ("emp_id", *REQUIRED)

# ON COMMIT DELETE ROWS: each chunk's commit empties it for the next.
CREATE_STAGING = """
CREATE TEMP TABLE employees_load (
    line       BIGINT NOT NULL,
    emp_id     INT,
    first_name VARCHAR(100),
    last_name  VARCHAR(100),
    dob        DATE,
    city       VARCHAR(100),
    salary     INT
) ON COMMIT DELETE ROWS"""

COPY_STAGING = "COPY employees_load (line, emp_id, first_name, last_name, dob, city, salary) FROM STDIN"

# Before the rows: the ids of the file are never handed out again as defaults, and
# the trigger finds every row at or below the sequence, so it moves the sequence
# once per chunk rather than once per row.
ADVANCE_SEQUENCE = """
SELECT employees_emp_id_seq_at_least(max(emp_id)) FROM employees_load HAVING count(*) > 0"""

# Returns (inserted, updated).
UPSERT = """
WITH written AS (
    INSERT INTO employees AS e (emp_id, first_name, last_name, dob, city, salary)
    -- One row per id, the file's last: ON CONFLICT may touch a row once per statement.
    SELECT DISTINCT ON (emp_id) emp_id, first_name, last_name, dob, city, salary
    FROM employees_load
    ORDER BY emp_id, line DESC
    ON CONFLICT (emp_id) DO UPDATE
    SET first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name,
        dob = EXCLUDED.dob, city = EXCLUDED.city, salary = EXCLUDED.salary
    -- An unchanged row is not updated, so no change is captured for it.
    WHERE (e.first_name, e.last_name, e.dob, e.city, e.salary)
          IS DISTINCT FROM (EXCLUDED.first_name, EXCLUDED.last_name, EXCLUDED.dob,
                            EXCLUDED.city, EXCLUDED.salary)
    -- xmax is 0 on a row version this statement inserted.
    RETURNING xmax = 0 AS inserted
)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM written"""

# Without Employee IDs every row is a new employee, numbered by the identity.
INSERT_NEW = """
WITH written AS (
    INSERT INTO employees (first_name, last_name, dob, city, salary)
    SELECT first_name, last_name, dob, city, salary FROM employees_load ORDER BY line
    RETURNING 1
)
SELECT count(*), 0 FROM written"""


class BadRow(ValueError):
    """A row that cannot be loaded; the message names the column and why."""


def _integer(text, name):
    digits = text[1:] if text[:1] == "-" else text
    if not (digits.isascii() and digits.isdigit()):
        raise BadRow(f"{name}: {text!r} is not a whole number")
    if not INT_MIN <= int(text) <= INT_MAX:
        raise BadRow(f"{name}: {text} is out of range ({INT_MIN} to {INT_MAX})")
    return text


# Birth dates repeat (a century has 36,525 days): each distinct text is parsed once, so
# a date costs a lookup (0.3 µs) instead of a parse (1.5 µs). Bad dates raise and are
# not kept.
@functools.lru_cache(maxsize=1 << 16)
def _date(text, name):
    try:
        if len(text) == 10 and text[4] == "-" and text[7] == "-":
            return date.fromisoformat(text).isoformat()
        month, day, year = text.split("/")
        digits = month + day + year
        if len(year) == 4 and digits.isascii() and digits.isdigit():
            return date(int(year), int(month), int(day)).isoformat()
    except ValueError:
        if text.count("/") == 2 or text.count("-") == 2:
            raise BadRow(f"{name}: {text!r} is not a valid date") from None
    raise BadRow(f"{name}: {text!r} is not a date (M/D/YYYY or YYYY-MM-DD)")


def _text(text, name):
    if len(text) > TEXT_MAX_LENGTH:
        raise BadRow(f"{name}: {len(text)} characters, longer than the column's {TEXT_MAX_LENGTH}")
    # COPY's text format: a backslash, tab, newline or carriage return is escaped.
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        text = (text.replace("\\", "\\\\").replace("\t", "\\t")
                .replace("\n", "\\n").replace("\r", "\\r"))
    return text


CONVERT = {"emp_id": _integer, "first_name": _text, "last_name": _text, "dob": _date,
           "city": _text, "salary": _integer}


class Columns:
    """Where each column is in the file's rows, from its header."""

    def __init__(self, header, path):
        names = [name.strip() for name in header]
        columns = [COLUMNS.get(name.lower()) for name in names]
        unknown = [name for name, column in zip(names, columns) if column is None]
        if unknown:
            raise config.ConfigError(
                f"{path}: unknown column {unknown[0]!r} in the header; expected "
                "Employee ID (optional), First Name, Last Name, Date of Birth, City, Salary")
        if not set(REQUIRED) <= set(columns) or len(set(columns)) != len(columns):
            raise config.ConfigError(f"{path}: the header must name each of First Name, Last Name, "
                                     "Date of Birth, City and Salary once")
        self.has_ids = "emp_id" in columns
        self.count = len(columns)
        # (position in the row, column, conversion, the header's name for it)
        self.order = [(columns.index(field), field, CONVERT[field], names[columns.index(field)])
                      for field in FIELDS if field in columns]

    def copy_line(self, line, values):
        """The row as a line of COPY text; raises BadRow."""
        if len(values) != self.count:
            raise BadRow(f"{len(values)} fields, expected {self.count}")
        out = [str(line)] if self.has_ids else [str(line), "\\N"]
        for index, field, convert, name in self.order:
            text = values[index].strip()
            if not text:
                if field == "emp_id":  # an upsert needs it: a second load would add the row again
                    raise BadRow(f"{name}: missing")
                out.append("\\N")
            else:
                out.append(convert(text, name))
        return "\t".join(out) + "\n"


class Progress:
    """A bar redrawn on a terminal; otherwise a plain line every PROGRESS_EVERY seconds."""

    def __init__(self, size):
        self.size = max(size, 1)
        self.started = self.shown = time.monotonic()
        self.terminal = sys.stderr.isatty()

    def rate(self, rows):
        return rows / max(time.monotonic() - self.started, 1e-9)

    def update(self, rows, position):
        if self.terminal:
            done = min(position / self.size, 1.0)
            bar = "#" * int(done * 30)
            print(f"\r[{bar:<30}] {done:4.0%}  {rows:,} rows  {self.rate(rows):,.0f} rows/s",
                  end="", file=sys.stderr, flush=True)
        elif time.monotonic() - self.shown >= PROGRESS_EVERY:
            self.shown = time.monotonic()
            print(f"{rows:,} rows read ({self.rate(rows):,.0f} rows/s)", file=sys.stderr, flush=True)

    def interrupt(self):
        """Ends a bar's line, before another line is printed."""
        if self.terminal:
            print("\r\033[K", end="", file=sys.stderr)


def load(settings, path):
    """Loads the CSV file at `path`; returns the exit status."""
    try:
        csv_file = open(path, encoding="utf-8-sig", newline="")
    except OSError as error:
        raise config.ConfigError(f"{path}: {error.strerror}") from None
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stops as Ctrl+C does
    # The threads writing to PostgreSQL need the GIL for a moment after each of its
    # answers, and the thread reading the CSV holds it for the 5 ms Python lets it
    # by default: the connections sat idle waiting (1,000,000 rows: 49,487 and 51,085
    # rows/s with 5 ms, 54,712 and 58,482 with 0.5 ms).
    sys.setswitchinterval(0.0005)
    try:
        with csv_file, closing(_connect(settings)) as first, closing(_connect(settings)) as second:
            return _load([first, second], csv_file, path, settings)
    except psycopg2.Error as error:
        raise config.ConfigError(f"source database at {config.database_name(settings, 'source')}: "
                                 f"{config.one_line(error)}") from None


def _connect(settings):
    connection = config.connect(settings, "source")
    with connection.cursor() as cursor:
        cursor.execute(CREATE_STAGING)
    return connection


def _load(connections, csv_file, path, settings):
    reader = csv.reader(csv_file, skipinitialspace=True)  # also before a quoted value
    header = next(reader, None)
    if header is None:
        raise config.ConfigError(f"{path}: empty file, no header")
    columns = Columns(header, path)
    progress = Progress(os.fstat(csv_file.fileno()).st_size)
    writer = _Writer(connections, columns.has_ids)
    read = bad = 0
    chunk = []
    line = 1
    try:
        for values in reader:
            line = reader.line_num
            if not values:
                continue  # a blank line
            read += 1
            try:
                chunk.append(columns.copy_line(line, values))
            except BadRow as error:
                bad += 1
                progress.interrupt()
                print(f"{path} line {line}: {error}", file=sys.stderr)
            if len(chunk) == CHUNK_ROWS:
                writer.write(chunk, line)
                chunk = []
                progress.update(read, csv_file.buffer.tell())
        writer.write(chunk, line)
        writer.wait()
    except UnicodeDecodeError as error:
        raise config.ConfigError(f"{path}: not UTF-8 after line {line} ({error.reason}); "
                                 f"lines 2 to {writer.loaded_to} are loaded") from None
    except KeyboardInterrupt:
        progress.interrupt()
        raise config.ConfigError(f"stopped at line {line} of {path}; lines 2 to {writer.loaded_to} "
                                 "are loaded, and loading the file again finishes it") from None
    finally:
        writer.close()
    progress.interrupt()
    elapsed = time.monotonic() - progress.started
    unchanged = read - bad - writer.inserted - writer.updated
    print(f"Loaded {path} into {config.database_name(settings, 'source')}: {read:,} rows read, "
          f"{writer.inserted:,} inserted, {writer.updated:,} updated, {unchanged:,} unchanged, "
          f"{bad:,} bad; {elapsed:.1f} s, {read / max(elapsed, 1e-9):,.0f} rows/s")
    return 0


class _Writer:
    """Writes the chunks in threads of their own, one chunk at a time, while the next
    one is read: psycopg2 lets go of the GIL while the database works. With Employee
    IDs a chunk is split between the connections by emp_id, so the database works on
    two statements at once while every row of one employee goes through the same
    connection in the file's order; without them one connection numbers the new
    employees in the file's order. Keeps the counts."""

    def __init__(self, connections, has_ids):
        self.connections = connections if has_ids else connections[:1]
        self.statements = [ADVANCE_SEQUENCE, UPSERT] if has_ids else [INSERT_NEW]
        self.inserted = self.updated = 0
        self.loaded_to = 1  # the last line of the last chunk committed
        self._threads = ThreadPoolExecutor(max_workers=len(self.connections))
        self._pending = None  # (futures, the chunk's last line)

    def write(self, chunk, last_line):
        self.wait()
        if chunk:
            futures = [self._threads.submit(self._write, connection, part)
                       for connection, part in zip(self.connections, self._split(chunk)) if part]
            self._pending = (futures, last_line)

    def _split(self, chunk):
        if len(self.connections) == 1:
            return [chunk]
        parts = [[] for _ in self.connections]
        for row in chunk:
            # By its emp_id's block of 1024: consecutive ids of one connection fill
            # index pages of their own, where alternate ids had both writing the same page.
            parts[(int(row.split("\t", 2)[1]) >> 10) % len(parts)].append(row)
        return parts

    def wait(self):
        """Waits for the chunk being written; raises what writing it raised."""
        if self._pending:
            futures, last_line = self._pending
            self._pending = None
            for future in futures:
                inserted, updated = future.result()
                self.inserted += inserted
                self.updated += updated
            self.loaded_to = last_line

    def close(self):
        self._threads.shutdown()

    def _write(self, connection, rows):
        """Copies rows into the connection's staging table, and from there into
        employees; commits. Returns the rows inserted and updated."""
        copy_text = "".join(rows)
        with connection.cursor() as cursor:
            # In one read, not psycopg2's default 8 kB at a time: each read waits for the GIL.
            cursor.copy_expert(COPY_STAGING, io.StringIO(copy_text), size=len(copy_text) + 1)
            for statement in self.statements:
                cursor.execute(statement)
            counts = cursor.fetchone()
        connection.commit()
        return counts
