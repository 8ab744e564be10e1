"""Settings and clients shared by every script.

Each setting is named once below, with its environment variable, default and help.
A value comes from, in rising order of precedence: the default, a `.env` file in the
working directory (never a parent folder's), the environment, a command-line flag.
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
from confluent_kafka import KafkaError, KafkaException
from dotenv import dotenv_values


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    default: object
    help: str
    group: str
    kind: type = str
    minimum: float | None = None
    secret: bool = False  # a password: also read from the file ENV_FILE names, warned of as a flag


def _database_settings(side, port):
    label = {"source": "source", "dest": "destination"}[side] + " PostgreSQL"
    prefix = side.upper()
    return [
        Setting(f"{side}_host", f"{prefix}_DB_HOST", "localhost", f"{label} host", side),
        Setting(f"{side}_port", f"{prefix}_DB_PORT", port, f"{label} port", side, int, 1),
        Setting(f"{side}_user", f"{prefix}_DB_USER", "postgres", f"{label} user", side),
        Setting(f"{side}_password", f"{prefix}_DB_PASSWORD", "postgres",
                f"{label} password (never logged; {prefix}_DB_PASSWORD_FILE names a file "
                "holding it instead; a flag is visible to other users)", side, secret=True),
        Setting(f"{side}_db", f"{prefix}_DB_NAME", "postgres", f"{label} database", side),
        Setting(f"{side}_sslmode", f"{prefix}_DB_SSLMODE", "prefer",
                f"{label} TLS: disable, prefer (TLS if the server offers it, unverified), "
                "require, verify-ca or verify-full (the certificate names the host)", side),
        Setting(f"{side}_sslrootcert", f"{prefix}_DB_SSLROOTCERT", "",
                f"{label} TLS: the CA certificate file that verifies the server's", side),
        Setting(f"{side}_sslcert", f"{prefix}_DB_SSLCERT", "",
                f"{label} TLS: a client certificate file, for a server that asks for one", side),
        Setting(f"{side}_sslkey", f"{prefix}_DB_SSLKEY", "",
                f"{label} TLS: the client certificate's private key file", side),
    ]


SETTINGS = [
    *_database_settings("source", 5432),
    *_database_settings("dest", 5433),
    Setting("bootstrap_servers", "KAFKA_BOOTSTRAP_SERVERS", "localhost:29092",
            "Kafka bootstrap servers (inside Docker: kafka:9092)", "kafka"),
    Setting("kafka_config", "KAFKA_CONFIG", "",
            "extra librdkafka settings for every Kafka client, as key=value,key=value "
            "(session.timeout.ms=6000); a value with a comma goes in KAFKA_CONFIG_FILE", "kafka"),
    Setting("kafka_config_file", "KAFKA_CONFIG_FILE", "",
            "a librdkafka properties file, key=value lines as Kafka's own tools take "
            "(security.protocol, sasl.password, ...); KAFKA_CONFIG wins over it", "kafka"),
    Setting("sasl_username", "KAFKA_SASL_USERNAME", "",
            "Kafka SASL user, for security.protocol=SASL_SSL and a sasl.mechanism in KAFKA_CONFIG "
            "(empty: no SASL)", "kafka"),
    Setting("sasl_password", "KAFKA_SASL_PASSWORD", "",
            "Kafka SASL password (never logged; KAFKA_SASL_PASSWORD_FILE names a file holding it "
            "instead; a flag is visible to other users)", "kafka", secret=True),
    Setting("topic", "KAFKA_TOPIC", "bf_employee_cdc", "main topic of change events", "kafka"),
    Setting("dlq_topic", "KAFKA_DLQ_TOPIC", "bf_employee_cdc_dlq", "dead letter queue topic", "kafka"),
    Setting("group", "KAFKA_GROUP_ID", "bf_group", "consumer group", "group"),
    Setting("instance_id", "KAFKA_GROUP_INSTANCE_ID", "",
            "static group membership: a consumer restarted with the same id gets its "
            "partitions back without a rebalance (empty: dynamic membership)", "consumer"),
    Setting("batch_size", "BATCH_SIZE", 2000,
            "changes per batch: per Kafka flush in the producer, per destination "
            "transaction in the consumer", "daemon", int, 1),
    Setting("poll_interval", "POLL_INTERVAL", 0.1,
            "producer: longest wait in seconds between looks at emp_cdc for commits "
            "(1 ms after an empty look, growing while idle up to this)", "producer", float, 0.001),
    Setting("producer_metrics_port", "PRODUCER_METRICS_PORT", 0,
            "producer: port of its Prometheus metrics at /metrics (0: not served)",
            "producer", int, 0),
    Setting("cdc_retention_hours", "CDC_RETENTION_HOURS", 168.0,
            "producer: hours a published change stays in emp_cdc before the producer "
            "deletes it (0: as soon as it is published)", "producer", float, 0),
    Setting("max_retries", "MAX_RETRIES", 3,
            "consumer: retries of a batch the destination failed, before the DLQ", "consumer", int, 0),
    Setting("apply_connections", "APPLY_CONNECTIONS", 2,
            "consumer: connections to the destination that apply successive batches side "
            "by side", "consumer", int, 1),
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
            "INFO gives a line to the first 10 records of a batch, up to 100 records a second; "
            "DEBUG to every one", "daemon"),
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
    dotenv_path = os.path.join(os.getcwd(), ".env")
    from_file = dotenv_values(dotenv_path) if os.path.isfile(dotenv_path) else {}
    values = {}
    for setting in SETTINGS:
        if setting.group not in groups:
            continue
        flag = getattr(arguments, setting.name, None)
        if flag is not None:
            source, raw = "--" + setting.name.replace("_", "-"), flag
            if setting.secret:
                print(f"Warning: {source} on the command line is visible to other users of this "
                      f"machine (ps); prefer {setting.env}_FILE or the environment", file=sys.stderr)
        elif found := _lookup(setting, os.environ, ""):
            source, raw = found
        elif found := _lookup(setting, from_file, f" in {dotenv_path}"):
            source, raw = found
        else:
            values[setting.name] = setting.default
            continue
        values[setting.name] = _convert(setting, source, raw)
    resolved = SimpleNamespace(**vars(arguments))
    resolved.__dict__.update(values)
    if "kafka_config" in values:
        resolved.kafka_config = {**_read_kafka_config_file(values["kafka_config_file"]),
                                 **_parse_kafka_config(values["kafka_config"])}
    return resolved


def _lookup(setting, variables, where):
    """(source, raw value) of a setting in the environment or .env, or None. A secret
    may instead name a file that holds it in ENV_FILE (Docker's secrets convention)."""
    file_variable = setting.env + "_FILE"
    if setting.secret and variables.get(file_variable) is not None:
        if variables.get(setting.env) is not None:
            raise ConfigError(f"{setting.env} and {file_variable}{where} are both set; give one")
        return f"{file_variable}{where}", _read_secret(file_variable, variables[file_variable])
    if variables.get(setting.env) is not None:
        return f"{setting.env}{where}", variables[setting.env]
    return None


def _read_secret(file_variable, path):
    try:
        with open(path, encoding="utf-8") as secret_file:
            return secret_file.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{file_variable}: cannot read {path!r} "
                          f"({getattr(error, 'strerror', None) or error})") from None


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
    for number, item in enumerate(filter(None, (part.strip() for part in text.split(","))), 1):
        # No item is shown: a comma inside a password would cut it, and show the rest.
        where = f"KAFKA_CONFIG: item {number}"
        extra.update(_key_value(item, where))
        if _SECRET_KEY.search(item.partition("=")[0]):
            raise ConfigError(f"{where} may hold a secret, which belongs in KAFKA_CONFIG_FILE")
    return extra


def _read_kafka_config_file(path):
    """The settings of a properties file as Kafka's tools read one: `key=value`,
    `key: value` or `key value` lines; # and ! start a comment line."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"KAFKA_CONFIG_FILE: cannot read {path}: "
                          f"{getattr(error, 'strerror', None) or error.reason}") from None
    extra = {}
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith(("#", "!")):
            match = _PROPERTY.fullmatch(line)
            if not match:
                raise ConfigError(f"KAFKA_CONFIG_FILE {path} line {number} is not key=value")
            extra[match["key"]] = match["value"]
    return extra


# A key ends at the first '=', ':' or blank; the value is the rest, trimmed.
_PROPERTY = re.compile(r"\s*(?P<key>[^=:\s]+)\s*[=:]?\s*(?P<value>.*?)\s*")


# librdkafka keys whose values may be secrets (sasl.password, ssl.key.password,
# sasl.oauthbearer.client.secret, sasl.jaas.config, ssl.key.pem, ...).
_SECRET_KEY = re.compile(r"password|secret|token|jaas|(^|\.)key(\.pem)?$", re.IGNORECASE)


def _key_value(item, where):
    key, separator, value = item.partition("=")
    if not separator or not key.strip():
        raise ConfigError(f"{where} is not key=value")
    return {key.strip(): value.strip()}


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

# TCP keepalives and a user timeout, both ends, so that a connection to a machine that
# vanished (power cut, network gone) ends within about 40 seconds, not the kernel's two
# hours: the server then ends the session and frees its locks (the producer lock), and
# the client learns its server is gone. Idle 20 s, then 4 probes 5 s apart; the user
# timeout covers a connection with data in flight, which keepalives do not probe.
KEEPALIVE = {"keepalives": 1, "keepalives_idle": 20, "keepalives_interval": 5,
             "keepalives_count": 4, "tcp_user_timeout": 40000}
SERVER_KEEPALIVE = ("-c tcp_keepalives_idle=20 -c tcp_keepalives_interval=5 "
                    "-c tcp_keepalives_count=4 -c tcp_user_timeout=40000")
# Every connection speaks UTF-8 (client_encoding below), whatever the database or
# PGCLIENTENCODING make the default: under LATIN1 the producer stopped at the first name
# in another script ("has no equivalent in encoding LATIN1") and retried it for ever.
# And every connection reads and writes at READ COMMITTED, whatever the database's default:
# the snapshot reads a locked row as its writer left it, and the consumer's WRITE takes
# its snapshot after GATE's waits, both only at that level. Under a SERIALIZABLE default
# the snapshot stopped with "could not serialize access due to concurrent update" as
# soon as a writer changed a row of its chunk.
READ_COMMITTED = r"-c default_transaction_isolation=read\ committed"


# libpq's refusals that no retry cures: the server's certificate does not verify or
# name the host, a certificate or key file is missing or unusable, TLS was required
# of a server that does not offer it, or the sslmode is not one libpq knows.
TLS_REFUSED = re.compile(r"certificate|private key|does not support SSL|sslmode")


def connect(settings, side, options="", **parameters):
    """A connection to the source or dest PostgreSQL of the settings; `options` are
    the server's session settings (-c name=value). A TLS set-up that cannot work is a
    ConfigError; an unreachable server is left to the caller."""
    tls_files = {key: getattr(settings, f"{side}_{key}") for key in ("sslrootcert", "sslcert", "sslkey")}
    try:
        return psycopg2.connect(
            host=getattr(settings, f"{side}_host"), port=getattr(settings, f"{side}_port"),
            user=getattr(settings, f"{side}_user"), password=getattr(settings, f"{side}_password"),
            dbname=getattr(settings, f"{side}_db"), sslmode=getattr(settings, f"{side}_sslmode"),
            connect_timeout=5, client_encoding="UTF8",
            options=f"{SERVER_KEEPALIVE} {READ_COMMITTED} {options}".strip(),
            **{key: path for key, path in tls_files.items() if path}, **KEEPALIVE, **parameters)
    except psycopg2.OperationalError as error:
        if not TLS_REFUSED.search(str(error)):
            raise
        prefix = side.upper() + "_DB"
        raise ConfigError(f"{database_name(settings, side)}: {one_line(error)} ({prefix}_SSLMODE="
                          f"{getattr(settings, f'{side}_sslmode')}, {prefix}_SSLROOTCERT="
                          f"{tls_files['sslrootcert'] or '(none)'})") from None


def database_name(settings, side):
    """Where a database is, for messages: host, port and database, never the password."""
    return (f"{getattr(settings, f'{side}_host')}:{getattr(settings, f'{side}_port')}"
            f"/{getattr(settings, f'{side}_db')}")


def kafka_config(settings, **client_settings):
    """One librdkafka configuration dict: the bootstrap servers, the client's own
    settings, then KAFKA_CONFIG, which wins. librdkafka logs through the "kafka" logger."""
    sasl = ({"sasl.username": settings.sasl_username, "sasl.password": settings.sasl_password}
            if settings.sasl_username else {})
    return {"bootstrap.servers": settings.bootstrap_servers, "logger": KAFKA_LOG,
            "error_cb": _on_kafka_error, **sasl, **client_settings, **settings.kafka_config}


def _on_kafka_error(error):
    """librdkafka's errors. Refused credentials are no cause to retry: a ConfigError,
    raised from the call that served the callback (poll, consume, flush), stops the
    script with one line. The others repeat what librdkafka logs already."""
    if error.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
        # The reason without the broker's address in front and the timing behind.
        reason = re.sub(r"^\S+: | \(after \d+ms in state \w+\)$", "", error.str())
        raise ConfigError(f"Kafka refused the credentials ({reason}); check KAFKA_SASL_USERNAME, "
                          "KAFKA_SASL_PASSWORD and the sasl.mechanism in KAFKA_CONFIG")


def producer_config(settings, client_id):
    # acks=all with idempotence: an acknowledged message is on the broker once, and
    # librdkafka's retries keep each partition's order.
    return kafka_config(settings, **{
        "client.id": client_id, "acks": "all", "enable.idempotence": True,
        "linger.ms": 5, "compression.type": "lz4"})


class FatalKafkaError(Exception):
    """librdkafka declared a producer unusable (KafkaError.fatal(): an idempotence
    guarantee it cannot keep); only a new producer can go on."""


def _fatal(error):
    # A fatal error reaches Python raised from flush() or poll(), sometimes as the
    # cause of a SystemError when it surfaced inside a delivery callback.
    while error is not None:
        if isinstance(error, KafkaException) and isinstance(error.args[0], KafkaError) \
                and error.args[0].fatal():
            return error.args[0]
        error = error.__cause__
    return None


def deliver(producer, topic, messages, stop=None, acknowledged=None):
    """Produces (key, value, headers) messages and waits until Kafka has acknowledged
    or refused every one. Returns the refused ones as (KafkaError, key, value);
    `acknowledged`, if given, is called with each message Kafka took.
    On a stop it gives up waiting: what is not acknowledged yet counts as refused.
    Raises FatalKafkaError if the producer is no longer usable."""
    try:
        refused = _deliver(producer, topic, messages, stop, acknowledged)
    except (KafkaException, SystemError) as error:
        fatal = _fatal(error)
        if fatal is None:
            raise
        raise FatalKafkaError(fatal.str()) from None
    fatal = next((error for error, _, _ in refused if error.fatal()), None)
    if fatal is not None:
        raise FatalKafkaError(fatal.str())
    return refused


def _deliver(producer, topic, messages, stop, acknowledged):
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
RECORD_LINES_PER_SECOND = 100  # and no more records than this a second


def setup_logging(level_name):
    level = logging.getLevelName(level_name.upper())
    if not isinstance(level, int):
        raise ConfigError(f"LOG_LEVEL: {level_name!r} is not one of DEBUG, INFO, WARNING, ERROR")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    # The format names no source line, thread or process: not looking them up (the
    # logging HOWTO's "Optimization") takes a line from 27-35 to 20-23 µs of CPU here,
    # and at 1,000 changes/s in small batches the daemons write some 6,000 lines a second.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


class RecordLines:
    """Picks the records of each batch that get a line each: all at DEBUG; at INFO the
    first RECORD_LINES, while fewer than RECORD_LINES_PER_SECOND had one this second.
    At 1,000 changes a second in batches of ten, a line for each took about half of the
    producer's Python time and a third of the consumer's (py-spy --gil), and nobody
    reads 7,000 lines a second."""

    def __init__(self, logger):
        self.logger = logger
        self.second = 0  # int(time.monotonic()) of the second being counted
        self.left = RECORD_LINES_PER_SECOND  # records that may still get lines in it

    def shown(self, records):
        if self.logger.isEnabledFor(logging.DEBUG):
            return records
        now = int(time.monotonic())
        if now != self.second:
            self.second, self.left = now, RECORD_LINES_PER_SECOND
        shown = records[:min(RECORD_LINES, self.left)]
        self.left -= len(shown)
        return shown


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


# How long a topic may be missing before a daemon gives up. A topic just created
# reaches a broker's metadata a moment later: on a broker started a minute before, a
# new topic was missing to a new client for 0.66 s, and bench.py's daemons, started
# 0.2 s after it created its topics, exited saying they did not exist.
TOPIC_GRACE = 5  # seconds


def check_topics(client, settings, topics, stop):
    """Waits until Kafka answers, then fails with a ConfigError if a topic is still
    missing after TOPIC_GRACE seconds."""
    missing_until = None  # time.monotonic() at which a missing topic is an error
    while not stop.requested:
        try:
            existing = client.list_topics(timeout=5).topics
        except KafkaException as error:
            client.poll(0)  # serves the error callback, which raises on refused credentials
            logging.getLogger().error("Kafka at %s did not answer (%s); retrying in 5 seconds",
                                      settings.bootstrap_servers, one_line(error))
            stop.sleep(5)
            continue
        missing = [topic for topic in topics if topic not in existing]
        if not missing:
            return
        if missing_until is None:
            logging.getLogger().info("Topic %r not found; waiting up to %g seconds for it to appear...",
                                     missing[0], TOPIC_GRACE)
            missing_until = time.monotonic() + TOPIC_GRACE
        if time.monotonic() >= missing_until:
            raise ConfigError(f"topic {missing[0]!r} does not exist on this Kafka; "
                              f"create it with: python admin.py create {missing[0]}")
        stop.sleep(0.25)
