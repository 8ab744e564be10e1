#!/usr/bin/env python3
"""Writes a CSV of employees in the seed's format, for `python admin.py load`.

  python scripts/make_employees_csv.py                          employees.csv, 300 rows
  python scripts/make_employees_csv.py --rows 1000000 --output /tmp/big.csv

The seed's header and M/D/YYYY dates, a space before some salaries, and the same rows
every time (a fixed random seed). BAD_ROWS, wrong on purpose, go in at fixed lines,
as far as the file reaches; the README's sample output and the tests name them.
"""

import argparse
import csv
import random
import sys

HEADER = ["Employee ID", "First Name", "Last Name", "Date of Birth", "City", "Salary"]
FIRST_NAMES = ["James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda",
               "David", "Elizabeth", "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica",
               "Thomas", "Sarah", "Charles", "Karen", "Ana", "Wei", "Fatima", "José", "Zoë"]
LAST_NAMES = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis",
              "Rodriguez", "Martinez", "Hernandez", "Lopez", "Wilson", "Anderson", "Thomas",
              "Taylor", "Moore", "Jackson", "Martin", "Lee", "O'Brien", "Nguyen", "Müller"]
CITIES = ["New York", "Los Angeles", "Chicago", "Houston", "Phoenix", "Philadelphia",
          "San Antonio", "San Diego", "Dallas", "Seattle", "Boston", "Denver", "Portland"]

# (after how many good rows, the row): each wrong in one way.
BAD_ROWS = [
    (17, ["", "Ann", "Nobody", "4/5/1991", "Chicago", "61000"]),
    (42, ["9001", "Bob", "Builder", "2/30/1985", "Denver", "58000"]),
    (99, ["9002", "Carla", "Cash", "7/14/1979", "Boston", "seventy thousand"]),
    (150, ["9003", "Dan", "Short", "3/3/1990", "Phoenix"]),
    (211, ["A212", "Eve", "Letter", "12/1/1988", "Dallas", "72000"]),
    (260, ["9004", "Finn", "Format", "1990.05.12", "Seattle", "66000"]),
]


def employee(emp_id, rng):
    born = f"{rng.randint(1, 12)}/{rng.randint(1, 28)}/{rng.randint(1960, 2004)}"
    salary = rng.randrange(40_000, 150_000, 500)
    # The seed's file has a space before some salaries.
    return [str(emp_id), rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES), born,
            rng.choice(CITIES), f" {salary}" if rng.random() < 0.2 else str(salary)]


def write(output, rows):
    rng = random.Random(13)
    bad_after = dict(BAD_ROWS)
    writer = csv.writer(output, lineterminator="\n")
    writer.writerow(HEADER)
    for number in range(rows):
        if number in bad_after:
            writer.writerow(bad_after[number])
        writer.writerow(employee(number + 1, rng))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300, help="good rows (default: 300)")
    parser.add_argument("--output", default="employees.csv", help="file to write (default: employees.csv)")
    arguments = parser.parse_args(argv)
    with open(arguments.output, "w", encoding="utf-8", newline="") as output:
        write(output, arguments.rows)
    print(f"Wrote {arguments.output}: {arguments.rows:,} employees and "
          f"{sum(after < arguments.rows for after, _ in BAD_ROWS)} bad rows")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
