# What the stack and its scripts need from the system, and the Debian package that
# brings each. Sourced by scripts/setup.sh, which installs what is missing, and by
# scripts/stack.sh, which names it.

pg_bindir() {  # the newest PostgreSQL server's bin directory
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -x "$dir/initdb" ] && { echo "$dir"; return; }
    done
    command -v initdb >/dev/null && dirname "$(command -v initdb)"
}

pg_major() {  # the major version of that server, as Debian's package names have it
    local bin
    bin=$(pg_bindir)
    case $bin in /usr/lib/postgresql/*/bin) basename "$(dirname "$bin")" ;; *) echo all ;; esac
}

# missing_prerequisites NEED...: sets MISSING to what of java, maven, server, capture,
# psql, pgbench, openssl and venv this machine lacks, and PACKAGES to the Debian
# packages that bring it.
missing_prerequisites() {
    MISSING=() PACKAGES=()
    local need
    for need in "$@"; do
        case $need in
            java) command -v java >/dev/null || _missing Java openjdk-17-jre-headless ;;
            maven) command -v mvn >/dev/null || _missing Maven maven ;;
            server) [ -n "$(pg_bindir)" ] || _missing "PostgreSQL server" postgresql ;;
            psql) command -v psql >/dev/null || _missing psql postgresql-client ;;
            # Debian 12 ships pgbench with the server (postgresql-15), later releases
            # with the client; the postgresql package brings it on both.
            pgbench) command -v pgbench >/dev/null || _missing pgbench postgresql ;;
            # stack.sh builds the capture triggers in C (scripts/source/capture) with them.
            capture) [ -f "$("$(pg_bindir)/pg_config" --includedir-server 2>/dev/null)/postgres.h" ] \
                         || _missing "PostgreSQL's server headers" "postgresql-server-dev-$(pg_major)"
                     command -v gcc >/dev/null || _missing "a C compiler" gcc
                     command -v make >/dev/null || _missing make make ;;
            # stack.sh makes the stack's TLS certificates with it.
            openssl) command -v openssl >/dev/null || _missing openssl openssl ;;
            venv) "${PYTHON:-python3}" -c "import ensurepip, venv" 2>/dev/null \
                      || _missing python3-venv python3-venv ;;
        esac
    done
}

_missing() {  # _missing NAME PACKAGE
    MISSING+=("$1")
    case " ${PACKAGES[*]} " in *" $2 "*) ;; *) PACKAGES+=("$2") ;; esac
}
