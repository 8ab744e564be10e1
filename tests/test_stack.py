"""scripts/stack.sh on a machine that lacks something."""

import shutil
import subprocess

from conftest import ROOT


def test_a_missing_prerequisite_is_named_with_its_install_command(tmp_path):
    # A PATH with the shell's basic tools and none of java, mvn, psql.
    for tool in ["bash", "dirname", "ls", "sort", "id", "cat"]:
        (tmp_path / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(["bash", str(ROOT / "scripts/stack.sh"), "up"], env={"PATH": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == ("Error: missing Java Maven psql; install with: "
                                     "sudo apt-get install -y openjdk-17-jre-headless maven postgresql-client")


def test_an_unknown_service_is_named():
    result = subprocess.run(["bash", str(ROOT / "scripts/stack.sh"), "down", "zookeeper"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: unknown service 'zookeeper' (expected: source dest kafka)"
