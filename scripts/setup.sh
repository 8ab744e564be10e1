#!/usr/bin/env bash
# Everything the pipeline needs, set up on this machine: the system packages it lacks
# (Java, Maven, PostgreSQL's server and its headers, a C compiler, psql, pgbench,
# python3-venv), the Python packages of requirements.txt and requirements-test.txt in
# the virtual environment .venv, and the local stack (scripts/stack.sh up). Run again,
# it only checks.
#
# The packages come from apt-get, run as root, or through `sudo -n` where that needs no
# password; otherwise set-up stops with the one command to run. Debian's postgresql
# package starts a cluster of its own: one that holds a port of the stack (5432, 5433,
# 29092, 29093, or SOURCE_DB_PORT, DEST_DB_PORT, KAFKA_PORT and the one after it) is
# stopped if installing just started it; one that ran before is left alone, and set-up
# stops with a line naming it.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
KAFKA_PORT=${KAFKA_PORT:-29092}
STACK_PORTS=" ${SOURCE_DB_PORT:-5432} ${DEST_DB_PORT:-5433} $KAFKA_PORT $((KAFKA_PORT + 1)) "
# shellcheck source=scripts/prerequisites.sh
source "$ROOT/scripts/prerequisites.sh"

say() { printf '%s\n' "$*"; }
die() { printf 'Error: %s\n' "$*" >&2; exit 1; }

as_root_prefix() {  # how this user runs a command as root: nothing, "sudo -n", or status 1
    if [ "$(id -u)" = 0 ]; then
        echo
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        echo "sudo -n"
    else
        return 1
    fi
}

running_clusters_on_stack_ports() {  # VERSION NAME PORT of each Debian cluster in the way
    command -v pg_lsclusters >/dev/null || return 0
    local version name port status _
    pg_lsclusters --no-header | while read -r version name port status _; do
        case $status in online*) ;; *) continue ;; esac
        case $STACK_PORTS in *" $port "*) echo "$version $name $port" ;; esac
    done
}

refuse_clusters_of_the_user() {
    local version name port
    read -r version name port < <(running_clusters_on_stack_ports) || return 0
    die "Debian's PostgreSQL cluster $version/$name runs on port $port, which the stack needs;" \
        "free the port with: sudo pg_ctlcluster $version $name stop" \
        "(or move the stack with SOURCE_DB_PORT, DEST_DB_PORT and KAFKA_PORT)"
}

install_missing_packages() {  # returns 1 if nothing was missing
    missing_prerequisites java maven server capture psql pgbench openssl venv
    [ ${#PACKAGES[@]} -gt 0 ] || return 1
    command -v apt-get >/dev/null \
        || die "missing ${MISSING[*]}; install them (Debian's packages: ${PACKAGES[*]})"
    local root
    if ! root=$(as_root_prefix); then
        local sudo="sudo "
        command -v sudo >/dev/null || sudo=
        die "missing ${MISSING[*]}; install with: ${sudo}apt-get update && ${sudo}apt-get install -y ${PACKAGES[*]}"
    fi
    say "Installing ${PACKAGES[*]} (missing ${MISSING[*]})"
    $root apt-get update -q
    $root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${PACKAGES[@]}"
    missing_prerequisites java maven server capture psql pgbench openssl venv
    [ ${#MISSING[@]} -eq 0 ] || die "still missing ${MISSING[*]} after apt-get install -y ${PACKAGES[*]}"
}

stop_clusters_the_install_started() {
    local root version name port
    root=$(as_root_prefix)
    running_clusters_on_stack_ports | while read -r version name port; do
        $root pg_ctlcluster "$version" "$name" stop || die "pg_ctlcluster $version $name stop failed"
        say "Stopped Debian's PostgreSQL cluster $version/$name, which installing postgresql" \
            "started on port $port; the stack needs the port (start it again with:" \
            "pg_ctlcluster $version $name start)"
    done
}

refuse_clusters_of_the_user
if install_missing_packages; then
    stop_clusters_the_install_started
fi

if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "Creating the virtual environment .venv"
    "$PYTHON" -m venv "$ROOT/.venv" || die "$PYTHON cannot create a virtual environment"
fi
stamp=$(cat "$ROOT/requirements.txt" "$ROOT/requirements-test.txt" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$ROOT/.venv/.requirements.sha256" 2>/dev/null)" != "$stamp" ]; then
    echo "Installing requirements.txt and requirements-test.txt into .venv"
    "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements-test.txt"
    echo "$stamp" >"$ROOT/.venv/.requirements.sha256"
fi
bash "$ROOT/scripts/stack.sh" up
