#!/usr/bin/env python3
"""Administration of the CDC pipeline: topics, the consumer group, the DLQ, the
initial snapshot, verification and status.

  python admin.py                          list the topics (as `list`)
  python admin.py create                   create bf_employee_cdc (3 partitions) and
                                           bf_employee_cdc_dlq (1 partition)
  python admin.py create my_topic --partitions 6
  python admin.py describe bf_employee_cdc partitions, leaders, offsets
  python admin.py delete my_topic --yes
  python admin.py group                    bf_group: members, committed offset and lag
  python admin.py dlq list --key 103       DLQ records, newest first
  python admin.py dlq count --error connection
  python admin.py dlq replay               republish what is not yet replayed
  python admin.py load employees.csv       load employees from a CSV file into the source
  python admin.py renumber-source          after the source was restored, re-created or
                                           failed over (the producer says when)
  python admin.py snapshot                 copy the rows that predate capture
  python admin.py verify [--repair]        compare the source and the destination
  python admin.py status [--json]          the whole pipeline on one screen

`dlq replay` marks what it republished with marker records in the DLQ itself (ranges
of offsets), so a second replay does not send it again. Replaying is safe at any time: the consumer
skips a change older than the one it already applied.
"""

import argparse
import sys
import time

import psycopg2
from confluent_kafka import (ConsumerGroupTopicPartitions, KafkaError,
                             KafkaException, Producer, TopicPartition)
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, OffsetSpec

import config
import dlq
import loader
import producer
import replay
import snapshot
import source_rewind
import status
import verify

TIMEOUT = 10  # seconds for any answer from Kafka
SETTING_GROUPS = ("kafka", "group", "source", "dest", "admin")


# --- topics -----------------------------------------------------------------------

def list_topics(admin, settings):
    topics = admin.list_topics(timeout=TIMEOUT).topics
    print(f"Topics on {settings.bootstrap_servers}:")
    for name in sorted(topics):
        if settings.all or not name.startswith("__"):
            count = len(topics[name].partitions)
            print(f"  {name} ({count} partition{'s' * (count != 1)})")


def contract_partitions(settings):
    """The topics `create` makes when none is named, with their partitions."""
    return {settings.topic: 3, settings.dlq_topic: 1}


def create_topics(admin, settings):
    default_topics = contract_partitions(settings)
    names = settings.topics or list(default_topics)
    replicas = settings.replication_factor or min(len(admin.list_topics(timeout=TIMEOUT).brokers), 3)
    min_insync = settings.min_insync_replicas or default_min_insync(replicas)
    new_topics = [NewTopic(name, settings.partitions or default_topics.get(name, 1), replicas,
                           config={"min.insync.replicas": str(min_insync)}) for name in names]
    failed = False
    for topic in new_topics:
        future = admin.create_topics([topic], request_timeout=TIMEOUT)[topic.topic]
        try:
            future.result()
            print(f"Created topic {topic.topic} ({topic.num_partitions} partitions, "
                  f"replication factor {replicas}, min.insync.replicas {min_insync})")
        except KafkaException as error:
            if error.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                print(f"Topic {topic.topic} already exists")
            else:
                print(f"Error: topic {topic.topic}: {error.args[0].str()}", file=sys.stderr)
                failed = True
    return 1 if failed else 0


def default_min_insync(replicas):
    """With 3 replicas or more, an acknowledged write is on 2 of them, so one broker
    may die without losing it, and one may be down without stopping the writes."""
    return 2 if replicas >= 3 else 1


def describe_topics(admin, settings):
    topics = admin.list_topics(timeout=TIMEOUT).topics
    for name in settings.topics or [settings.topic, settings.dlq_topic]:
        if name not in topics:
            raise config.ConfigError(f"topic {name!r} does not exist")
        partitions = sorted(topics[name].partitions.values(), key=lambda p: p.id)
        earliest = _offsets(admin, name, partitions, OffsetSpec.earliest())
        latest = _offsets(admin, name, partitions, OffsetSpec.latest())
        print(f"Topic: {name}  partitions: {len(partitions)}  "
              f"replication factor: {len(partitions[0].replicas)}  "
              f"min.insync.replicas: {_topic_setting(admin, name, 'min.insync.replicas')}  "
              f"messages: {sum(latest[p.id] - earliest[p.id] for p in partitions)}")
        for p in partitions:
            print(f"  partition {p.id}: leader {p.leader}, replicas {p.replicas}, isr {p.isrs}, "
                  f"offsets {earliest[p.id]}..{latest[p.id]}"
                  + ("  UNDER-REPLICATED" if len(p.isrs) < len(p.replicas) else ""))


def _topic_setting(admin, topic, key):
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = admin.describe_configs([resource], request_timeout=TIMEOUT)[resource].result()
    return entries[key].value


def _offsets(admin, topic, partitions, spec):
    futures = admin.list_offsets({TopicPartition(topic, p.id): spec for p in partitions},
                                 request_timeout=TIMEOUT)
    return {tp.partition: future.result().offset for tp, future in futures.items()}


def delete_topics(admin, settings):
    if not settings.yes:
        raise config.ConfigError(f"deleting {', '.join(settings.topics)} loses every message in it; "
                                 "add --yes to go ahead")
    for name, future in admin.delete_topics(settings.topics, request_timeout=TIMEOUT).items():
        future.result()
        print(f"Deleted topic {name}")


# --- consumer group -----------------------------------------------------------------

def describe_group(admin, settings):
    name = settings.group_name or settings.group
    description = admin.describe_consumer_groups([name], request_timeout=TIMEOUT)[name].result()
    committed = admin.list_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(name)], request_timeout=TIMEOUT)[name].result().topic_partitions
    owners = {(tp.topic, tp.partition): member.client_id
              for member in description.members for tp in member.assignment.topic_partitions}
    committed_at = {(tp.topic, tp.partition): tp.offset for tp in committed}
    partitions = sorted(set(owners) | set(committed_at))
    if not partitions:
        raise config.ConfigError(f"consumer group {name!r} has no members and no committed offsets")
    ends = admin.list_offsets({TopicPartition(*tp): OffsetSpec.latest() for tp in partitions},
                              request_timeout=TIMEOUT)
    end_at = {(tp.topic, tp.partition): future.result().offset for tp, future in ends.items()}
    print(f"Consumer group: {name}  state: {description.state.name}  "
          f"members: {len(description.members)}")
    print(f"{'TOPIC':<28} {'PARTITION':>9} {'COMMITTED':>10} {'END':>10} {'LAG':>8}  MEMBER")
    for topic, partition in partitions:
        offset = committed_at.get((topic, partition), -1)
        end = end_at[(topic, partition)]
        shown, lag = (offset, end - offset) if offset >= 0 else ("-", "-")
        print(f"{topic:<28} {partition:>9} {shown:>10} {end:>10} {lag:>8}  "
              f"{owners.get((topic, partition), '-')}")


# --- source -------------------------------------------------------------------------

def renumber_source(admin, settings):
    try:
        count, first, last = source_rewind.renumber(settings, producer.PRODUCER_LOCK)
    except psycopg2.Error as error:
        raise config.ConfigError(f"source database {config.database_name(settings, 'source')}: "
                                 f"{config.one_line(error)}") from None
    print(f"Renumbered the {count} changes of emp_cdc as action_id {first}..{last}, above every "
          f"one on {settings.topic}; the producer publishes them again when it starts.")


# --- DLQ ----------------------------------------------------------------------------

def _matches(entry, settings):
    record = entry.record or {}
    if settings.key is not None and record.get("original_key") != settings.key:
        return False
    searched = f"{record.get('error', '')} {entry.headers.get(dlq.ERROR_CLASS, '')}".lower()
    return settings.error is None or settings.error.lower() in searched


def _selected(entries, replayed, settings):
    return (entry for entry in entries if _matches(entry, settings)
            and (settings.all or entry.position not in replayed))


def dlq_list(admin, settings):
    # Counted as the DLQ is read, then shown newest first from a second reading that
    # keeps each record's lines, not the record: holding every record it showed, a
    # listing of 1,500 records of 100 KB took 393 MB.
    with replay.read_dlq(settings) as (replayed, entries):
        shown, count = replay.Positions(settings.limit), 0
        for entry in _selected(entries, replayed, settings):
            shown.append(entry.position)
            count += 1
    print(f"{count} DLQ record(s) in {settings.dlq_topic}"
          + ("" if settings.all else " not yet replayed (--all shows those too)"))
    for lines in replay.read_newest_first(settings, shown,
                                          lambda entry: _entry_lines(entry, entry.position in replayed)):
        print()
        print(lines)


def _entry_lines(entry, was_replayed):
    record = entry.record
    if record is None:
        return f"[{entry.partition}] offset {entry.offset}: not a DLQ record: {(entry.value or b'')[:200]!r}"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("timestamp") or 0))
    headers = entry.headers
    origin = (f"{record['original_topic']} [{record['partition']}] at offset {record['offset']}"
              if record.get("offset") is not None else f"{record['original_topic']} (never published)")
    value = record.get("original_value")
    return "\n".join([
        f"[{entry.partition}] offset {entry.offset}  {when}  key={record.get('original_key')}"
        f"  {headers.get(dlq.STAGE, '?')}, {headers.get(dlq.ATTEMPTS, '?')} attempt(s), "
        f"{headers.get(dlq.ERROR_CLASS, '?')}" + ("  (replayed)" if was_replayed else ""),
        f"    from:  {origin}",
        f"    error: {record.get('error')}",
        f"    value: {value if value is None or len(value) <= 200 else value[:200] + '...'}"])


def dlq_count(admin, settings):
    with replay.read_dlq(settings) as (replayed, entries):
        print(sum(1 for _ in _selected(entries, replayed, settings)))


def dlq_replay(admin, settings):
    producer = Producer(config.producer_config(settings, "cdc-admin-replay"))
    with replay.read_dlq(settings) as (replayed, entries):
        count = replay.replay(settings, producer, (
            entry for entry in _selected(entries, replayed, settings) if entry.record is not None))
    if not count:
        print(f"Nothing to replay from {settings.dlq_topic}.")
        return 0
    print(f"Replayed {count} messages from {settings.dlq_topic} to {settings.topic}.")
    return 0


# --- loading -------------------------------------------------------------------------

def load_employees(admin, settings):
    return loader.load(settings, settings.file)


# --- snapshot, verify, status ----------------------------------------------------------

def take_snapshot(admin, settings):
    return snapshot.run(settings)


def verify_tables(admin, settings):
    return verify.run(settings)


def show_status(admin, settings):
    return status.run(settings)


# --- command line -------------------------------------------------------------------

def add_command(commands, name, run, help_text):
    """A subcommand whose help, in the list and on its own page, carries an example."""
    command = commands.add_parser(name, help=help_text, description=help_text)
    command.set_defaults(run=run)
    return command


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_settings(parser, *SETTING_GROUPS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    command = add_command(commands, "list", list_topics, "list the topics  (python admin.py list --all)")
    command.add_argument("--all", action="store_true", help="include Kafka's internal topics")

    command = add_command(commands, "create", create_topics, "create topics  (python admin.py create)")
    command.add_argument("topics", nargs="*", metavar="TOPIC",
                         help="topics to create (default: the main topic and the DLQ)")
    command.add_argument("--partitions", type=int,
                         help="partitions (default: 3 for the main topic, 1 otherwise)")
    command.add_argument("--replication-factor", type=int,
                         help="copies of each partition, one per broker (default: as many as "
                              "there are brokers, at most 3)")
    command.add_argument("--min-insync-replicas", type=int,
                         help="copies a write must reach before it is acknowledged "
                              "(default: 2 with 3 replicas or more, else 1)")

    command = add_command(commands, "describe", describe_topics,
                          "partitions and offsets  (python admin.py describe bf_employee_cdc)")
    command.add_argument("topics", nargs="*", metavar="TOPIC",
                         help="topics (default: the main topic and the DLQ)")

    command = add_command(commands, "delete", delete_topics,
                          "delete topics  (python admin.py delete old_topic --yes)")
    command.add_argument("topics", nargs="+", metavar="TOPIC")
    command.add_argument("--yes", action="store_true", help="confirm: the messages are lost")

    command = add_command(commands, "group", describe_group,
                          "consumer group members, offsets, lag  (python admin.py group bf_group)")
    command.add_argument("group_name", nargs="?", metavar="GROUP",
                         help="group (default: --group, KAFKA_GROUP_ID)")

    command = add_command(commands, "snapshot", take_snapshot,
                          "copy the rows that predate capture  (python admin.py snapshot)")
    command.add_argument("--restart", action="store_true",
                         help="take a new snapshot even if one finished before")

    command = add_command(commands, "verify", verify_tables,
                          "compare the source's and the destination's employees; exit 1 if they "
                          "differ  (python admin.py verify --repair)")
    command.add_argument("--repair", action="store_true",
                         help="re-emit the source's current row of each differing emp_id")

    add_command(commands, "renumber-source", renumber_source,
                "source went back in time: renumber, republish  (python admin.py renumber-source)")

    command = add_command(commands, "status", show_status,
                          "the pipeline on one screen, exit 0/1/2  (python admin.py status --json)")
    command.add_argument("--json", action="store_true", help="print the report as JSON")

    dlq_command = commands.add_parser("dlq", help="inspect and replay the DLQ  (python admin.py dlq list)",
                                      description="inspect and replay the DLQ  (python admin.py dlq list)")
    dlq_commands = dlq_command.add_subparsers(dest="dlq_command", metavar="DLQ_COMMAND", required=True)
    for name, run, help_text in (
            ("list", dlq_list, "records, newest first  (python admin.py dlq list --key 103)"),
            ("count", dlq_count, "how many records  (python admin.py dlq count --error json)"),
            ("replay", dlq_replay, "republish to the main topic  (python admin.py dlq replay --key 103)")):
        command = add_command(dlq_commands, name, run, help_text)
        command.add_argument("--key", help="only records whose original key is KEY")
        command.add_argument("--error", metavar="TEXT",
                             help="only records whose error or error class contains TEXT")
        command.add_argument("--all", action="store_true", help="include records already replayed")
        if name == "list":
            command.add_argument("--limit", type=int, help="only the newest N")

    command = add_command(commands, "load", load_employees,
                          "load employees from a CSV file into the source, each row captured "
                          "and replicated  (python admin.py load employees.csv)")
    command.add_argument("file", metavar="FILE",
                         help="CSV with the seed's header (Employee ID,First Name,Last Name,"
                              "Date of Birth,City,Salary) or the column names")

    parser.set_defaults(run=list_topics, all=False)
    return parser


def main(argv):
    arguments = build_parser().parse_args(argv)
    config.KAFKA_LOG.disabled = True  # a failure is reported once, as one line
    settings = config.resolve(arguments, *SETTING_GROUPS)
    admin = AdminClient(config.kafka_config(settings))
    try:
        return settings.run(admin, settings) or 0
    except KafkaException as error:
        admin.poll(0)  # serves the error callback, which raises on refused credentials
        raise config.ConfigError(f"Kafka at {settings.bootstrap_servers}: "
                                 f"{config.one_line(error)}") from None
    except psycopg2.Error as error:
        raise config.ConfigError(config.one_line(error)) from None
    except replay.ReplayError as error:
        raise config.ConfigError(str(error)) from None
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    config.run_cli(main)
