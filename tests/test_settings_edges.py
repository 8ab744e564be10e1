"""Settings a user trips on: librdkafka settings whose values carry commas and secrets,
`.env` read from the working directory only, and `admin.py --group X group`."""

import pytest

from conftest import wait_until
from test_cli import clean_env, run

SECRET = "ab,Zq9x=pw"


@pytest.mark.parametrize("kafka_config, message", [
    (f"acks=all,sasl.password={SECRET}", "item 2 may hold a secret, which belongs in KAFKA_CONFIG_FILE"),
    ("sasl.password=ab,cd", "item 1 may hold a secret, which belongs in KAFKA_CONFIG_FILE"),
    ("acks=all,cd", "item 2 is not key=value"),
])
def test_kafka_config_never_prints_a_piece_of_a_password(kafka_config, message):
    result = run("producer.py", env=clean_env(KAFKA_CONFIG=kafka_config))
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: KAFKA_CONFIG: {message}"
    assert "Zq9x" not in result.stderr + result.stdout


def test_a_bad_line_in_kafka_config_file_is_named_never_shown(tmp_path):
    properties = tmp_path / "client.properties"
    properties.write_text(f"# comment\n= {SECRET}\n")
    result = run("producer.py", env=clean_env(KAFKA_CONFIG_FILE=str(properties)))
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: KAFKA_CONFIG_FILE {properties} line 2 is not key=value"
    assert "Zq9x" not in result.stderr + result.stdout


def test_a_missing_kafka_config_file_is_one_line(tmp_path):
    result = run("consumer.py", env=clean_env(KAFKA_CONFIG_FILE=str(tmp_path / "nowhere")))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"Error: KAFKA_CONFIG_FILE: cannot read {tmp_path / 'nowhere'}: "
                                     "No such file or directory")


def test_kafka_config_file_values_reach_librdkafka_whole(pipeline, tmp_path):
    # The consumer's client.id as Kafka reports it for the group's member shows that a
    # value with commas, '=' and spaces arrived whole; a password travels the same way.
    client_id = "cdc,consumer=one two"
    properties = tmp_path / "client.properties"
    properties.write_text(f"! Kafka's tools take both comment marks\n# security.protocol=SASL_SSL\n"
                          f"client.id = {client_id}\nsasl.password: {SECRET}\n\n")
    pipeline.consumer(KAFKA_CONFIG_FILE=str(properties))

    def described():
        result = run("admin.py", "--group", pipeline.group, "--topic", pipeline.topic, "group",
                     env=clean_env())
        return result.returncode == 0 and client_id in result.stdout and result.stdout

    output = wait_until(described, 30, "admin.py group to show the consumer's client.id")
    assert f"Consumer group: {pipeline.group}" in output
    assert SECRET not in output


def test_admin_group_flag_names_the_group_described(pipeline):
    pipeline.consumer()
    result = run("admin.py", "--group", pipeline.group, "group", env=clean_env())
    assert result.returncode == 0, result.stderr
    assert f"Consumer group: {pipeline.group}" in result.stdout


def test_dotenv_of_a_parent_folder_is_not_read(services, tmp_path):
    (tmp_path / ".env").write_text("KAFKA_TOPIC=from_parent_folder\n")
    working = tmp_path / "work"
    working.mkdir()
    result = run("producer.py", env=clean_env(KAFKA_DLQ_TOPIC="no_such_dlq_topic"), cwd=working)
    assert result.returncode == 1
    assert "Topic: bf_employee_cdc" in result.stderr
    assert "from_parent_folder" not in result.stderr
