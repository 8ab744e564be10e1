"""scripts/setup.sh on a machine that lacks java, mvn and pgbench.

Nothing is uninstalled or installed: setup.sh runs with a PATH that holds every
command of this machine's PATH but java, mvn and pgbench, and stand-ins for apt-get,
sudo, pg_lsclusters and pg_ctlcluster that write each call to a log. The stand-in
apt-get "installs" by linking the real java, mvn and pgbench into that PATH, and, as
Debian's postgresql package does, starts a cluster (a line in the file the stand-in
pg_lsclusters prints). Without root, setup.sh runs as user nobody.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import KAFKA, PORTS, ROOT

HIDDEN = ("java", "mvn", "pgbench")
RUNUSER = shutil.which("runuser", path=f"{os.environ['PATH']}:/usr/sbin:/sbin")
PACKAGES = "openjdk-17-jre-headless maven postgresql"

STAND_INS = {
    "apt-get": """
        echo "apt-get $* (DEBIAN_FRONTEND=${DEBIAN_FRONTEND:-})" >>"$STANDIN_DIR/calls"
        if [ "$1" = install ] && [ -n "${STANDIN_INSTALLS:-}" ]; then
            for tool in $STANDIN_INSTALLS; do ln -s "$tool" "$STANDIN_DIR/bin/"; done
            echo "$STANDIN_STARTS" >>"$STANDIN_DIR/clusters"
        fi""",
    # As sudo -n: runs the command, or fails when it would need a password.
    "sudo": """
        echo "sudo $*" >>"$STANDIN_DIR/calls"
        [ "$1" = -n ] && shift
        [ "$1" = true ] && exit "$STANDIN_SUDO_STATUS"
        exec "$@\"""",
    "pg_lsclusters": """cat "$STANDIN_DIR/clusters\"""",
    "pg_ctlcluster": """
        echo "pg_ctlcluster $*" >>"$STANDIN_DIR/calls"
        sed -i "s/^$1 $2 \\([0-9]*\\) online/$1 $2 \\1 down/" "$STANDIN_DIR/clusters\"""",
}


def readable_temp_dir():
    """A temporary directory that user nobody can read too."""
    directory = Path(tempfile.mkdtemp(prefix="setup-test-"))
    directory.chmod(0o755)
    return directory


@pytest.fixture(scope="module")
def path_without_hidden():
    """A directory with a link to every command on this PATH but java, mvn and pgbench
    (and the stand-ins'): made once, as links are slow to make on a busy disk."""
    directory = readable_temp_dir()
    linked = set(STAND_INS) | set(HIDDEN)
    for path_dir in filter(os.path.isdir, os.environ["PATH"].split(os.pathsep)):
        for name in set(os.listdir(path_dir)) - linked:
            os.symlink(os.path.join(path_dir, name), directory / name)
            linked.add(name)
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def machine(path_without_hidden):
    """One test's directory: bin/ with the stand-ins and system/, path_without_hidden
    (the PATH, in that order), the stand-ins' log `calls`, the clusters file, and a copy
    of the set-up scripts."""
    directory = readable_temp_dir()
    (directory / "system").symlink_to(path_without_hidden)
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    for name, body in STAND_INS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body.strip() + "\n")
        (bin_dir / name).chmod(0o755)
    for name in ("calls", "clusters"):
        (directory / name).touch()
        (directory / name).chmod(0o666)
    (directory / "scripts").mkdir()
    for script in ("setup.sh", "prerequisites.sh"):
        shutil.copy(ROOT / "scripts" / script, directory / "scripts")
    yield directory
    shutil.rmtree(directory)


def run_setup(machine, setup=None, user=None, sudo_status=0, installs=(), starts=""):
    env = {"PATH": f"{machine / 'bin'}:{machine / 'system'}", "HOME": str(machine), "STANDIN_DIR": str(machine),
           "STANDIN_SUDO_STATUS": str(sudo_status), "STANDIN_INSTALLS": " ".join(installs),
           "STANDIN_STARTS": starts, "SOURCE_DB_PORT": str(PORTS["source"]),
           "DEST_DB_PORT": str(PORTS["dest"]), "KAFKA_PORT": KAFKA.rsplit(":", 1)[1]}
    command = ["/bin/bash", str(setup or machine / "scripts/setup.sh")]
    if user:
        # The system's python3: one under /root (pyenv's, say) is out of nobody's reach.
        env["PYTHON"] = shutil.which("python3", path="/usr/bin:/bin")
        # runuser may reset PATH; env sets it again for setup.sh.
        command = [RUNUSER, "-u", user, "--", "/usr/bin/env", "-i",
                   *(f"{name}={value}" for name, value in env.items()), *command]
    return subprocess.run(command, env=env, cwd=machine, capture_output=True, text=True, timeout=300)


def calls(machine):
    return (machine / "calls").read_text().splitlines()


def cluster(port, status):
    return f"15 main {port} {status} postgres /var/lib/postgresql/15/main /var/log/postgresql/postgresql-15-main.log"


def test_as_root_it_installs_what_is_missing_and_stops_the_cluster_the_package_started(services, machine):
    real_tools = [shutil.which(tool) for tool in HIDDEN]
    result = run_setup(machine, setup=ROOT / "scripts/setup.sh", installs=real_tools,
                       starts=cluster(PORTS["source"], "online"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls(machine) == [
        "apt-get update -q (DEBIAN_FRONTEND=)",
        f"apt-get install -y -q {PACKAGES} (DEBIAN_FRONTEND=noninteractive)",
        "pg_ctlcluster 15 main stop"]
    lines = result.stdout.splitlines()
    assert lines[0] == f"Installing {PACKAGES} (missing Java Maven pgbench)"
    assert (f"Stopped Debian's PostgreSQL cluster 15/main, which installing postgresql started on "
            f"port {PORTS['source']}; the stack needs the port (start it again with: "
            f"pg_ctlcluster 15 main start)") in lines
    assert f"source PostgreSQL is up on localhost:{PORTS['source']}" in lines
    assert (machine / "clusters").read_text().split()[3] == "down"


def test_without_root_it_installs_through_sudo_when_sudo_may(machine):
    # The stand-in installs nothing here, so set-up stops after apt-get.
    result = run_setup(machine, user="nobody", sudo_status=0)
    assert calls(machine) == [
        "sudo -n true",
        "sudo -n apt-get update -q", "apt-get update -q (DEBIAN_FRONTEND=)",
        f"sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q {PACKAGES}",
        f"apt-get install -y -q {PACKAGES} (DEBIAN_FRONTEND=noninteractive)"]
    assert result.returncode == 1
    assert result.stderr.strip() == (f"Error: still missing Java Maven pgbench after apt-get "
                                      f"install -y {PACKAGES}")


def test_without_root_or_sudo_it_stops_with_the_command_to_run(machine):
    result = run_setup(machine, user="nobody", sudo_status=1)
    assert calls(machine) == ["sudo -n true"]
    assert result.returncode == 1
    assert result.stderr.strip() == (f"Error: missing Java Maven pgbench; install with: sudo apt-get "
                                      f"update && sudo apt-get install -y {PACKAGES}")
    assert not (machine / ".venv").exists()


def test_without_apt_get_it_names_the_packages(machine):
    (machine / "bin/apt-get").unlink()
    result = run_setup(machine)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"Error: missing Java Maven pgbench; install them (Debian's "
                                      f"packages: {PACKAGES})")


def test_a_cluster_that_ran_before_is_named_and_left_alone(machine):
    (machine / "clusters").write_text(cluster(5999, "online") + "\n" + cluster(PORTS["dest"], "online") + "\n")
    result = run_setup(machine, installs=[shutil.which(tool) for tool in HIDDEN])
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"Error: Debian's PostgreSQL cluster 15/main runs on port {PORTS['dest']}, which the stack "
        f"needs; free the port with: sudo pg_ctlcluster 15 main stop (or move the stack with "
        f"SOURCE_DB_PORT, DEST_DB_PORT and KAFKA_PORT)")
    # Checked before anything is installed: no apt-get, no pg_ctlcluster.
    assert calls(machine) == []
    assert "online" in (machine / "clusters").read_text().splitlines()[1]
