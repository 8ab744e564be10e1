"""Passwords from files (Docker's secrets convention), and a warning for a password
given as a flag, which every user of the machine sees in `ps`."""

import pytest

from test_cli import clean_env, run

MISSING_TOPIC = "no_such_topic_for_secrets"


def test_a_password_file_is_read_without_its_trailing_newline(pipeline, tmp_path):
    secret = tmp_path / "source_password"
    secret.write_text("cdc_producer\n")
    producer = pipeline.producer(SOURCE_DB_PASSWORD=None, SOURCE_DB_PASSWORD_FILE=str(secret))
    assert "Loaded offset: 0" in producer.log()


def test_a_password_file_in_dotenv_is_read(tmp_path):
    secret = tmp_path / "dest_password"
    secret.write_text("wrong-on-purpose\n")
    (tmp_path / ".env").write_text(f"DEST_DB_PASSWORD_FILE={secret}\n")
    result = run("test_pipeline.py", "--timeout", "1", env=clean_env(), cwd=tmp_path)
    assert result.returncode == 1
    assert "password authentication failed" in result.stdout + result.stderr
    assert "wrong-on-purpose" not in result.stdout + result.stderr


@pytest.mark.parametrize("env, message", [
    ({"SOURCE_DB_PASSWORD_FILE": "/nonexistent/secret"},
     "Error: SOURCE_DB_PASSWORD_FILE: cannot read '/nonexistent/secret' (No such file or directory)"),
    ({"SOURCE_DB_PASSWORD_FILE": "/etc/hostname", "SOURCE_DB_PASSWORD": "postgres"},
     "Error: SOURCE_DB_PASSWORD and SOURCE_DB_PASSWORD_FILE are both set; give one"),
])
def test_a_password_file_that_cannot_be_used_is_one_line_and_exit_1(env, message):
    result = run("producer.py", env=clean_env(**env))
    assert result.returncode == 1
    assert result.stderr.strip() == message


def test_a_password_flag_works_but_warns_that_others_see_it(services):
    result = run("producer.py", "--source-password", "postgres", "--topic", MISSING_TOPIC)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == ("Warning: --source-password on the command line is visible to other users "
                        "of this machine (ps); prefer SOURCE_DB_PASSWORD_FILE or the environment")
    assert lines[-1].startswith(f"Error: topic '{MISSING_TOPIC}' does not exist")
