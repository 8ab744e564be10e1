#!/usr/bin/env python3
"""Drain rate of the consumer group: how fast 1, 2, 3... consumers apply a backlog,
with the main topic cut in 3 and in 6 partitions.

Like bench.py it works apart from any running pipeline (databases `cdc_bench`, topics
and groups of its own, removed at the end). For each partition count, the producer
publishes a backlog of --changes inserts and stops; then, for each consumer count, a
fresh group of that many consumer.py applies the whole backlog to an emptied
destination. The rate is the backlog over the time from the first row applied to the
last (the group's start-up is left out).

  .venv/bin/python scripts/scaling.py --changes 200000 --partitions 3 6 --consumers 1 2 3
"""

import argparse
import os
import subprocess
import sys
import uuid
from contextlib import closing, contextmanager
from types import SimpleNamespace

from confluent_kafka.admin import AdminClient, NewTopic

# bench.py, beside this script, also puts the project's modules on sys.path.
from bench import DATABASE, ROOT, connect, create_databases, drop_databases, wait_for

import admin
import config

INSERT_BACKLOG = ("INSERT INTO employees SELECT g, 'First' || g, 'Last', DATE '1990-01-01' + mod(g, 9000), "
                  "'City', g FROM generate_series(1, %s) g")


@contextmanager
def daemons(script, count, env):
    processes = [subprocess.Popen([sys.executable, str(ROOT / script)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, env={**os.environ, **env})
                 for _ in range(count)]
    try:
        yield processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(60)


def fill_backlog(source, env, changes):
    """The producer publishes `changes` inserts, and stops."""
    with daemons("producer.py", 1, env):
        source.execute(INSERT_BACKLOG, (changes,))
        wait_for(source, "SELECT last_action_id FROM cdc_offset", changes, interval=0.1)


def drain_rate(dest, env, consumers, changes):
    """Changes per second that a fresh group of `consumers` applies from the backlog."""
    dest.execute("TRUNCATE employees, cdc_applied")
    group = {**env, "KAFKA_GROUP_ID": f"bench_{uuid.uuid4().hex[:8]}"}
    with daemons("consumer.py", consumers, group):
        first = wait_for(dest, "SELECT count(*) > 0 FROM employees", True, interval=0.05)
        last = wait_for(dest, "SELECT count(*) FROM employees", changes, interval=0.1)
    return changes / (last - first)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_settings(parser, "source", "dest", "kafka")
    parser.add_argument("--changes", type=int, default=200000, help="inserts in the backlog")
    parser.add_argument("--partitions", type=int, nargs="+", default=[3, 6], help="partition counts to try")
    parser.add_argument("--consumers", type=int, nargs="+", default=[1, 2, 3], help="group sizes to try")
    settings = config.resolve(parser.parse_args(argv), "source", "dest", "kafka")

    kafka = AdminClient(config.kafka_config(settings))
    replicas = min(len(kafka.list_topics(timeout=10).brokers), 3)
    bench = SimpleNamespace(**{**vars(settings), "source_db": DATABASE, "dest_db": DATABASE})
    print(f"{settings.changes} changes, {replicas} replica(s) per partition, on {settings.bootstrap_servers}")
    print(f"{'partitions':>10} {'consumers':>10} {'changes/s':>10}")
    for partitions in settings.partitions:
        topic = f"bench_{uuid.uuid4().hex[:8]}"
        topics = [NewTopic(name, count, replicas,
                           config={"min.insync.replicas": str(admin.default_min_insync(replicas))})
                  for name, count in ((topic, partitions), (f"{topic}_dlq", 1))]
        for future in kafka.create_topics(topics).values():
            future.result()
        env = {"SOURCE_DB_NAME": DATABASE, "DEST_DB_NAME": DATABASE, "KAFKA_TOPIC": topic,
               "KAFKA_DLQ_TOPIC": f"{topic}_dlq", "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers}
        try:
            create_databases(settings, bench)
            with closing(connect(bench, "source")) as source_db, closing(connect(bench, "dest")) as dest_db:
                fill_backlog(source_db.cursor(), env, settings.changes)
                for consumers in settings.consumers:
                    rate = drain_rate(dest_db.cursor(), env, consumers, settings.changes)
                    print(f"{partitions:>10} {consumers:>10} {rate:>10,.0f}", flush=True)
        finally:
            for future in kafka.delete_topics([topic.topic for topic in topics]).values():
                future.result()
            drop_databases(settings)
    return 0


if __name__ == "__main__":
    config.run_cli(main)
