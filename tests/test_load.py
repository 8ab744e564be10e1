"""`python admin.py load FILE`: employees from a CSV file into the source, through the
capture trigger, so that they replicate (loader.py)."""

import re
import subprocess
import sys

from conftest import ROOT, query, run_with_peak_kib
from loader import CHUNK_ROWS

SAMPLE_BAD_ROWS = [
    "employees.csv line 19: Employee ID: missing",
    "employees.csv line 45: Date of Birth: '2/30/1985' is not a valid date",
    "employees.csv line 103: Salary: 'seventy thousand' is not a whole number",
    "employees.csv line 155: 5 fields, expected 6",
    "employees.csv line 217: Employee ID: 'A212' is not a whole number",
    "employees.csv line 267: Date of Birth: '1990.05.12' is not a date (M/D/YYYY or YYYY-MM-DD)",
]


def load(pipeline, path, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "admin.py"), "load", str(path)], env=pipeline.env,
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def summary(result):
    """The counts of the summary line: read, inserted, updated, unchanged, bad."""
    match = re.search(r": ([\d,]+) rows read, ([\d,]+) inserted, ([\d,]+) updated, "
                      r"([\d,]+) unchanged, ([\d,]+) bad; [\d.]+ s, ([\d,]+) rows/s$", result.stdout.strip())
    assert match, result.stdout + result.stderr
    return tuple(int(count.replace(",", "")) for count in match.groups()[:5])


def cdc_count():
    return query("source", "SELECT count(*) FROM emp_cdc")[0][0]


def test_the_sample_loads_names_its_bad_rows_replicates_and_loads_again_as_a_no_op(pipeline):
    pipeline.producer()
    pipeline.consumer()
    first = load(pipeline, "employees.csv")
    assert first.returncode == 0, first.stderr
    assert first.stderr.splitlines() == SAMPLE_BAD_ROWS
    assert summary(first) == (306, 300, 0, 0, 6)
    rows = pipeline.wait_for_equal()
    assert len(rows) == 300 and [row[0] for row in rows] == list(range(1, 301))
    # The seed's format: 8/13/1960, and " 132000" with its stray space.
    assert rows[11] == (12, "Susan", "Johnson", "1960-08-13", "Houston", 132000)
    assert query("source", "SELECT action, count(*) FROM emp_cdc GROUP BY action") == [("INSERT", 300)]

    second = load(pipeline, "employees.csv")
    assert second.returncode == 0
    assert summary(second) == (306, 0, 0, 300, 6)
    assert cdc_count() == 300


def test_a_changed_row_is_updated_and_only_it_is_captured(pipeline, tmp_path):
    load(pipeline, "employees.csv")
    changed = tmp_path / "employees.csv"
    lines = (ROOT / "employees.csv").read_text().splitlines(keepends=True)
    lines[2] = "2,Robert,Jackson,4/21/1971,Houston, 99000\n"
    changed.write_text("".join(lines))
    result = load(pipeline, changed)
    assert summary(result) == (306, 0, 1, 299, 6)
    assert query("source", "SELECT emp_id, salary, action FROM emp_cdc WHERE action_id > 300") == [
        (2, 99000, "UPDATE")]


def test_an_employee_repeated_across_chunks_ends_as_the_last_line_in_order(pipeline, tmp_path):
    # Chunks of CHUNK_ROWS, split between two connections by emp_id: employees 1 and 2
    # appear many times in more than one chunk. Each chunk writes an employee's last line of it;
    # the chunks' versions follow one another in the file's order.
    rows = CHUNK_ROWS * 2 + 500
    lines = ["emp_id,first_name,last_name,dob,city,salary\n"]
    lines += [f"{index // 1000 % 2 + 1},Repeated,Row,1990-01-01,City,{index}\n" if index % 1000 == 0 else
              f"{index + 10},Other,Row,1990-01-01,City,{index}\n" for index in range(rows)]
    path = tmp_path / "repeated.csv"
    path.write_text("".join(lines))
    assert load(pipeline, path).returncode == 0
    for emp_id in (1, 2):
        last_of_each_chunk = {}
        for index in range(0, rows, 1000):
            if index // 1000 % 2 + 1 == emp_id:
                last_of_each_chunk[index // CHUNK_ROWS] = index
        expected = [(salary,) for _, salary in sorted(last_of_each_chunk.items())]
        assert len(expected) >= 2  # in more than one chunk
        assert query("source", "SELECT salary FROM emp_cdc WHERE emp_id = %s ORDER BY action_id",
                     (emp_id,)) == expected
        assert query("source", "SELECT salary FROM employees WHERE emp_id = %s", (emp_id,)) == expected[-1:]


def test_iso_dates_quotes_and_no_ids_the_source_numbers_them(pipeline, tmp_path):
    query("source", "INSERT INTO employees (emp_id, first_name) VALUES (41, 'Before')")
    path = tmp_path / "new.csv"
    path.write_text('first_name,last_name,dob,city,salary\n'
                    ' Ann , "Lee, Jr.",1990-02-03, "New\tYork" ,\n'
                    'Back\\slash,"Two\nLines",2/3/2002,Oslo, 100\n'
                    '\n'
                    'Bad,Date,1990-13-01,Oslo,1\n')
    result = load(pipeline, path)
    assert result.stderr.splitlines() == [f"{path} line 6: dob: '1990-13-01' is not a valid date"]
    assert summary(result) == (3, 2, 0, 0, 1)
    assert query("source", "SELECT emp_id, first_name, last_name, dob::text, city, salary "
                           "FROM employees WHERE emp_id > 41 ORDER BY emp_id") == [
        (42, "Ann", "Lee, Jr.", "1990-02-03", "New\tYork", None),
        (43, "Back\\slash", "Two\nLines", "2002-02-03", "Oslo", 100)]


def test_a_file_it_cannot_read_is_one_line_and_exit_1(pipeline, tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("Employee ID,Name,Salary\n1,Ann,5\n")
    for target, message in [
            (path, f"Error: {path}: unknown column 'Name' in the header; expected Employee ID "
                   "(optional), First Name, Last Name, Date of Birth, City, Salary"),
            (tmp_path / "missing.csv", f"Error: {tmp_path / 'missing.csv'}: No such file or directory")]:
        result = load(pipeline, target)
        assert (result.returncode, result.stderr.strip()) == (1, message)
    assert cdc_count() == 0


def test_a_million_rows_in_bounded_memory(pipeline, tmp_path):
    """Streamed: peak memory stays what it is for a small file. The rate goes to the
    test's output (pytest -s), measured, not asserted: this machine is shared."""
    path = tmp_path / "million.csv"
    subprocess.run([sys.executable, str(ROOT / "scripts/make_employees_csv.py"), "--rows", "1000000",
                    "--output", str(path)], check=True, capture_output=True, timeout=300)
    result, peak_kib = run_with_peak_kib([sys.executable, str(ROOT / "admin.py"), "load", str(path)],
                                         env=pipeline.env, cwd=ROOT, timeout=600)
    print(f"{result.stdout.strip()}; peak RSS {peak_kib // 1024} MB")
    assert result.returncode == 0, result.stderr
    assert summary(result) == (1_000_006, 1_000_000, 0, 0, 6)
    assert 0 < peak_kib < 100 * 1024
    assert cdc_count() == 1_000_000
