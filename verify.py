"""Compares the source's and the destination's employees (`admin.py verify`).

Each database sums the hashes of its rows per range of emp_ids, so only one line per
range crosses the network; a range whose count or sum differs is narrowed to its rows
by their hashes. A differing row whose newest change in emp_cdc is not yet applied in
the destination (cdc_applied) is in flight: it is checked again once the pipeline has
applied that change, or VERIFY_WAIT has passed, and reported only if it still differs.
`--repair` re-emits the source's current row of each differing emp_id through emp_cdc
(or a DELETE, for an emp_id the source no longer has), so the version gate and the
per-employee order hold for the repair as for any change.
"""

import time
from concurrent.futures import ThreadPoolExecutor

import config

RANGE = 1000  # emp_ids per checksum range: a thousand rows at most to narrow one down

# The row as text, with its columns named, so both sides hash the same thing
# whatever the column order of their tables.
ROW_HASH = "hashtextextended(ROW(emp_id, first_name, last_name, dob, city, salary)::text, 0)"

RANGE_SUMS = f"""
SELECT emp_id / %(range)s, count(*), sum({ROW_HASH})
FROM employees GROUP BY 1
"""

ROW_HASHES_IN_RANGES = f"""
SELECT emp_id, {ROW_HASH} FROM employees WHERE emp_id / %(range)s = ANY(%(ranges)s)
"""

ROW_HASHES_OF_KEYS = f"SELECT emp_id, {ROW_HASH} FROM employees WHERE emp_id = ANY(%(keys)s)"

# The newest change of each key the source has logged, and the newest the
# destination has applied: a key whose newest change is not applied yet is in flight.
NEWEST_LOGGED = "SELECT emp_id, max(action_id) FROM emp_cdc WHERE emp_id = ANY(%(keys)s) GROUP BY emp_id"
NEWEST_APPLIED = "SELECT emp_id, last_action_id FROM cdc_applied WHERE emp_id = ANY(%(keys)s)"

# The repair: an UPDATE that changes nothing fires the capture trigger, which logs
# the row as it is now; an emp_id gone from the source gets a DELETE of its own.
REEMIT_PRESENT = "UPDATE employees SET emp_id = emp_id WHERE emp_id = ANY(%(keys)s)"
REEMIT_ABSENT = """
INSERT INTO emp_cdc (emp_id, action)
SELECT emp_id, 'DELETE' FROM unnest(%(keys)s::int[]) AS gone(emp_id)
WHERE NOT EXISTS (SELECT FROM employees WHERE employees.emp_id = gone.emp_id)
ORDER BY emp_id
"""

RECHECK_EVERY = 0.5  # seconds between looks at the changes in flight


class Sides:
    """A connection to each database; a query runs on both at once."""

    def __init__(self, settings):
        options = "-c DateStyle=ISO"  # dates hash alike whatever each server's default
        self.connections = {side: config.connect(settings, side, application_name="cdc-verify",
                                                 options=options)
                            for side in ("source", "dest")}
        for connection in self.connections.values():
            connection.autocommit = True
        self.pool = ThreadPoolExecutor(2)

    def query(self, sql, params=None):
        """{side: rows} of one query run on both databases."""
        futures = {side: self.pool.submit(_rows, connection, sql, params)
                   for side, connection in self.connections.items()}
        return {side: future.result() for side, future in futures.items()}

    def close(self):
        self.pool.shutdown()
        for connection in self.connections.values():
            connection.close()


def _rows(connection, sql, params):
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def run(settings):
    started = time.monotonic()
    sides = Sides(settings)
    try:
        sums = sides.query(RANGE_SUMS, {"range": RANGE})
        source_rows = sum(count for _, count, _ in sums["source"])
        differing_ranges = _differing(*(dict((r, (c, s)) for r, c, s in sums[side])
                                        for side in ("source", "dest")))
        keys = _differing_keys(sides, ROW_HASHES_IN_RANGES,
                               {"range": RANGE, "ranges": sorted(differing_ranges)})
        keys = _settled(sides, keys, settings.verify_wait)
        differences = _classify(sides, keys)
        keys = [key for kind in differences.values() for key in kind]
        if settings.repair and keys:
            _repair(sides.connections["source"], sorted(keys))
    finally:
        sides.close()
    elapsed = time.monotonic() - started
    if not keys:
        print(f"Equal: {source_rows:,} rows in the source and the destination "
              f"(checked in {elapsed:.1f} s).")
        return 0
    for kind, meaning in (("missing", "in the source, not in the destination"),
                          ("extra", "in the destination, not in the source"),
                          ("changed", "in both, with different values")):
        for emp_id in differences[kind]:
            print(f"{kind:<8} {emp_id}  ({meaning})")
    print(f"Differ: {len(differences['missing'])} missing, {len(differences['extra'])} extra, "
          f"{len(differences['changed'])} changed, of {source_rows:,} source rows "
          f"(checked in {elapsed:.1f} s).")
    if settings.repair:
        print(f"Repair: re-emitted {len(keys)} emp_id(s) through emp_cdc; the pipeline applies "
              "them (run admin.py verify again to see them equal).")
    return 1


def _differing(source, dest):
    """The keys whose values differ between two dicts, either missing counting."""
    return {key for key in source.keys() | dest.keys() if source.get(key) != dest.get(key)}


def _differing_keys(sides, sql, params):
    rows = sides.query(sql, params)
    return _differing(dict(rows["source"]), dict(rows["dest"]))


def _settled(sides, keys, wait):
    """The keys that still differ once the changes in flight on them are applied,
    or once `wait` seconds have passed."""
    deadline = time.monotonic() + wait
    while keys:
        logged = dict(_rows(sides.connections["source"], NEWEST_LOGGED, {"keys": sorted(keys)}))
        applied = dict(_rows(sides.connections["dest"], NEWEST_APPLIED, {"keys": sorted(keys)}))
        in_flight = {key for key in keys if logged.get(key, 0) > applied.get(key, 0)}
        if not in_flight or time.monotonic() >= deadline:
            return keys
        time.sleep(RECHECK_EVERY)
        keys = _differing_keys(sides, ROW_HASHES_OF_KEYS, {"keys": sorted(keys)})
    return keys


def _classify(sides, keys):
    rows = sides.query(ROW_HASHES_OF_KEYS, {"keys": sorted(keys)})
    source, dest = (dict(rows[side]) for side in ("source", "dest"))
    return {"missing": sorted(key for key in keys if key in source and key not in dest),
            "extra": sorted(key for key in keys if key in dest and key not in source),
            "changed": sorted(key for key in keys if key in source and key in dest
                              and source[key] != dest[key])}


def _repair(source, keys):
    with source.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute(REEMIT_PRESENT, {"keys": keys})
        cursor.execute(REEMIT_ABSENT, {"keys": keys})
        cursor.execute("COMMIT")
