#!/usr/bin/env bash
# The local stack without Docker: the source PostgreSQL on 5432, the destination
# PostgreSQL on 5433 and a single-node Kafka broker (KRaft) on 29092 (controller on
# 29093). SOURCE_DB_PORT, DEST_DB_PORT and KAFKA_PORT in the environment move them.
# Everything it writes lives under .stack/ in the repository (git-ignored).
#
#   scripts/stack.sh up [source|dest|kafka]...    start (all by default); idempotent
#   scripts/stack.sh down [source|dest|kafka]...  stop what up started
#   scripts/stack.sh status                        what runs, exit 1 if anything is down
#   scripts/stack.sh reset [source|dest|kafka]...  stop and wipe the data (all by default)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK="$ROOT/.stack"
KAFKA_DIR="$STACK/kafka"
KAFKA_LIBS="$KAFKA_DIR/libs"
SOURCE_PORT=${SOURCE_DB_PORT:-5432}
DEST_PORT=${DEST_DB_PORT:-5433}
KAFKA_PORT=${KAFKA_PORT:-29092}
CONTROLLER_PORT=$((KAFKA_PORT + 1))
KAFKA_HEAP=${KAFKA_HEAP:-512m}
PG_PASSWORD=postgres
SERVICES=(source dest kafka)

say() { printf '%s\n' "$*"; }
die() { printf 'Error: %s\n' "$*" >&2; exit 1; }
# A log is all a CI run shows of a failure, so its end goes to stderr too.
die_with_log() {  # die_with_log LOG MESSAGE
    tail -n 20 "$1" >&2 2>/dev/null || true
    die "$2, see $1"
}

# --- prerequisites ----------------------------------------------------------

pg_bindir() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -x "$dir/initdb" ] && { echo "$dir"; return; }
    done
    command -v initdb >/dev/null && dirname "$(command -v initdb)"
}

check_prerequisites() {
    local missing=() packages=()
    command -v java >/dev/null || { missing+=(Java); packages+=(openjdk-17-jre-headless); }
    command -v mvn >/dev/null || { missing+=(Maven); packages+=(maven); }
    [ -n "$(pg_bindir)" ] || { missing+=("PostgreSQL server"); packages+=(postgresql); }
    command -v psql >/dev/null || { missing+=(psql); packages+=(postgresql-client); }
    if [ ${#missing[@]} -gt 0 ]; then
        die "missing ${missing[*]}; install with: sudo apt-get install -y ${packages[*]}"
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

service_port() { case $1 in source) echo $SOURCE_PORT;; dest) echo $DEST_PORT;; kafka) echo $KAFKA_PORT;; esac; }
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
    pg_tls "$name" "$data"
    if ! pg_running "$name"; then
        port_open "$port" && die "port $port is already in use by another program; stop it and run up again"
        as_pg "$bin/pg_ctl" -D "$data" -l "$root/$name.log" -w -t 60 start >/dev/null \
            || die_with_log "$root/$name.log" "the $name PostgreSQL did not start"
    fi
    if [ -n "$fresh" ]; then
        PGPASSWORD=$PG_PASSWORD psql -h localhost -p "$port" -U postgres -d postgres -q \
            -v ON_ERROR_STOP=1 -f "$(pg_init_sql "$name")" >/dev/null && pg_roles "$name" "$port" \
            || { pg_down "$name"; rm -rf "$data"; die "$(pg_init_sql "$name") failed on the $name database"; }
    fi
    say "$name PostgreSQL is up on localhost:$port"
}

pg_down() {
    pg_running "$1" || return 0
    as_pg "$(pg_bindir)/pg_ctl" -D "$(pg_data "$1")" -m fast -w stop >/dev/null
    say "$1 PostgreSQL stopped"
}

# --- Kafka --------------------------------------------------------------------

kafka_java() {  # kafka_java MAIN-CLASS ARGS...
    java -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.properties" "$@"
}

kafka_pid() {
    local pid
    pid=$(cat "$KAFKA_DIR/kafka.pid" 2>/dev/null) || return 1
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
    kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "localhost:$KAFKA_PORT" \
        --create --if-not-exists --topic "$1" --partitions "$2" --replication-factor 1 >/dev/null
}

kafka_started() { grep -q "Kafka Server started" "$KAFKA_DIR/kafka.log" && port_open $KAFKA_PORT; }

kafka_up() {
    local fresh=
    mkdir -p "$KAFKA_DIR"
    kafka_libs
    if [ ! -f "$KAFKA_DIR/data/meta.properties" ]; then
        port_open $KAFKA_PORT && die "port $KAFKA_PORT is already in use by another program"
        rm -rf "$KAFKA_DIR/data"
        sed -e "s|@DATA_DIR@|$KAFKA_DIR/data|" -e "s|@KAFKA_PORT@|$KAFKA_PORT|" \
            -e "s|@CONTROLLER_PORT@|$CONTROLLER_PORT|" "$ROOT/scripts/kafka/server.properties" >"$KAFKA_DIR/server.properties"
        # Kafka's own generator: a home-made id that starts with '-' (1 in 64)
        # reads as an option and the format fails.
        local cluster_id
        cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid | tail -n 1) \
            || die "kafka-storage random-uuid failed"
        kafka_java kafka.tools.StorageTool format --standalone --cluster-id "$cluster_id" \
            --config "$KAFKA_DIR/server.properties" >"$KAFKA_DIR/format.log" 2>&1 \
            || die_with_log "$KAFKA_DIR/format.log" "formatting the Kafka log directory failed"
        fresh=1
    fi
    if ! kafka_pid >/dev/null; then
        port_open $KAFKA_PORT && die "port $KAFKA_PORT is already in use by another program"
        # setsid: the broker outlives the shell that started it, and its Ctrl+C.
        KAFKA_HEAP_OPTS= setsid java -Xms"$KAFKA_HEAP" -Xmx"$KAFKA_HEAP" -Djava.awt.headless=true \
            -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.properties" \
            kafka.Kafka "$KAFKA_DIR/server.properties" >"$KAFKA_DIR/kafka.log" 2>&1 </dev/null &
        echo $! >"$KAFKA_DIR/kafka.pid"
        wait_for 90 kafka_started \
            || die_with_log "$KAFKA_DIR/kafka.log" "Kafka did not start within 90 s"
    fi
    if [ -n "$fresh" ]; then
        kafka_create_topic bf_employee_cdc 3
        kafka_create_topic bf_employee_cdc_dlq 1
        say "Created topics bf_employee_cdc (3 partitions) and bf_employee_cdc_dlq (1 partition)"
    fi
    say "Kafka is up on localhost:$KAFKA_PORT"
}

kafka_down() {
    local pid
    pid=$(kafka_pid) || return 0
    kill -TERM "$pid"
    wait_for 60 bash -c "! kill -0 $pid 2>/dev/null" || kill -KILL "$pid"
    rm -f "$KAFKA_DIR/kafka.pid"
    say "Kafka stopped"
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

service_do() {  # service_do up|down NAME
    case $2 in
        source|dest) "pg_$1" "$2" ;;
        kafka) "kafka_$1" ;;
    esac
}

cmd_up() {
    check_prerequisites
    local names=("$@") name
    [ ${#names[@]} -gt 0 ] || names=("${SERVICES[@]}")
    for name in "${names[@]}"; do service_do up "$name"; done
}

cmd_down() {
    local names=("$@") name
    [ ${#names[@]} -gt 0 ] || names=(kafka dest source)
    for name in "${names[@]}"; do service_do down "$name"; done
}

service_running() {
    case $1 in
        source|dest) [ -n "$(pg_bindir)" ] && [ -d "$STACK/pg/$1" ] && pg_running "$1" ;;
        kafka) kafka_pid >/dev/null && port_open $KAFKA_PORT ;;
    esac
}

cmd_status() {
    local name state all_up=0
    for name in "${SERVICES[@]}"; do
        if service_running "$name"; then state=up; else state=down; all_up=1; fi
        printf '%-7s %-15s %s\n' "$name" "localhost:$(service_port "$name")" "$state"
    done
    return $all_up
}

service_wipe() {  # service_wipe NAME: its data, never the Kafka jars
    case $1 in
        source|dest) [ -e "$STACK/pg" ] && rm -rf "$(pg_data "$1")" ;;
        kafka) rm -rf "$KAFKA_DIR/data" "$KAFKA_DIR/server.properties" "$KAFKA_DIR"/*.log ;;
    esac
    return 0
}

cmd_reset() {
    local names=("$@") name
    [ ${#names[@]} -gt 0 ] || names=(kafka dest source)
    cmd_down "${names[@]}"
    for name in "${names[@]}"; do service_wipe "$name"; done
    say "Wiped the data of: ${names[*]} (the Kafka jars are kept)"
}

case ${1:-} in
    up|down|reset) command=$1; shift; check_names "$@"; "cmd_$command" "$@" ;;
    status) cmd_status ;;
    -h|--help|help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
