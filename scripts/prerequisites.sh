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

# missing_prerequisites NEED...: sets MISSING to what of java, maven, server, psql,
# pgbench, openssl and venv this machine lacks, and PACKAGES to the Debian packages that bring it.
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
