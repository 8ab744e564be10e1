"""scripts/run.sh, as a new user runs it: on an empty source it loads the sample
employees.csv, and every good row of it reaches the destination."""

import csv
import subprocess

from conftest import ROOT, query


def run_sh(pipeline, log_dir, *args):
    """scripts/run.sh on the test's databases and topics, its daemons' logs in log_dir."""
    return subprocess.run(["bash", str(ROOT / "scripts/run.sh"), *args], cwd=ROOT,
                          env={**pipeline.env, "RUN_LOG_DIR": str(log_dir)}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)


def test_run_sh_loads_the_sample_into_an_empty_source_and_it_replicates(pipeline, tmp_path):
    with open(ROOT / "employees.csv", newline="") as sample:
        lines = list(csv.reader(sample))[1:]
    assert query("source", "SELECT count(*) FROM employees") == [(0,)]
    try:
        first = run_sh(pipeline, tmp_path)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "The source has no employees yet" in first.stdout
        # The README's promise: all 300 good rows of the sample, the 6 bad ones named.
        assert "306 rows read, 300 inserted, 0 updated, 0 unchanged, 6 bad" in first.stdout, first.stdout
        assert "The destination (" in first.stdout and "has all 300 after" in first.stdout
        named = [line.split(":")[0] for line in (first.stdout + first.stderr).splitlines()
                 if line.startswith("employees.csv line ")]
        assert named == [f"employees.csv line {number}" for number in (19, 45, 103, 155, 217, 267)]
        assert "Deleted it again on the source; the destination follows." in first.stdout
        source = pipeline.wait_for_equal()
        assert len(source) == 300 == len(lines) - 6

        # Run again with the daemons still running: nothing is loaded a second time.
        second = run_sh(pipeline, tmp_path)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "is already running" in second.stdout
        assert "The source has no employees yet" not in second.stdout
        assert pipeline.wait_for_equal() == source
    finally:
        stopped = run_sh(pipeline, tmp_path, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "Stopped producer.py" in stopped.stdout and "Stopped consumer.py" in stopped.stdout
