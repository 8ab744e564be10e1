#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), starts producer.py and consumer.py in the
# background, loads the sample employees.csv if the source has no employees yet, and
# shows a row inserted with psql arriving in the destination.
#
#   scripts/run.sh          set up, start the daemons, demonstrate
#   scripts/run.sh stop     stop the daemons (scripts/stack.sh down stops the stack)
#
# Daemon logs: .stack/logs/producer.log and .stack/logs/consumer.log (RUN_LOG_DIR moves
# them and the pid files). The daemons take their settings from the environment and .env;
# this script's psql uses SOURCE_DB_PORT, DEST_DB_PORT, SOURCE_DB_NAME and DEST_DB_NAME.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOGS=${RUN_LOG_DIR:-$ROOT/.stack/logs}
SOURCE_PORT=${SOURCE_DB_PORT:-5432}
DEST_PORT=${DEST_DB_PORT:-5433}
SOURCE_DB=${SOURCE_DB_NAME:-postgres}
DEST_DB=${DEST_DB_NAME:-postgres}
export PGPASSWORD=postgres
cd "$ROOT"  # the daemons read .env from their working directory

daemon_pid() {
    local pid
    pid=$(cat "$LOGS/$1.pid" 2>/dev/null) || return 1
    grep -qa "$1.py" "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

start_daemon() {  # start_daemon producer|consumer TEXT-THAT-SAYS-IT-IS-READY
    if daemon_pid "$1" >/dev/null; then
        echo "$1.py is already running (pid $(daemon_pid "$1"))"
        return
    fi
    : >"$LOGS/$1.log"
    # setsid: the daemon outlives this script and ignores the Ctrl+C of its terminal.
    setsid .venv/bin/python "$1.py" >>"$LOGS/$1.log" 2>&1 </dev/null &
    echo $! >"$LOGS/$1.pid"
    local deadline=$((SECONDS + 30))
    until grep -q "$2" "$LOGS/$1.log"; do
        if [ $SECONDS -ge $deadline ] || ! daemon_pid "$1" >/dev/null; then
            tail -n 20 "$LOGS/$1.log" >&2
            echo "Error: $1.py did not start, see $LOGS/$1.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "Started $1.py (pid $(daemon_pid "$1")), logging to .stack/logs/$1.log"
}

stop_daemons() {
    local name pid
    for name in producer consumer; do
        pid=$(daemon_pid "$name") || continue
        kill -TERM "$pid"
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        echo "Stopped $name.py"
    done
}

psql_at() {  # psql_at source|dest SQL
    if [ "$1" = source ]; then
        psql -h localhost -p "$SOURCE_PORT" -U postgres -d "$SOURCE_DB" -v ON_ERROR_STOP=1 -qAt -c "$2"
    else
        psql -h localhost -p "$DEST_PORT" -U postgres -d "$DEST_DB" -v ON_ERROR_STOP=1 -qAt -c "$2"
    fi
}

wait_for_destination() {  # wait_for_destination SQL-THAT-RETURNS-A-ROW-WHEN-THERE STARTED-NS
    until [ -n "$(psql_at dest "$1")" ]; do
        if [ $(( ($(date +%s%N) - $2) / 1000000 )) -gt 30000 ]; then
            echo "Error: the destination did not get it within 30 s; see $LOGS" >&2
            exit 1
        fi
        sleep 0.05
    done
    echo $(( ($(date +%s%N) - $2) / 1000000 ))
}

load_sample() {
    [ "$(psql_at source "SELECT count(*) FROM employees")" = 0 ] || return 0
    local started count elapsed
    echo
    echo "The source has no employees yet: python admin.py load employees.csv (the sample, with 6 rows wrong on purpose)"
    started=$(date +%s%N)
    .venv/bin/python admin.py load employees.csv
    count=$(psql_at source "SELECT count(*) FROM employees")
    elapsed=$(wait_for_destination "SELECT 1 FROM employees HAVING count(*) = $count" "$started")
    echo "The destination ($DEST_PORT) has all $count after ${elapsed} ms:"
    psql -h localhost -p "$DEST_PORT" -U postgres -d "$DEST_DB" \
        -c "SELECT * FROM employees ORDER BY emp_id LIMIT 3"
}

offer_snapshot() {  # the rows that predate capture, when the destination has none yet
    local source_rows dest_rows answer
    source_rows=$(psql_at source "SELECT count(*) FROM employees")
    dest_rows=$(psql_at dest "SELECT count(*) FROM employees")
    if [ "$source_rows" -eq 0 ] || [ "$dest_rows" -ne 0 ]; then
        return 0
    fi
    echo
    echo "The source has $source_rows employees and the destination none."
    if [ -t 0 ]; then
        read -r -p "Copy them now with the initial snapshot (python admin.py snapshot)? [Y/n] " answer
        case $answer in [nN]*) return 0 ;; esac
        .venv/bin/python admin.py snapshot
    else
        echo "Copy them with:  .venv/bin/python admin.py snapshot"
    fi
}

demonstrate() {
    local emp_id=$((900000 + RANDOM)) started elapsed
    echo
    echo "Demonstration: INSERT INTO employees ... VALUES ($emp_id, 'Demo', 'User', '1990-01-01', 'New York', 75000) on the source ($SOURCE_PORT)"
    psql_at source "DELETE FROM employees WHERE emp_id = $emp_id"
    started=$(date +%s%N)
    psql_at source "INSERT INTO employees (emp_id, first_name, last_name, dob, city, salary)
                  VALUES ($emp_id, 'Demo', 'User', '1990-01-01', 'New York', 75000)"
    elapsed=$(wait_for_destination "SELECT 1 FROM employees WHERE emp_id = $emp_id" "$started")
    echo "The destination ($DEST_PORT) has it after ${elapsed} ms:"
    psql -h localhost -p "$DEST_PORT" -U postgres -d "$DEST_DB" -c "SELECT * FROM employees WHERE emp_id = $emp_id"
    psql_at source "DELETE FROM employees WHERE emp_id = $emp_id"
    echo "Deleted it again on the source; the destination follows."
}

case ${1:-start} in
    start)
        bash "$ROOT/scripts/setup.sh"
        mkdir -p "$LOGS"
        start_daemon producer "Loaded offset"
        start_daemon consumer "Assigned partitions"
        load_sample
        offer_snapshot
        demonstrate
        echo
        echo "The pipeline is running. Watch it:  tail -f .stack/logs/producer.log .stack/logs/consumer.log"
        echo "Check it:  .venv/bin/python test_pipeline.py     Stop it:  bash scripts/run.sh stop"
        ;;
    stop) stop_daemons ;;
    -h|--help|help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
