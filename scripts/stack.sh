#!/usr/bin/env bash
# The local stack without Docker: the source PostgreSQL on 5432, the destination
# PostgreSQL on 5433 and a single-node Kafka (KRaft) on 29092 (controller on 29093).
# SOURCE_DB_PORT, DEST_DB_PORT and KAFKA_PORT in the environment move them.
# KAFKA_BROKERS=3 makes Kafka a cluster of three nodes, kafka1 to kafka3, on KAFKA_PORT,
# +2 and +4 (controllers one above each), its topics replicated three times.
# Everything it writes lives under .stack/ in the repository (git-ignored).
#
#   scripts/stack.sh up [source|dest|kafka|kafkaN]...    start (all by default); idempotent
#   scripts/stack.sh down [source|dest|kafka|kafkaN]...  stop what up started
#   scripts/stack.sh kill [source|dest|kafka|kafkaN]...  stop at once, as a crash would
#   scripts/stack.sh status                               what runs, exit 1 if anything is down
#   scripts/stack.sh reset [source|dest|kafka]...         stop and wipe the data (all by default)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK="$ROOT/.stack"
KAFKA_DIR="$STACK/kafka"
KAFKA_LIBS="$KAFKA_DIR/libs"
# The classes a broker loads, archived by the JVM (AppCDS) at its first clean stop and
# mapped by every start after: a node then starts in about half the time (7.6 s
# instead of 13.7 s beside two busy cores; 38 s per node under the cluster tests' load
# before). Beside the jars, so new jars drop it; a JVM that cannot use it says so in
# kafka.log and starts without.
KAFKA_CLASSES="$KAFKA_LIBS/kafka.jsa"
SOURCE_PORT=${SOURCE_DB_PORT:-5432}
DEST_PORT=${DEST_DB_PORT:-5433}
KAFKA_PORT=${KAFKA_PORT:-29092}
KAFKA_BROKERS=${KAFKA_BROKERS:-1}
PG_PASSWORD=postgres

say() { printf '%s\n' "$*"; }
die() { printf 'Error: %s\n' "$*" >&2; exit 1; }
# A log is all a CI run shows of a failure, so its end goes to stderr too.
die_with_log() {  # die_with_log LOG MESSAGE
    tail -n 20 "$1" >&2 2>/dev/null || true
    die "$2, see $1"
}

[[ $KAFKA_BROKERS =~ ^[1-9]$ ]] || die "KAFKA_BROKERS: '$KAFKA_BROKERS' is not a number of Kafka nodes from 1 to 9"
# Each change is kept on up to 3 nodes; with 3, a write needs 2 of them (min.insync.replicas),
# so one node may die without losing an acknowledged change or stopping the writes.
REPLICATION=$((KAFKA_BROKERS < 3 ? KAFKA_BROKERS : 3))
MIN_ISR=$((REPLICATION < 3 ? 1 : 2))
# Sized so that three nodes and both PostgreSQL servers share 2 cores and a few GB.
if [ "$KAFKA_BROKERS" = 1 ]; then KAFKA_HEAP=${KAFKA_HEAP:-512m}; else KAFKA_HEAP=${KAFKA_HEAP:-320m}; fi
SERVICES=(source dest kafka)
[ "$KAFKA_BROKERS" = 1 ] || SERVICES+=($(seq -f 'kafka%g' "$KAFKA_BROKERS"))

# --- prerequisites ----------------------------------------------------------

# shellcheck source=scripts/prerequisites.sh
source "$ROOT/scripts/prerequisites.sh"

check_prerequisites() {
    missing_prerequisites java maven server psql openssl
    if [ ${#MISSING[@]} -gt 0 ]; then
        die "missing ${MISSING[*]}; install with: sudo apt-get install -y ${PACKAGES[*]}"
    fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # wait_for SECONDS COMMAND...
    local seconds=$1; shift
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}

# --- TLS ----------------------------------------------------------------------
# A CA of the stack's own, made once with openssl, and signed by it a certificate for
# localhost (the servers') and one for a client (CN cdc_reader). PostgreSQL serves TLS
# beside plaintext, so the quick start needs no certificate and a client that asks
# for verify-full gets it; the tests' SASL_SSL broker serves the same certificate.
TLS_DIR="$STACK/tls"

tls_sign() {  # tls_sign NAME SUBJECT [EXTENSIONS]: NAME.key and NAME.crt, signed by the CA
    openssl req -new -newkey rsa:2048 -nodes -subj "$2" -keyout "$TLS_DIR/$1.key" \
        -out "$TLS_DIR/$1.csr" 2>/dev/null
    openssl x509 -req -in "$TLS_DIR/$1.csr" -CA "$TLS_DIR/ca.crt" -CAkey "$TLS_DIR/ca.key" \
        -CAcreateserial -days 3650 -extfile <(printf '%s\n' "${3:-basicConstraints=CA:FALSE}") \
        -out "$TLS_DIR/$1.crt" 2>/dev/null
    rm -f "$TLS_DIR/$1.csr"
    chmod 600 "$TLS_DIR/$1.key"
}

tls_certificates() {
    [ -f "$TLS_DIR/client.crt" ] && return
    command -v openssl >/dev/null || die "missing openssl; install with: sudo apt-get install -y openssl"
    rm -rf "$TLS_DIR"; mkdir -p "$TLS_DIR"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=cdc local stack CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.crt" 2>/dev/null \
        || die "openssl could not make the stack's CA in $TLS_DIR"
    chmod 600 "$TLS_DIR/ca.key"
    tls_sign server "/CN=localhost" "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        || die "openssl could not make the server certificate in $TLS_DIR"
    tls_sign client "/CN=cdc_reader" || die "openssl could not make the client certificate in $TLS_DIR"
    say "Made a CA and certificates for localhost in $TLS_DIR"
}

pg_tls() {  # pg_tls NAME DATA: TLS on (plaintext still allowed), once; reloads a running server
    local data=$2 owner=()
    grep -q '^ssl = on' "$data/postgresql.conf" && return
    tls_certificates
    [ "$(id -u)" = 0 ] && owner=(-o postgres -g postgres)
    install -m 600 "${owner[@]}" "$TLS_DIR/server.crt" "$TLS_DIR/server.key" "$TLS_DIR/ca.crt" "$data/"
    # ssl_ca_file: a client certificate, if one is presented, must be signed by the CA.
    cat >>"$data/postgresql.conf" <<EOF
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_ca_file = 'ca.crt'
EOF
    if pg_running "$1"; then as_pg "$(pg_bindir)/pg_ctl" -D "$data" reload >/dev/null; fi
}

# The least-privilege roles (scripts/*/roles.sql); on the local stack each role's
# password is its name unless CDC_PRODUCER_PASSWORD, ... say otherwise.
pg_roles() {  # pg_roles NAME PORT
    local roles_sql="$ROOT/scripts/source/roles.sql"
    [ "$1" = dest ] && roles_sql="$ROOT/scripts/destination/roles.sql"
    CDC_PRODUCER_PASSWORD=${CDC_PRODUCER_PASSWORD:-cdc_producer} \
    CDC_CONSUMER_PASSWORD=${CDC_CONSUMER_PASSWORD:-cdc_consumer} \
    CDC_READER_PASSWORD=${CDC_READER_PASSWORD:-cdc_reader} PGPASSWORD=$PG_PASSWORD \
        psql -h localhost -p "$2" -U postgres -d postgres -q -v ON_ERROR_STOP=1 -f "$roles_sql" >/dev/null
}

# --- PostgreSQL ---------------------------------------------------------------
# PostgreSQL refuses to run as root, so as root the servers run as user postgres.

pg_init_sql() { case $1 in source) echo "$ROOT/scripts/source/init.sql";; dest) echo "$ROOT/scripts/destination/init.sql";; esac; }

as_pg() {
    # From /: user postgres may not be allowed into the working directory.
    if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

pg_data_root() {
    local root="$STACK/pg"
    [ "$(id -u)" = 0 ] || { mkdir -p "$root"; echo "$root"; return; }
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    if [ ! -e "$root" ]; then
        mkdir -p "$root"
        # When user postgres cannot reach the repository (a clone under /root, say),
        # the data lives outside it, behind a link from .stack/pg.
        if ! runuser -u postgres -- test -x "$STACK"; then
            rmdir "$root"
            local outside="/var/lib/cdc-stack/$(printf '%s' "$ROOT" | md5sum | cut -c1-12)"
            mkdir -p "$outside"
            ln -s "$outside" "$root"
        fi
        chown postgres: "$root/"
    fi
    readlink -f "$root"
}

pg_data() { echo "$(readlink -f "$STACK/pg")/$1"; }

# The capture triggers in C (scripts/source/capture), built and installed into the
# server before the source's init.sql runs, which uses them where they are installed.
# Without the server's headers, a compiler or the right to write into the server's
# directories (scripts/setup.sh brings the first two), capture stays in PL/pgSQL.
pg_capture_extension() {
    local pg_config="$(pg_bindir)/pg_config" log="$STACK/capture-build.log"
    [ -x "$pg_config" ] || pg_config=pg_config
    mkdir -p "$STACK"
    make -C "$ROOT/scripts/source/capture" PG_CONFIG="$pg_config" install >"$log" 2>&1 \
        || say "Capture stays in PL/pgSQL: scripts/source/capture did not build or install (see $log)"
}

pg_running() { as_pg "$(pg_bindir)/pg_ctl" -D "$(pg_data "$1")" status >/dev/null 2>&1; }

pg_up() {
    local name=$1 port data bin root fresh=
    port=$(service_port "$name"); bin=$(pg_bindir); root=$(pg_data_root); data="$root/$name"
    if [ ! -f "$data/PG_VERSION" ]; then
        port_open "$port" && die "port $port is already in use by another program; stop it (Debian: pg_ctlcluster --help) and run up again"
        say "Creating the $name PostgreSQL cluster in $data"
        rm -rf "$data"
        local pwfile="$root/.pwfile"
        printf '%s\n' "$PG_PASSWORD" > "$pwfile"
        [ "$(id -u)" = 0 ] && chown postgres: "$pwfile"
        # Password authentication over TCP, as the postgres Docker image does.
        as_pg "$bin/initdb" -D "$data" -U postgres --pwfile="$pwfile" -E UTF8 --locale=C \
            --auth-host=scram-sha-256 --auth-local=trust >"$root/$name.initdb.log" 2>&1 \
            || { rm -f "$pwfile"; die_with_log "$root/$name.initdb.log" "initdb failed for $name"; }
        rm -f "$pwfile"
        cat >>"$data/postgresql.conf" <<EOF
listen_addresses = 'localhost'
port = $port
unix_socket_directories = ''
EOF
        fresh=1
    fi
    # Writers of employees may use two-phase commit (PREPARE TRANSACTION). A cluster
    # made before this line gets it too, a running one at its next start.
    grep -q '^max_prepared_transactions' "$data/postgresql.conf" \
        || echo "max_prepared_transactions = 10" | as_pg tee -a "$data/postgresql.conf" >/dev/null
    pg_tls "$name" "$data"
    # A cluster made for another port (SOURCE_DB_PORT or DEST_DB_PORT changed since)
    # would be reported up on a port nobody listens on: it moves at its next start.
    if ! grep -q "^port = $port\$" "$data/postgresql.conf"; then
        pg_running "$name" && die "the $name PostgreSQL runs on another port than $port: run scripts/stack.sh down $name, then up again"
        as_pg sed -i "s/^port = .*/port = $port/" "$data/postgresql.conf"
    fi
    if ! pg_running "$name"; then
        port_open "$port" && die "port $port is already in use by another program; stop it and run up again"
        as_pg "$bin/pg_ctl" -D "$data" -l "$root/$name.log" -w -t 60 start >/dev/null \
            || die_with_log "$root/$name.log" "the $name PostgreSQL did not start"
    fi
    [ "$name" = source ] && pg_capture_extension
    if [ -n "$fresh" ]; then
        PGPASSWORD=$PG_PASSWORD psql -h localhost -p "$port" -U postgres -d postgres -q \
            -v ON_ERROR_STOP=1 -f "$(pg_init_sql "$name")" >/dev/null && pg_roles "$name" "$port" \
            || { pg_down "$name"; rm -rf "$data"; die "$(pg_init_sql "$name") failed on the $name database"; }
    fi
    say "$name PostgreSQL is up on localhost:$port"
}

pg_down() {  # pg_down NAME [TERM|KILL]: KILL stops at once, as a crash would
    local mode=fast
    [ "${2:-TERM}" = TERM ] || mode=immediate
    pg_running "$1" || return 0
    as_pg "$(pg_bindir)/pg_ctl" -D "$(pg_data "$1")" -m "$mode" -w stop >/dev/null
    say "$1 PostgreSQL stopped"
}

# --- Kafka --------------------------------------------------------------------
# Node N (1 to KAFKA_BROKERS) listens on KAFKA_PORT + 2(N-1), its controller one above.
# The single node keeps its files in .stack/kafka; a cluster's nodes each have a
# directory of their own, named after the cluster's first port.

kafka_nodes() { seq 1 "$KAFKA_BROKERS"; }
broker_port() { echo $((KAFKA_PORT + 2 * ($1 - 1))); }
controller_port() { echo $(($(broker_port "$1") + 1)); }
node_name() { if [ "$KAFKA_BROKERS" = 1 ]; then echo kafka; else echo "kafka$1"; fi; }

node_dir() {
    if [ "$KAFKA_BROKERS" = 1 ]; then echo "$KAFKA_DIR"; else echo "$KAFKA_DIR/cluster-$KAFKA_PORT/kafka$1"; fi
}

addresses() {  # addresses broker_port|controller_port: localhost:PORT of every node, comma-separated
    local node
    for node in $(kafka_nodes); do printf 'localhost:%s,' "$("$1" "$node")"; done | sed 's/,$//'
}

kafka_java() {  # kafka_java MAIN-CLASS ARGS...
    java -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.properties" "$@"
}

kafka_pid() {  # kafka_pid NODE
    local pid
    pid=$(cat "$(node_dir "$1")/kafka.pid" 2>/dev/null) || return 1
    grep -qa kafka.Kafka "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

kafka_libs() {
    local stamp
    stamp=$(sha256sum "$ROOT/scripts/kafka/pom.xml" | cut -d' ' -f1)
    [ "$(cat "$KAFKA_LIBS/.pom.sha256" 2>/dev/null)" = "$stamp" ] && return
    say "Resolving the Kafka broker's jars from Maven Central (once)"
    rm -rf "$KAFKA_LIBS"
    mvn -q -B -f "$ROOT/scripts/kafka/pom.xml" dependency:copy-dependencies \
        -DoutputDirectory="$KAFKA_LIBS" >"$KAFKA_DIR/maven.log" 2>&1 \
        || die_with_log "$KAFKA_DIR/maven.log" "Maven could not resolve the Kafka jars"
    echo "$stamp" >"$KAFKA_LIBS/.pom.sha256"
}

kafka_create_topic() {  # kafka_create_topic NAME PARTITIONS
    kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "$(addresses broker_port)" \
        --create --if-not-exists --topic "$1" --partitions "$2" \
        --replication-factor "$REPLICATION" --config min.insync.replicas="$MIN_ISR" >/dev/null
}

kafka_started() { grep -q "Kafka Server started" "$(node_dir "$1")/kafka.log" && port_open "$(broker_port "$1")"; }

kafka_formatted() {  # kafka_formatted: every node (0), none (1); partly is an error
    local node count=0
    for node in $(kafka_nodes); do
        [ -f "$(node_dir "$node")/data/meta.properties" ] && count=$((count + 1))
    done
    [ "$count" = "$KAFKA_BROKERS" ] && return 0
    [ "$count" = 0 ] || die "only $count of the $KAFKA_BROKERS Kafka nodes have data; wipe them all with: scripts/stack.sh reset kafka"
    return 1
}

kafka_format() {
    # Kafka's own generator: a home-made id that starts with '-' (1 in 64)
    # reads as an option and the format fails.
    local cluster_id node dir quorum=() voters=
    cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid | tail -n 1) \
        || die "kafka-storage random-uuid failed"
    if [ "$KAFKA_BROKERS" = 1 ]; then
        quorum=(--standalone)
    else
        # Every node is a voter of the controller quorum from the start (dynamic quorum,
        # KIP-853): id@host:port:directory-id of each, the same list on each node.
        for node in $(kafka_nodes); do
            voters+="$node@localhost:$(controller_port "$node"):$(kafka_java kafka.tools.StorageTool random-uuid | tail -n 1),"
        done
        quorum=(--initial-controllers "${voters%,}")
    fi
    for node in $(kafka_nodes); do
        dir=$(node_dir "$node")
        port_open "$(broker_port "$node")" && die "port $(broker_port "$node") is already in use by another program"
        mkdir -p "$dir"
        rm -rf "$dir/data"
        sed -e "s|@DATA_DIR@|$dir/data|" -e "s|@NODE_ID@|$node|" \
            -e "s|@KAFKA_PORT@|$(broker_port "$node")|" -e "s|@CONTROLLER_PORT@|$(controller_port "$node")|" \
            -e "s|@QUORUM@|$(addresses controller_port)|" \
            -e "s|@REPLICATION@|$REPLICATION|" -e "s|@MIN_ISR@|$MIN_ISR|" \
            "$ROOT/scripts/kafka/server.properties" >"$dir/server.properties"
        kafka_java kafka.tools.StorageTool format "${quorum[@]}" --cluster-id "$cluster_id" \
            --config "$dir/server.properties" >"$dir/format.log" 2>&1 \
            || die_with_log "$dir/format.log" "formatting the Kafka log directory of $(node_name "$node") failed"
    done
}

kafka_start() {  # kafka_start NODE: launches it, without waiting
    local node=$1 dir classes
    dir=$(node_dir "$node")
    kafka_pid "$node" >/dev/null && return
    port_open "$(broker_port "$node")" && die "port $(broker_port "$node") is already in use by another program"
    classes=-XX:SharedArchiveFile="$KAFKA_CLASSES"
    [ -f "$KAFKA_CLASSES" ] || classes=-XX:ArchiveClassesAtExit="$dir/kafka.jsa"  # see kafka_down
    # setsid: the broker outlives the shell that started it, and its Ctrl+C.
    KAFKA_HEAP_OPTS= setsid java "$classes" -Xms"$KAFKA_HEAP" -Xmx"$KAFKA_HEAP" -Djava.awt.headless=true \
        -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.properties" \
        kafka.Kafka "$dir/server.properties" >"$dir/kafka.log" 2>&1 </dev/null &
    echo $! >"$dir/kafka.pid"
}

kafka_start_and_wait() {  # kafka_start_and_wait NODE...
    local node
    for node in "$@"; do kafka_start "$node"; done
    for node in "$@"; do
        wait_for 180 kafka_started "$node" \
            || die_with_log "$(node_dir "$node")/kafka.log" "$(node_name "$node") did not start within 180 s"
    done
}

kafka_up() {  # kafka_up NODE...: the nodes of a cluster start together, as each waits for a quorum
    local node topics_due
    mkdir -p "$KAFKA_DIR"
    kafka_libs
    # Until the topics exist: a start that failed after the format creates them next time.
    topics_due="$(node_dir 1)/topics.due"
    kafka_formatted || { kafka_format; touch "$topics_due"; }
    # The controllers' addresses are in the quorum's own log: a node made for another
    # port cannot move there.
    for node in "$@"; do
        grep -q "^listeners=[A-Z_]*://localhost:$(broker_port "$node")," "$(node_dir "$node")/server.properties" \
            || die "the Kafka data in $(node_dir "$node") was made for another port than $(broker_port "$node"): set KAFKA_PORT to it, or wipe it with scripts/stack.sh reset kafka"
    done
    kafka_start_and_wait "$@"
    if [ ! -f "$KAFKA_CLASSES" ]; then
        say "Archiving the Kafka broker's classes, for faster starts (once)"
        kafka_down TERM "$@" >/dev/null
        kafka_start_and_wait "$@"
    fi
    if [ -f "$topics_due" ]; then
        kafka_create_topic bf_employee_cdc 3
        kafka_create_topic bf_employee_cdc_dlq 1
        say "Created topics bf_employee_cdc (3 partitions) and bf_employee_cdc_dlq (1 partition)," \
            "replication factor $REPLICATION, min.insync.replicas $MIN_ISR"
        rm "$topics_due"
    fi
    if [ "$KAFKA_BROKERS" = 1 ]; then
        say "Kafka is up on localhost:$KAFKA_PORT"
    else
        for node in "$@"; do say "$(node_name "$node") is up on localhost:$(broker_port "$node")"; done
        say "KAFKA_BOOTSTRAP_SERVERS=$(addresses broker_port)"
    fi
}

kafka_down() {  # kafka_down SIGNAL NODE...: all signalled first, so none waits for the others
    local signal=$1 node pid pids=()
    shift
    for node in "$@"; do
        pid=$(kafka_pid "$node") || continue
        kill "-$signal" "$pid"
        pids+=("$node:$pid")
    done
    for node in "${pids[@]}"; do
        pid=${node#*:}; node=${node%%:*}
        if wait_for 60 bash -c "! kill -0 $pid 2>/dev/null"; then
            # A clean stop wrote the class archive kafka_start asked for.
            [ "$signal" != TERM ] || [ ! -s "$(node_dir "$node")/kafka.jsa" ] \
                || mv -f "$(node_dir "$node")/kafka.jsa" "$KAFKA_CLASSES"
        else
            kill -KILL "$pid"
        fi
        rm -f "$(node_dir "$node")/kafka.pid" "$(node_dir "$node")/kafka.jsa"
        if [ "$KAFKA_BROKERS" = 1 ]; then say "Kafka stopped"; else say "$(node_name "$node") stopped"; fi
    done
}

# --- commands -------------------------------------------------------------------

check_names() {  # check_names NAME...: all of them known, before any is touched
    local name
    for name in "$@"; do
        case " ${SERVICES[*]} " in
            *" $name "*) ;;
            *) die "unknown service '$name' (expected: ${SERVICES[*]})" ;;
        esac
    done
}

named() {  # named NAME LIST...: whether NAME is in the list
    local wanted=$1 name
    shift
    for name in "$@"; do [ "$name" = "$wanted" ] && return 0; done
    return 1
}

nodes_named() {  # nodes_named NAME...: the Kafka nodes the names stand for
    local name
    for name in "$@"; do
        case $name in
            kafka) kafka_nodes ;;
            kafka*) echo "${name#kafka}" ;;
        esac
    done | sort -un
}

cmd_up() {
    check_prerequisites
    [ $# -gt 0 ] || set -- "${SERVICES[@]}"
    local name nodes
    for name in source dest; do named "$name" "$@" && pg_up "$name"; done
    nodes=($(nodes_named "$@"))
    [ ${#nodes[@]} -eq 0 ] || kafka_up "${nodes[@]}"
}

stop_services() {  # stop_services TERM|KILL NAME...: KILL stops as a crash would
    local signal=$1 name nodes
    shift
    [ $# -gt 0 ] || set -- kafka dest source
    nodes=($(nodes_named "$@"))
    [ ${#nodes[@]} -eq 0 ] || kafka_down "$signal" "${nodes[@]}"
    for name in dest source; do named "$name" "$@" && pg_down "$name" "$signal"; done
    return 0
}

cmd_down() { stop_services TERM "$@"; }
cmd_kill() { stop_services KILL "$@"; }

status_names() { echo source dest; for node in $(kafka_nodes); do node_name "$node"; done; }

service_port() {
    case $1 in
        source) echo "$SOURCE_PORT" ;;
        dest) echo "$DEST_PORT" ;;
        kafka*) broker_port "$(nodes_named "$1")" ;;
    esac
}

service_running() {
    case $1 in
        source|dest) [ -n "$(pg_bindir)" ] && [ -d "$STACK/pg/$1" ] && pg_running "$1" ;;
        kafka*) kafka_pid "$(nodes_named "$1")" >/dev/null && port_open "$(service_port "$1")" ;;
    esac
}

cmd_status() {
    local name state all_up=0
    for name in $(status_names); do
        if service_running "$name"; then state=up; else state=down; all_up=1; fi
        printf '%-7s %-15s %s\n' "$name" "localhost:$(service_port "$name")" "$state"
    done
    return $all_up
}

service_wipe() {  # service_wipe NAME: its data, never the Kafka jars
    case $1 in
        source|dest) [ -e "$STACK/pg" ] && rm -rf "$(pg_data "$1")" ;;
        kafka) if [ "$KAFKA_BROKERS" = 1 ]; then
                   rm -rf "$KAFKA_DIR/data" "$KAFKA_DIR/server.properties" "$KAFKA_DIR"/*.log
               else
                   rm -rf "$KAFKA_DIR/cluster-$KAFKA_PORT"
               fi ;;
    esac
    return 0
}

cmd_reset() {
    local name
    [ $# -gt 0 ] || set -- kafka dest source
    for name in "$@"; do
        # A node's voter identity is in its data: the cluster is formatted as a whole.
        [[ $name != kafka?* ]] || die "one node of a cluster cannot be wiped alone; wipe them all with: scripts/stack.sh reset kafka"
    done
    cmd_down "$@"
    for name in "$@"; do service_wipe "$name"; done
    say "Wiped the data of: $* (the Kafka jars are kept)"
}

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

case ${1:-} in
    up|down|kill|reset) command=$1; shift; check_names "$@"; "cmd_$command" "$@" ;;
    status) cmd_status ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
