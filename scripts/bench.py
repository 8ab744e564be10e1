#!/usr/bin/env python3
"""Benchmark of the pipeline on the running local stack (scripts/stack.sh up).

It works apart from any running pipeline: databases `cdc_bench` on both servers,
topics and a consumer group of its own, its own producer.py and consumer.py, all
removed at the end. It measures

  latency     one row inserted at a time: from the INSERT's commit to the row in
              the destination (median and 95th percentile)
  throughput  N rows inserted in one statement, then updated in one statement:
              changes per second from the commit until the destination has them all

  .venv/bin/python scripts/bench.py --changes 100000 --samples 50
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import config  # noqa: E402  (the project's modules live one folder up)

DATABASE = "cdc_bench"


def connect(settings, side):
    connection = config.connect(settings, side)
    connection.autocommit = True
    return connection


def create_databases(settings, bench):
    for side, init_sql in (("source", "scripts/source/init.sql"), ("dest", "scripts/destination/init.sql")):
        with closing(connect(settings, side)) as admin, admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
            cursor.execute(f"CREATE DATABASE {DATABASE}")
        with closing(connect(bench, side)) as db, db.cursor() as cursor:
            cursor.execute((ROOT / init_sql).read_text())


def drop_databases(settings):
    for side in ("source", "dest"):
        with closing(connect(settings, side)) as admin, admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


def wait_for(cursor, sql, expected, timeout=600, interval=0.001):
    """When the query's value became `expected`, looking every `interval` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        cursor.execute(sql)
        if cursor.fetchone()[0] == expected:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise SystemExit(f"Error: the destination did not get there within {timeout} s")
        time.sleep(interval)


def measure_latency(source, dest, samples):
    seconds = []
    for emp_id in range(1, samples + 1):
        source.execute("INSERT INTO employees VALUES (%s, 'Bench', 'Latency', '1990-01-01', 'X', 1)", (emp_id,))
        committed = time.monotonic()
        arrived = wait_for(dest, f"SELECT count(*) FROM employees WHERE emp_id = {emp_id}", 1, 30)
        seconds.append(arrived - committed)
    seconds.sort()
    return statistics.median(seconds), seconds[int(len(seconds) * 0.95) - 1]


def measure_throughput(source, dest, changes, statement, arrived_sql):
    source.execute(statement, (changes,))
    committed = time.monotonic()
    return changes / (wait_for(dest, arrived_sql, changes) - committed)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_settings(parser, "source", "dest", "kafka")
    parser.add_argument("--changes", type=int, default=100000, help="rows for the throughput runs")
    parser.add_argument("--samples", type=int, default=50, help="single-row inserts for the latency run")
    settings = config.resolve(parser.parse_args(argv), "source", "dest", "kafka")

    run_id = uuid.uuid4().hex[:8]
    topic, dlq_topic = f"bench_{run_id}", f"bench_{run_id}_dlq"
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    for future in admin.create_topics([NewTopic(topic, 3, 1), NewTopic(dlq_topic, 1, 1)]).values():
        future.result()
    # The same servers, the benchmark's own databases.
    bench = SimpleNamespace(**{**vars(settings), "source_db": DATABASE, "dest_db": DATABASE})
    create_databases(settings, bench)
    env = {"SOURCE_DB_NAME": DATABASE, "DEST_DB_NAME": DATABASE, "KAFKA_TOPIC": topic,
           "KAFKA_DLQ_TOPIC": dlq_topic, "KAFKA_GROUP_ID": f"bench_{run_id}",
           "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers}
    daemons = [subprocess.Popen([sys.executable, str(ROOT / script)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, **env})
               for script in ("producer.py", "consumer.py")]
    try:
        with closing(connect(bench, "source")) as source_db, closing(connect(bench, "dest")) as dest_db:
            source, dest = source_db.cursor(), dest_db.cursor()
            source.execute("INSERT INTO employees VALUES (0, 'Warm', 'Up', NULL, NULL, 0)")
            wait_for(dest, "SELECT count(*) FROM employees", 1, 60)
            median, p95 = measure_latency(source, dest, settings.samples)
            print(f"latency     {settings.samples} single-row inserts: median {median * 1000:.1f} ms, "
                  f"p95 {p95 * 1000:.1f} ms")
            source.execute("TRUNCATE employees")
            wait_for(dest, "SELECT count(*) FROM employees", 0)
            rate = measure_throughput(
                source, dest, settings.changes,
                "INSERT INTO employees SELECT g, 'First' || g, 'Last', DATE '1990-01-01' + mod(g, 9000), "
                "'City', g FROM generate_series(1, %s) g", "SELECT count(*) FROM employees")
            print(f"throughput  {settings.changes} inserts in one statement: {rate:,.0f} changes/s")
            rate = measure_throughput(
                source, dest, settings.changes,
                "UPDATE employees SET salary = -salary WHERE emp_id <= %s",
                "SELECT count(*) FROM employees WHERE salary < 0")
            print(f"throughput  {settings.changes} updates in one statement: {rate:,.0f} changes/s")
    finally:
        for daemon in daemons:
            daemon.terminate()
            daemon.wait(30)
        for future in admin.delete_topics([topic, dlq_topic]).values():
            future.result()
        drop_databases(settings)
    return 0


if __name__ == "__main__":
    config.run_cli(main)
