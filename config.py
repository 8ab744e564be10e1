"""Settings and clients shared by every script.

Each setting is named once below, with its environment variable, default and help.
A value comes from, in rising order of precedence: the default, a `.env` file in the
working directory, the environment, a command-line flag.
"""

import argparse
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import psycopg2
from confluent_kafka import KafkaException
from dotenv import dotenv_values, find_dotenv


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    default: object
    help: str
    group: str
    kind: type = str
    minimum: float | None = None


def _database_settings(side, port):
    label = {"source": "source", "dest": "destination"}[side] + " PostgreSQL"
    prefix = side.upper()
    return [
        Setting(f"{side}_host", f"{prefix}_DB_HOST", "localhost", f"{label} host", side),
        Setting(f"{side}_port", f"{prefix}_DB_PORT", port, f"{label} port", side, int, 1),
        Setting(f"{side}_user", f"{prefix}_DB_USER", "postgres", f"{label} user", side),
        Setting(f"{side}_password", f"{prefix}_DB_PASSWORD", "postgres",
                f"{label} password (never logged; prefer the environment to a flag)", side),
        Setting(f"{side}_db", f"{prefix}_DB_NAME", "postgres", f"{label} database", side),
    ]


SETTINGS = [
    *_database_settings("source", 5432),
    *_database_settings("dest", 5433),
    Setting("bootstrap_servers", "KAFKA_BOOTSTRAP_SERVERS", "localhost:29092",
            "Kafka bootstrap servers (inside Docker: kafka:9092)", "kafka"),
    Setting("kafka_config", "KAFKA_CONFIG", "",
            "extra librdkafka settings for every Kafka client, as key=value,key=value "
            "(security.protocol=SASL_SSL,... or session.timeout.ms=6000)", "kafka"),
    Setting("topic", "KAFKA_TOPIC", "bf_employee_cdc", "main topic of change events", "kafka"),
    Setting("dlq_topic", "KAFKA_DLQ_TOPIC", "bf_employee_cdc_dlq", "dead letter queue topic", "kafka"),
    Setting("group", "KAFKA_GROUP_ID", "bf_group", "consumer group", "consumer"),
    Setting("instance_id", "KAFKA_GROUP_INSTANCE_ID", "",
            "static group membership: a consumer restarted with the same id gets its "
            "partitions back without a rebalance (empty: dynamic membership)", "consumer"),
    Setting("batch_size", "BATCH_SIZE", 2000,
            "changes per batch: per Kafka flush in the producer, per destination "
            "transaction in the consumer", "daemon", int, 1),
    Setting("poll_interval", "POLL_INTERVAL", 5.0,
            "producer: longest wait in seconds between looks at emp_cdc (a commit "
            "wakes it at once through LISTEN/NOTIFY)", "producer", float, 0.01),
    Setting("producer_metrics_port", "PRODUCER_METRICS_PORT", 0,
            "producer: port of its Prometheus metrics at /metrics (0: not served)",
            "producer", int, 0),
    Setting("cdc_retention_hours", "CDC_RETENTION_HOURS", 168.0,
            "producer: hours a published change stays in emp_cdc before the producer "
            "deletes it (0: as soon as it is published)", "producer", float, 0),
    Setting("max_retries", "MAX_RETRIES", 3,
            "consumer: retries of a batch the destination failed, before the DLQ", "consumer", int, 0),
    Setting("consumer_metrics_port", "CONSUMER_METRICS_PORT", 0,
            "consumer: port of its Prometheus metrics at /metrics (0: not served)",
            "consumer", int, 0),
    Setting("redrive_interval", "REDRIVE_INTERVAL", 5.0,
            "consumer: seconds between looks at a destination that was out of reach; once it "
            "answers, what was parked meanwhile is replayed from the DLQ (0: never, replay by "
            "hand)", "consumer", float, 0),
    Setting("retry_backoff", "RETRY_BACKOFF", 2.0,
            "seconds before the first retry; each further retry waits twice as long",
            "daemon", float, 0),
    Setting("log_level", "LOG_LEVEL", "INFO",
            "INFO gives a line to the first 10 records of a batch, DEBUG to every one", "daemon"),
    Setting("snapshot_chunk", "SNAPSHOT_CHUNK", 5000,
            "admin.py snapshot: rows of employees copied per source transaction", "admin", int, 1),
    Setting("verify_wait", "VERIFY_WAIT", 30.0,
            "admin.py verify: seconds to wait for the changes in flight on differing rows "
            "to be applied before reporting them", "admin", float, 0),
    Setting("status_max_lag", "STATUS_MAX_LAG", 60.0,
            "admin.py status: end-to-end lag in seconds above which the pipeline is "
            "degraded (exit 1)", "admin", float, 0),
    Setting("status_max_dlq", "STATUS_MAX_DLQ", 0,
            "admin.py status: DLQ records not yet replayed above which the pipeline is "
            "degraded (exit 1)", "admin", int, 0),
]


class ConfigError(Exception):
    """A setting with a value that cannot be used; the message names it."""


def add_settings(parser, *groups):
    """Adds a flag for every setting of the given groups to an argparse parser."""
    for setting in SETTINGS:
        if setting.group in groups:
            parser.add_argument(
                "--" + setting.name.replace("_", "-"), dest=setting.name, default=None,
                metavar=setting.kind.__name__.upper(),
                help=f"{setting.help} [{setting.env}, default: {setting.default!r}]")


def resolve(arguments, *groups):
    """The settings of the given groups: flag, else environment, else .env, else default."""
    dotenv_path = find_dotenv(usecwd=True)
    from_file = dotenv_values(dotenv_path) if dotenv_path else {}
    values = {}
    for setting in SETTINGS:
        if setting.group not in groups:
            continue
        flag = getattr(arguments, setting.name, None)
        if flag is not None:
            source, raw = "--" + setting.name.replace("_", "-"), flag
        elif setting.env in os.environ:
            source, raw = setting.env, os.environ[setting.env]
        elif from_file.get(setting.env) is not None:
            source, raw = f"{setting.env} in {dotenv_path}", from_file[setting.env]
        else:
            values[setting.name] = setting.default
            continue
        values[setting.name] = _convert(setting, source, raw)
    resolved = SimpleNamespace(**vars(arguments))
    resolved.__dict__.update(values)
    if "kafka_config" in values:
        resolved.kafka_config = _parse_kafka_config(values["kafka_config"])
    return resolved


def _convert(setting, source, raw):
    try:
        value = setting.kind(raw)
    except ValueError:
        raise ConfigError(f"{source}: {raw!r} is not a valid {setting.kind.__name__}") from None
    if setting.minimum is not None and value < setting.minimum:
        raise ConfigError(f"{source}: {raw!r} is below the minimum of {setting.minimum:g}")
    return value


def _parse_kafka_config(text):
    extra = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f"KAFKA_CONFIG: {item!r} is not key=value")
        extra[key.strip()] = value.strip()
    return extra


def parse_args(description, argv, *groups):
    """For the daemons: a parser with the groups' flags, parsed and resolved."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(parser, *groups)
    return resolve(parser.parse_args(argv), *groups)


def run_daemon(daemon, description, argv, *groups):
    """A daemon's main: its settings, logging, and daemon(settings, stop).run()
    until SIGINT or SIGTERM."""
    settings = parse_args(description, argv, *groups)
    setup_logging(settings.log_level)
    daemon(settings, StopFlag()).run()
    return 0


def run_cli(main):
    """Runs main(); a ConfigError becomes one line on stderr and exit status 1."""
    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(1)


# --- clients ------------------------------------------------------------------

def connect(settings, side, **options):
    """A connection to the source or dest PostgreSQL of the settings."""
    return psycopg2.connect(
        host=getattr(settings, f"{side}_host"), port=getattr(settings, f"{side}_port"),
        user=getattr(settings, f"{side}_user"), password=getattr(settings, f"{side}_password"),
        dbname=getattr(settings, f"{side}_db"), connect_timeout=5, **options)


def database_name(settings, side):
    """Where a database is, for messages: host, port and database, never the password."""
    return (f"{getattr(settings, f'{side}_host')}:{getattr(settings, f'{side}_port')}"
            f"/{getattr(settings, f'{side}_db')}")


def kafka_config(settings, **client_settings):
    """One librdkafka configuration dict: the bootstrap servers, the client's own
    settings, then KAFKA_CONFIG, which wins. librdkafka logs through the "kafka" logger."""
    return {"bootstrap.servers": settings.bootstrap_servers, "logger": KAFKA_LOG,
            **client_settings, **settings.kafka_config}


def producer_config(settings, client_id):
    # acks=all with idempotence: an acknowledged message is on the broker once, and
    # librdkafka's retries keep each partition's order.
    return kafka_config(settings, **{
        "client.id": client_id, "acks": "all", "enable.idempotence": True,
        "linger.ms": 5, "compression.type": "lz4"})


def deliver(producer, topic, messages, stop=None, acknowledged=None):
    """Produces (key, value, headers) messages and waits until Kafka has acknowledged
    or refused every one. Returns the refused ones as (KafkaError, key, value);
    `acknowledged`, if given, is called with each message Kafka took.
    On a stop it gives up waiting: what is not acknowledged yet counts as refused."""
    refused = []

    def on_delivery(error, message):
        if error is not None:
            refused.append((error, message.key(), message.value()))
        elif acknowledged is not None:
            acknowledged(message)

    for key, value, headers in messages:
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=headers,
                                 on_delivery=on_delivery)
                break
            except BufferError:
                # librdkafka's queue is full: serve delivery reports until it drains.
                producer.poll(0.1)
            except KafkaException as error:  # refused before sending: too large, say
                refused.append((error.args[0], key, value))
                break
    while producer.flush(1.0):
        if stop is not None and stop.requested:
            producer.purge()
    return refused


# --- daemons ------------------------------------------------------------------

class _RepeatFilter(logging.Filter):
    """Drops a log line that repeats one of the last 30 seconds, numbers aside:
    librdkafka reports a refused connection every few milliseconds while a broker is down."""

    def __init__(self):
        super().__init__()
        self.last_seen = {}

    def filter(self, record):
        gist = re.sub(r"\d+", "#", record.getMessage())
        now = time.monotonic()
        if now - self.last_seen.get(gist, -60) < 30:
            return False
        self.last_seen[gist] = now
        return True


KAFKA_LOG = logging.getLogger("kafka")
KAFKA_LOG.addFilter(_RepeatFilter())

RECORD_LINES = 10  # records of a batch that get a line each at INFO; DEBUG shows them all


def setup_logging(level_name):
    level = logging.getLevelName(level_name.upper())
    if not isinstance(level, int):
        raise ConfigError(f"LOG_LEVEL: {level_name!r} is not one of DEBUG, INFO, WARNING, ERROR")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")


def logged(logger, records):
    """The records of a batch that get a line each: the first few, or all at DEBUG."""
    return records if logger.isEnabledFor(logging.DEBUG) else records[:RECORD_LINES]


def backoff_delay(settings, attempt):
    """Seconds to wait before retry number `attempt` (1, 2, ...): RETRY_BACKOFF,
    doubling with each retry (2 s, 4 s, 8 s by default), never over a minute."""
    return min(settings.retry_backoff * 2 ** (attempt - 1), 60)


def one_line(error):
    """An exception as one line: database and Kafka errors span several."""
    return re.sub(r"\s+", " ", str(error)).strip() or type(error).__name__


class StopFlag:
    """Set by SIGINT or SIGTERM; a daemon finishes the batch in hand and stops.
    A second signal while it stops exits at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            os._exit(128 + signum)
        self.requested = True
        logging.getLogger().info("Stopping (signal %s); again to stop at once.",
                                 signal.Signals(signum).name)

    def sleep(self, seconds):
        """Sleeps, waking early on a stop; returns whether a stop was requested."""
        deadline = time.monotonic() + seconds
        while not self.requested and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.requested


def check_topics(client, settings, topics, stop):
    """Waits until Kafka answers, then fails with a ConfigError if a topic is missing."""
    while not stop.requested:
        try:
            existing = client.list_topics(timeout=5).topics
        except KafkaException as error:
            logging.getLogger().error("Kafka at %s did not answer (%s); retrying in 5 seconds",
                                      settings.bootstrap_servers, one_line(error))
            stop.sleep(5)
            continue
        for topic in topics:
            if topic not in existing:
                raise ConfigError(f"topic {topic!r} does not exist on this Kafka; "
                                  f"create it with: python admin.py create {topic}")
        return
