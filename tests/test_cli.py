"""The command lines: help, settings and their precedence, errors as one line,
passwords never shown, a clean stop on Ctrl+C, and the README kept true to them."""

import os
import signal
import subprocess
import sys
from contextlib import closing

import pytest

import config
from conftest import KAFKA, PORTS, ROOT, connect, wait_until

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
                                     ["snapshot"], ["verify"], ["status"]])
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


@pytest.mark.parametrize("setting, value, message", [
    ("SOURCE_DB_PORT", "abc", "Error: SOURCE_DB_PORT: 'abc' is not a valid int"),
    ("BATCH_SIZE", "0", "Error: BATCH_SIZE: '0' is below the minimum of 1"),
    ("KAFKA_CONFIG", "acks", "Error: KAFKA_CONFIG: 'acks' is not key=value"),
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
        f"Error: destination database localhost:{PORTS['dest']}/cdc_no_schema has no employees or "
        "cdc_applied table (apply scripts/destination/init.sql)")
    assert pipeline.messages(pipeline.dlq_topic) == []


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


def test_readme_and_env_example_document_every_setting():
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / ".env.example").read_text()
    for setting in config.SETTINGS:
        default = f"`{setting.default}`" if setting.default != "" else "(none)"
        assert f"| `{setting.env}` | {default} | {setting.help} |" in readme, setting.env
        assert f"\n{setting.env}={setting.default}\n" in example, setting.env


def test_readme_shows_every_admin_command():
    readme = (ROOT / "README.md").read_text()
    for command in ["list", "create", "describe", "delete", "group", "dlq list", "dlq count", "dlq replay",
                    "snapshot", "verify", "status"]:
        assert f"python admin.py {command}" in readme, command
