"""PostgreSQL over TLS: the daemons verify the servers' certificates against the
stack's CA (sslmode=verify-full), present a client certificate when told to, and
refuse a server their CA did not sign in one line."""

import subprocess
from contextlib import closing
from types import SimpleNamespace

import config
from conftest import PORTS, ROOT, TEST_DB, query

CA = ROOT / ".stack/tls/ca.crt"
VERIFIED = {f"{prefix}_DB_{key}": value for prefix in ("SOURCE", "DEST")
            for key, value in (("SSLMODE", "verify-full"), ("SSLROOTCERT", str(CA)))}


def tls_of(side, application_name):
    """(ssl, version) of the connections of an application, as the server sees them."""
    return query(side, "SELECT DISTINCT ssl, version FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) "
                       "WHERE application_name = %s", (application_name,))


def test_the_pipeline_runs_with_verify_full(pipeline):
    pipeline.env.update(VERIFIED)
    pipeline.producer()
    pipeline.consumer()
    query("source", "INSERT INTO employees VALUES (1401, 'Tls', 'Verified', '1990-01-01', 'Oslo', 1)")
    pipeline.wait_for_equal()
    assert tls_of("source", "cdc-producer") == [(True, "TLSv1.3")]
    assert tls_of("dest", "cdc-consumer") == [(True, "TLSv1.3")]


def test_a_server_the_ca_did_not_sign_is_refused_in_one_line(pipeline, tmp_path):
    other_ca = tmp_path / "other-ca.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=some other CA", "-keyout", str(tmp_path / "other-ca.key"),
                    "-out", str(other_ca)], check=True, capture_output=True)
    producer = pipeline.start("producer.py", **{**VERIFIED, "SOURCE_DB_SSLROOTCERT": str(other_ca)})
    assert producer.process.wait(30) == 1
    assert producer.log().splitlines()[-1] == (
        f'Error: localhost:{PORTS["source"]}/{TEST_DB}: connection to server at "localhost" (127.0.0.1), '
        f'port {PORTS["source"]} failed: SSL error: certificate verify failed '
        f"(SOURCE_DB_SSLMODE=verify-full, SOURCE_DB_SSLROOTCERT={other_ca})")
    assert "Traceback" not in producer.log()


def test_a_client_certificate_is_presented_and_verified(services):
    settings = SimpleNamespace(
        dest_host="localhost", dest_port=PORTS["dest"], dest_user="cdc_reader", dest_password="cdc_reader",
        dest_db=TEST_DB, dest_sslmode="verify-full", dest_sslrootcert=str(CA),
        dest_sslcert=str(ROOT / ".stack/tls/client.crt"), dest_sslkey=str(ROOT / ".stack/tls/client.key"))
    with closing(config.connect(settings, "dest")) as db, db.cursor() as cursor:
        cursor.execute("SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert cursor.fetchone() == (True, "/CN=cdc_reader")
