"""PostgreSQL connections carry TCP keepalives and a user timeout on both ends, so that
a connection to a machine that vanished ends in about 40 seconds, not the kernel's two
hours, and the producer lock its session held is freed.

What is checked is that both ends of a real connection run with them. A vanished
machine itself is not staged: this machine's kernel has no tc actions to drop one
connection's packets ("Failed to load TC action module"), and the stack's PostgreSQL
listens on localhost only, which a network namespace cannot reach."""

import socket
from contextlib import closing
from types import SimpleNamespace

import config
from conftest import PORTS, TEST_DB


def test_both_ends_of_a_connection_probe_a_silent_peer(services):
    settings = SimpleNamespace(source_host="localhost", source_port=PORTS["source"],
                               source_user="postgres", source_password="postgres", source_db=TEST_DB,
                               source_sslmode="prefer", source_sslrootcert="", source_sslcert="",
                               source_sslkey="")
    with closing(config.connect(settings, "source")) as db, db.cursor() as cursor:
        cursor.execute("SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_interval'), "
                       "current_setting('tcp_keepalives_count'), current_setting('tcp_user_timeout')")
        assert cursor.fetchone() == ("20", "5", "4", "40000")
        with socket.socket(fileno=socket.dup(db.fileno())) as client:
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 20
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 5
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 40000
