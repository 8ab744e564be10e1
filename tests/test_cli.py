"""The command lines: help, settings and their precedence, errors as one line,
passwords never shown, a clean stop on Ctrl+C, and the README kept true to them."""

import os
import re
import signal
import subprocess
import sys
from contextlib import closing

import pytest
from confluent_kafka.admin import NewTopic

import config
from conftest import KAFKA, PORTS, ROOT, connect, query

SCRIPTS = ["producer.py", "consumer.py", "admin.py", "test_pipeline.py"]


# Where the stack is: kept, so that the suite runs against a stack on other ports too.
STACK_LOCATION = {"SOURCE_DB_PORT", "DEST_DB_PORT", "KAFKA_BOOTSTRAP_SERVERS"}


def clean_env(**settings):
    """The environment without any of our settings but the stack's location, plus the given ones."""
    names = {setting.env for setting in config.SETTINGS} - STACK_LOCATION
    stack = {"KAFKA_BOOTSTRAP_SERVERS": KAFKA, "SOURCE_DB_PORT": str(PORTS["source"]),
             "DEST_DB_PORT": str(PORTS["dest"])}
    return {**{k: v for k, v in os.environ.items() if k not in names}, **stack, **settings}


def run(script, *args, env=None, cwd=ROOT, timeout=60):
    return subprocess.run([sys.executable, str(ROOT / script), *args], env=env or clean_env(),
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help(script):
    result = run(script, "--help")
    assert result.returncode == 0
    assert "usage:" in result.stdout and "--bootstrap-servers" in result.stdout


@pytest.mark.parametrize("command", [["list"], ["create"], ["describe"], ["delete"], ["group"],
                                     ["dlq", "list"], ["dlq", "count"], ["dlq", "replay"],
                                     ["load"], ["renumber-source"], ["snapshot"], ["verify"], ["status"]])
def test_every_admin_command_has_help_with_an_example(command):
    result = run("admin.py", *command, "--help")
    assert result.returncode == 0
    assert "usage: admin.py" in result.stdout
    assert "(python admin.py " in result.stdout


@pytest.mark.parametrize("where", ["dotenv", "environment", "flag"])
def test_flag_beats_environment_beats_dotenv(services, tmp_path, where):
    (tmp_path / ".env").write_text("KAFKA_TOPIC=from_dotenv\n")
    env = clean_env(KAFKA_TOPIC="from_environment") if where != "dotenv" else clean_env()
    args = ["--topic", "from_flag"] if where == "flag" else []
    result = run("producer.py", *args, env=env, cwd=tmp_path)
    expected = {"dotenv": "from_dotenv", "environment": "from_environment", "flag": "from_flag"}[where]
    assert f"Topic: {expected}" in result.stderr
    # The topic does not exist: a configuration error, one line, exit status 1.
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (f"Error: topic '{expected}' does not exist on this "
                                              f"Kafka; create it with: python admin.py create {expected}")


def test_topics_created_just_after_the_daemons_start_are_waited_for(pipeline):
    # A topic just created reaches the broker's metadata a moment later: daemons started
    # beside its creation (bench.py, an init container) must not exit saying it is missing.
    topics = {"KAFKA_TOPIC": f"{pipeline.topic}_late", "KAFKA_DLQ_TOPIC": f"{pipeline.topic}_late_dlq"}
    daemons = [pipeline.start(script, **topics) for script in ("producer.py", "consumer.py")]
    for daemon in daemons:
        daemon.wait_for_log(f"Topic '{topics['KAFKA_TOPIC']}' not found; waiting up to 5 seconds")
    created = pipeline.admin.create_topics([NewTopic(topics["KAFKA_TOPIC"], 3, 1),
                                            NewTopic(topics["KAFKA_DLQ_TOPIC"], 1, 1)])
    try:
        for future in created.values():
            future.result()
        daemons[1].wait_for_log("Assigned partitions")
        query("source", "INSERT INTO employees VALUES (1, 'Late', 'Topic', '1990-01-01', 'City', 1)")
        pipeline.wait_for_equal()
        assert all(daemon.running() for daemon in daemons)
    finally:
        for daemon in daemons:
            daemon.stop()
        for future in pipeline.admin.delete_topics(list(topics.values())).values():
            future.result()


@pytest.mark.parametrize("setting, value, message", [
    ("SOURCE_DB_PORT", "abc", "Error: SOURCE_DB_PORT: 'abc' is not a valid int"),
    ("BATCH_SIZE", "0", "Error: BATCH_SIZE: '0' is below the minimum of 1"),
    ("KAFKA_CONFIG", "acks", "Error: KAFKA_CONFIG: item 1 is not key=value"),
    ("LOG_LEVEL", "LOUD", "Error: LOG_LEVEL: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR"),
])
def test_a_bad_setting_is_one_line_and_exit_1(setting, value, message):
    result = run("producer.py", env=clean_env(**{setting: value}))
    assert result.returncode == 1
    assert result.stderr.strip() == message


def test_a_bad_setting_in_dotenv_names_the_file(tmp_path):
    (tmp_path / ".env").write_text("RETRY_BACKOFF=soon\n")
    result = run("consumer.py", env=clean_env(), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: RETRY_BACKOFF in {tmp_path / '.env'}: 'soon' is not a valid float"


def test_passwords_are_never_logged(pipeline):
    secret = "Sup3r-secret-pw"
    producer = pipeline.start("producer.py", SOURCE_DB_PASSWORD=secret)
    producer.wait_for_log("password authentication failed")
    consumer = pipeline.start("consumer.py", DEST_DB_PASSWORD=secret)
    consumer.wait_for_log("Assigned partitions")
    pipeline.produce(b"1", b'{"action_id": 1, "emp_id": 1, "first_name": null, "last_name": null, '
                           b'"dob": null, "city": null, "salary": null, "action": "INSERT"}')
    consumer.wait_for_log("password authentication failed")
    for daemon in (producer, consumer):
        daemon.stop()
        assert secret not in daemon.log()
        assert "Traceback" not in daemon.log()


def test_consumer_refuses_a_destination_without_its_tables(pipeline):
    with closing(connect("dest", "postgres")) as db, db.cursor() as cursor:
        cursor.execute("DROP DATABASE IF EXISTS cdc_no_schema")
        cursor.execute("CREATE DATABASE cdc_no_schema")
    consumer = pipeline.start("consumer.py", DEST_DB_NAME="cdc_no_schema")
    consumer.wait_for_log("Assigned partitions")
    pipeline.produce(b"1", b'{"action_id": 1, "emp_id": 1, "first_name": null, "last_name": null, '
                           b'"dob": null, "city": null, "salary": null, "action": "INSERT"}')
    assert consumer.process.wait(30) == 1
    assert consumer.log().splitlines()[-1] == (
        f"Error: destination database localhost:{PORTS['dest']}/cdc_no_schema has no employees, "
        "cdc_applied or cdc_truncated table (apply scripts/destination/init.sql)")
    assert pipeline.messages(pipeline.dlq_topic) == []


def test_producer_refuses_a_source_without_emp_cdc(pipeline):
    with closing(connect("source", "postgres")) as db, db.cursor() as cursor:
        cursor.execute("DROP DATABASE IF EXISTS cdc_no_log")
        cursor.execute("CREATE DATABASE cdc_no_log")
    with closing(connect("source", "cdc_no_log")) as db, db.cursor() as cursor:
        cursor.execute((ROOT / "scripts/source/init.sql").read_text())
        cursor.execute("DROP TABLE emp_cdc CASCADE")
    producer = pipeline.start("producer.py", SOURCE_DB_NAME="cdc_no_log")
    assert producer.process.wait(30) == 1
    assert producer.log().splitlines()[-1] == (
        f"Error: source database localhost:{PORTS['source']}/cdc_no_log: relation \"emp_cdc\" does "
        "not exist (apply scripts/source/init.sql)")


def test_ctrl_c_stops_a_waiting_producer_at_once(pipeline):
    pipeline.producer("first")
    waiting = pipeline.start("producer.py", "waiting")
    waiting.wait_for_log("Another producer is publishing")
    waiting.process.send_signal(signal.SIGINT)
    assert waiting.process.wait(5) == 0
    assert "CDC Producer stopped." in waiting.log()


def test_admin_reports_an_unreachable_broker_in_one_line():
    result = run("admin.py", "--bootstrap-servers", "localhost:1", "list")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("Error: Kafka at localhost:1: ")
    assert len(result.stderr.strip().splitlines()) == 1


def settings_table_row(setting):
    default = f"`{setting.default}`" if setting.default != "" else "(none)"
    return f"| `{setting.env}` | `--{setting.name.replace('_', '-')}` | {default} | {setting.help} |"


def test_readme_and_env_example_document_every_setting_and_nothing_else():
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / ".env.example").read_text()
    table = [line for line in readme.splitlines() if re.match(r"\| `[A-Z_]+` \| `--", line)]
    assert table == [settings_table_row(setting) for setting in config.SETTINGS], \
        "README's configuration table, as config.py has it:\n" + "\n".join(map(settings_table_row, config.SETTINGS))
    for setting in config.SETTINGS:
        assert f"\n{setting.env}={setting.default}\n" in example, setting.env
    assert set(re.findall(r"^([A-Z_]+)=", example, re.M)) == {setting.env for setting in config.SETTINGS}


def test_readme_tests_table_names_every_test_file():
    readme = (ROOT / "README.md").read_text()
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        assert f"| `tests/{path.name}`" in readme or f", `tests/{path.name}`" in readme, path.name


# Flags of other programs that the README shows (docker compose, pytest, Kafka's own tools,
# valgrind and postgres, the side-by-side benchmark of ../shared/bench).
OTHER_PROGRAMS_FLAGS = {"--build", "--profile", "--dbz-warmup", "--help", "--durations", "--shuffle", "--add", "--add-config",
                        "--add-scram", "--allow-principal", "--alter", "--bootstrap-server",
                        "--command-config", "--entity-type", "--operation", "--tool", "--single"}


def flags_in(text):
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def help_flags(script, *command):
    return flags_in(run(script, *command, "--help").stdout)


def admin_commands():
    """admin.py's commands as `python admin.py X` would name them, with `dlq` ones as `dlq X`."""
    listed = re.findall(r"^    ([a-z-]+)  ", run("admin.py", "--help").stdout, re.M)
    dlq_listed = re.findall(r"^    ([a-z-]+)  ", run("admin.py", "dlq", "--help").stdout, re.M)
    return [name for name in listed if name != "dlq"] + [f"dlq {name}" for name in dlq_listed]


def test_each_script_takes_only_the_settings_it_uses():
    assert not {"--instance-id", "--max-retries", "--poll-interval", "--batch-size"} & help_flags("admin.py")
    assert not {"--source-host", "--poll-interval"} & help_flags("consumer.py")
    assert not {"--dest-host", "--group", "--max-retries"} & help_flags("producer.py")


def test_readme_names_every_flag_and_command_and_only_those():
    readme = (ROOT / "README.md").read_text()
    commands = admin_commands()
    scripts = ["producer.py", "consumer.py", "test_pipeline.py", "admin.py", "scripts/bench.py",
               "scripts/scaling.py", "scripts/make_employees_csv.py"]
    in_code = set().union(*(help_flags(script) for script in scripts),
                          *(help_flags("admin.py", *command.split()) for command in commands))
    in_readme = flags_in(readme)
    assert in_readme - in_code - OTHER_PROGRAMS_FLAGS == set(), "in the README, in no script"
    for doc in sorted((ROOT / "docs").glob("*.md")):
        in_doc = flags_in(doc.read_text())
        assert in_doc - in_code - OTHER_PROGRAMS_FLAGS == set(), f"in {doc.name}, in no script"
    assert in_code - in_readme - {"--help"} == set(), "in a script, not in the README"
    shown = set(re.findall(r"python admin\.py ((?:dlq )?[a-z][a-z-]*)", readme))
    assert set(commands) == shown
