"""The pipeline over a broker that takes SASL_SSL only (SCRAM-SHA-512, ACLs), with
PostgreSQL verified by TLS (verify-full) and every process as its least-privilege
role and Kafka user: replication and the DLQ work, each user is refused what its ACLs
do not allow, and a wrong password is one line.

The broker is one of this module's own, on free ports, from the stack's jars and its
CA; the default stack stays plaintext. Formatting and starting it (two JVMs) is most
of this module's time: 133 s measured with the machine at load average 30+.
"""

import base64
import re
import socket
import subprocess
import sys
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import (AclBinding, AclOperation, AclPermissionType, AdminClient,
                                   NewTopic, ResourcePatternType, ResourceType)

import replay
from conftest import ROOT, Pipeline, employees, query, wait_until
from test_tls import VERIFIED

KAFKA_HOME = ROOT / ".stack/kafka"
TLS = ROOT / ".stack/tls"
PASSWORDS = {"kafka-broker": "broker-secret", "cdc-producer": "producer-secret",
             "cdc-consumer": "consumer-secret", "cdc-admin": "admin-secret"}
CLIENT_TLS = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
              "ssl.ca.location": str(TLS / "ca.crt")}
# Each script's Kafka user, beside its database role (conftest.DAEMON_ROLES).
KAFKA_USERS = {"producer.py": "cdc-producer", "consumer.py": "cdc-consumer",
               "admin.py": "cdc-admin", "test_pipeline.py": "cdc-admin"}
WRONG_PASSWORD_LINE = (
    "Error: Kafka refused the credentials (SASL authentication error: Authentication failed "
    "during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512); "
    "check KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and the sasl.mechanism in KAFKA_CONFIG")


def client_settings(bootstrap, user):
    return {"bootstrap.servers": bootstrap, **CLIENT_TLS,
            "sasl.username": user, "sasl.password": PASSWORDS[user]}


def free_port():
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def cluster_id():
    """A KRaft cluster id as Kafka writes one (base64 of a UUID); never starting with
    '-', which the format tool would read as an option."""
    while (candidate := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))[0] == "-":
        pass
    return candidate


def kafka_java(*args):
    return ["java", "-cp", f"{KAFKA_HOME / 'libs'}/*",
            f"-Dlog4j2.configurationFile={ROOT / 'scripts/kafka/log4j2.properties'}", *args]


@pytest.fixture(scope="module")
def broker(services, tmp_path_factory):
    """A SASL_SSL broker whose users are those of PASSWORDS; its bootstrap address."""
    home = tmp_path_factory.mktemp("kafka_sasl_ssl")
    port, controller_port = free_port(), free_port()
    keystore = home / "server.pem"
    keystore.write_text((TLS / "server.key").read_text() + (TLS / "server.crt").read_text())
    properties = ((ROOT / "scripts/kafka/server.properties").read_text() + "\n"
                  + (ROOT / "scripts/kafka/sasl_ssl.properties").read_text())
    for name, value in {"@DATA_DIR@": home / "data", "@KAFKA_PORT@": port, "@NODE_ID@": 1,
                        "@CONTROLLER_PORT@": controller_port, "@QUORUM@": f"localhost:{controller_port}",
                        "@REPLICATION@": 1, "@MIN_ISR@": 1, "@KEYSTORE_PEM@": keystore,
                        "@CA_PEM@": TLS / "ca.crt", "@BROKER_PASSWORD@": PASSWORDS["kafka-broker"]}.items():
        properties = properties.replace(name, str(value))
    (home / "server.properties").write_text(properties)
    users = [argument for user, password in PASSWORDS.items()
             for argument in ("--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]")]
    subprocess.run(kafka_java("kafka.tools.StorageTool", "format", "--standalone", "--cluster-id", cluster_id(),
                              "--config", str(home / "server.properties"), *users),
                   check=True, capture_output=True, timeout=300)
    log_path = home / "kafka.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["java", "-Xms256m", "-Xmx256m", *kafka_java(
            "kafka.Kafka", str(home / "server.properties"))[1:]], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "Kafka Server started" in log_path.read_text() or process.poll() is not None,
                   240, f"the SASL_SSL broker to start (log: {log_path})")
        if process.poll() is not None:
            pytest.fail(f"the SASL_SSL broker stopped:\n{log_path.read_text()[-3000:]}", pytrace=False)
        yield f"localhost:{port}"
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def acl(user, resource_type, name, operation):
    return AclBinding(resource_type, name, ResourcePatternType.LITERAL, f"User:{user}", "*",
                      operation, AclPermissionType.ALLOW)


def pipeline_acls(pipeline):
    """What each user may do, and nothing more: the producer writes both topics, the
    consumer reads the main topic in its group and writes the DLQ, the admin manages
    and reads both topics and describes the group. An idempotent producer (all three
    produce) needs IDEMPOTENT_WRITE on the cluster."""
    topic, dlq_topic, group = pipeline.topic, pipeline.dlq_topic, pipeline.group
    T, G, CLUSTER, Op = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.BROKER, AclOperation
    return [
        *[acl("cdc-producer", T, name, op) for name in (topic, dlq_topic) for op in (Op.WRITE, Op.DESCRIBE)],
        acl("cdc-consumer", T, topic, Op.READ), acl("cdc-consumer", T, topic, Op.DESCRIBE),
        acl("cdc-consumer", T, dlq_topic, Op.WRITE), acl("cdc-consumer", T, dlq_topic, Op.DESCRIBE),
        acl("cdc-consumer", G, group, Op.READ),
        # The consumer's re-drive reads the DLQ and sends what an outage parked back.
        acl("cdc-consumer", T, dlq_topic, Op.READ), acl("cdc-consumer", T, topic, Op.WRITE),
        acl("cdc-consumer", G, replay.READER_GROUP, Op.READ),
        *[acl("cdc-admin", T, name, op) for name in (topic, dlq_topic)
          for op in (Op.CREATE, Op.DELETE, Op.DESCRIBE, Op.DESCRIBE_CONFIGS, Op.READ, Op.WRITE)],
        acl("cdc-admin", G, group, Op.DESCRIBE),
        # The readers of `admin.py dlq` and test_pipeline.py take no part in a group,
        # but librdkafka looks up the coordinator of the group.id they must carry.
        acl("cdc-admin", G, replay.READER_GROUP, Op.READ),
        AclBinding(G, "test-pipeline-", ResourcePatternType.PREFIXED, "User:cdc-admin", "*",
                   Op.READ, AclPermissionType.ALLOW),
        *[acl(user, CLUSTER, "kafka-cluster", Op.IDEMPOTENT_WRITE)
          for user in ("cdc-producer", "cdc-consumer", "cdc-admin")],
    ]


@pytest.fixture
def secure(broker, request, tmp_path):
    """A pipeline on the SASL_SSL broker: PostgreSQL verify-full, each script as its
    role and Kafka user, the Kafka password from a file."""
    pipeline = Pipeline(re.sub(r"[^A-Za-z0-9_]", "_", request.node.name), tmp_path,
                        client_settings(broker, "kafka-broker"))
    for future in pipeline.admin.create_acls(pipeline_acls(pipeline)).values():
        future.result()
    pipeline.env.update(VERIFIED, KAFKA_CONFIG=",".join(f"{key}={value}" for key, value in CLIENT_TLS.items()))
    for script, user in KAFKA_USERS.items():
        password_file = tmp_path / f"{user}.password"
        password_file.write_text(PASSWORDS[user] + "\n")
        pipeline.roles[script] = {**pipeline.roles.get(script, {}), "KAFKA_SASL_USERNAME": user,
                                  "KAFKA_SASL_PASSWORD_FILE": str(password_file)}
    consumer_view = AdminClient(client_settings(broker, "cdc-consumer"))
    wait_until(lambda: pipeline.topic in consumer_view.list_topics(timeout=10).topics, 30,
               "the ACLs to reach the broker")
    yield pipeline
    pipeline.close()


def run_as(pipeline, script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args],
                          env={**pipeline.env, **pipeline.roles[script]},
                          capture_output=True, text=True, timeout=180)


def test_replication_and_dlq_over_sasl_ssl_and_tls(secure):
    secure.producer()
    secure.consumer()
    query("source", "INSERT INTO employees VALUES (1501, 'Sasl', 'Ssl', '1990-01-01', 'Oslo', 1)")
    secure.wait_for_equal()
    # test_pipeline.py: the trigger, INSERT, UPDATE, DELETE, offsets, and a malformed
    # message parked in the DLQ by the consumer while the change behind it is applied.
    result = run_as(secure, "test_pipeline.py", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Results: 7/7 tests passed" in result.stdout
    listing = run_as(secure, "admin.py", "dlq", "list")
    assert listing.returncode == 0, listing.stderr
    assert "1 DLQ record(s)" in listing.stdout and "consumer, 1 attempt(s), InvalidChange" in listing.stdout
    assert employees("dest") == [(1501, "Sasl", "Ssl", "1990-01-01", "Oslo", 1)]


def refusal(client_call):
    """The error code a client call fails with."""
    with pytest.raises(KafkaException) as refused:
        client_call()
    return refused.value.args[0].code()


def test_each_kafka_user_is_refused_what_its_acls_do_not_allow(secure, broker):
    secure.produce(b"1", b"a message to read")

    def read_as(user, group):
        reader = Consumer({**client_settings(broker, user), "group.id": group, "auto.offset.reset": "earliest"})
        reader.subscribe([secure.topic])
        try:
            for _ in range(30):
                message = reader.poll(1)
                if message is not None:
                    return message.error().code() if message.error() else None
            return None
        finally:
            reader.close()

    def write_as(user, topic):
        writer = Producer({**client_settings(broker, user), "enable.idempotence": False})
        delivered = []
        writer.produce(topic, b"forbidden", key=b"1", on_delivery=lambda error, _: delivered.append(error))
        writer.flush(30)
        return delivered[0].code()

    assert read_as("cdc-producer", secure.group) == KafkaError.GROUP_AUTHORIZATION_FAILED
    assert read_as("cdc-consumer", "another_group") == KafkaError.GROUP_AUTHORIZATION_FAILED
    # The consumer writes the DLQ, and the main topic only to re-drive (README): nothing else.
    assert write_as("cdc-consumer", f"{secure.topic}_other") == KafkaError.TOPIC_AUTHORIZATION_FAILED
    admin = AdminClient(client_settings(broker, "cdc-admin"))
    assert refusal(lambda: admin.create_topics([NewTopic("not_ours", 1, 1)])["not_ours"].result(30)) \
        == KafkaError.TOPIC_AUTHORIZATION_FAILED


@pytest.mark.parametrize("script", ["producer.py", "consumer.py"])
def test_a_wrong_kafka_password_is_one_line_and_exit_1(secure, script):
    daemon = secure.start(script, KAFKA_SASL_PASSWORD_FILE=None, KAFKA_SASL_PASSWORD="Not-the-pw-42")
    assert daemon.process.wait(60) == 1
    assert daemon.log().splitlines()[-1] == WRONG_PASSWORD_LINE
    assert "Traceback" not in daemon.log() and "Not-the-pw-42" not in daemon.log()


def test_admin_with_a_wrong_kafka_password_is_one_line(secure, tmp_path):
    (tmp_path / "wrong").write_text("wrong\n")
    secure.roles["admin.py"] = {**secure.roles["admin.py"], "KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "wrong")}
    result = run_as(secure, "admin.py", "list")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [WRONG_PASSWORD_LINE]
