# Shared helpers for the project's scripts. Source it; do not run it.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '==> [%s] %s\n' "$(date -u +%T)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Debian packages the build, the tests and the demo need.
DEB_PACKAGES=(
    # build: nginx (vendored by nginx-src) and bindgen
    gcc g++ make libclang-dev libpcre2-dev libssl-dev zlib1g-dev pkg-config
    # Test::Nginx-compatible runner and prove
    perl libtest-base-perl libtext-diff-perl libtest-longstring-perl libwww-perl
    libipc-run-perl liburi-perl liblist-moreutils-perl
    # demo backends, build helper, scenario tests; Redis for the session-store tests
    python3 curl redis-server redis-tools
    # TLS certificates for the rediss:// tests
    openssl
)

# Waits up to 10 s until something accepts TCP connections on 127.0.0.1:PORT.
wait_port() {
    local i
    for i in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# Installs what is missing, idempotently; does nothing (and needs no network) when all is there.
ensure_deps() {
    local missing=() p
    for p in "${DEB_PACKAGES[@]}" "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' \
            || missing+=("$p")
    done
    if ((${#missing[@]})); then
        [ "$(id -u)" = 0 ] || die "missing Debian packages (${missing[*]}); run as root or install them"
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (rustup)"
}

# Python module $1 for the tests, from Debian's package $2 for Debian's python3, from PyPI's
# package $3 for another python3 (pyenv, venv).
ensure_python_module() {
    python3 -c "import $1" 2>/dev/null && return 0
    if [ "$(command -v python3)" = /usr/bin/python3 ]; then
        ensure_deps "$2"
    else
        log "installing $3 (PyPI) for $(command -v python3)"
        python3 -m pip install -q "$3"
    fi
}

# Python modules the scenario tests use: jsonschema validates the status page, websocket
# (websocket-client) drives Chromium over the DevTools protocol in the dashboard's browser test.
ensure_python_modules() {
    ensure_python_module jsonschema python3-jsonschema jsonschema
    ensure_python_module websocket python3-websocket websocket-client
}

# Debian packages of the dashboard's browser test and the monitoring files' checks: headless
# Chromium, and Prometheus (its promtool checks the alerting rules; the server evaluates the
# Grafana dashboard's queries against a real scrape).
MONITORING_PACKAGES=(chromium prometheus)

# Builds nginx and the module in one cargo run, then sets and exports:
#   NGINX_BIN      the nginx binary the module was built against (vendored, or
#                  NGINX_BUILD_DIR/nginx when building against an external tree)
#   KYLIN_MODULE   the module, ngx_http_kylin_upstream_module.so
# PROFILE=release|debug (default release). Extra cargo arguments pass through.
build_module() {
    local profile="${PROFILE:-release}" flags=() msgs
    [ "$profile" = release ] && flags+=(--release)
    msgs="$(mktemp)"
    ( cd "$ROOT" && cargo build "${flags[@]}" --lib --message-format=json-render-diagnostics "$@" ) >"$msgs" \
        || { rm -f "$msgs"; die "cargo build failed"; }
    # Our build.rs forwards nginx-sys's DEP_NGINX_BUILD_DIR to the compiler environment; cargo
    # reports that environment in its JSON messages, so nothing here depends on a hash path.
    local out
    out="$(python3 - "$msgs" <<'PY'
import json, sys
build_dir = cdylib = None
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "build-script-executed" and "ngx_http_kylin_upstream_module" in m.get("package_id", ""):
        for k, v in m.get("env", []):
            if k == "DEP_NGINX_BUILD_DIR":
                build_dir = v
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "ngx_http_kylin_upstream_module":
        for f in m.get("filenames", []):
            if f.endswith(".so"):
                cdylib = f
print(build_dir or "")
print(cdylib or "")
PY
)"
    rm -f "$msgs"
    local build_dir cdylib
    build_dir="$(sed -n 1p <<<"$out")"
    cdylib="$(sed -n 2p <<<"$out")"
    [ -n "$build_dir" ] || die "could not find nginx's build directory in cargo's output"
    [ -n "$cdylib" ] || die "could not find the module library in cargo's output"
    NGINX_BIN="$build_dir/nginx"
    if [ ! -x "$NGINX_BIN" ]; then
        # An external tree may be configured but not built; its installed binary is the user's.
        die "no nginx binary at $NGINX_BIN (build it with make in that tree, or use the vendored build)"
    fi
    KYLIN_MODULE="$(dirname "$cdylib")/ngx_http_kylin_upstream_module.so"
    cp -f "$cdylib" "$KYLIN_MODULE.tmp" && mv -f "$KYLIN_MODULE.tmp" "$KYLIN_MODULE"
    export NGINX_BIN KYLIN_MODULE
}

# Runs `nginx -t` on every nginx-conf/*.conf, with the module path pointed at the build.
check_example_configs() {
    local conf dir rc=0
    dir="$(mktemp -d)"
    mkdir -p "$dir/logs" "$dir/conf"
    for conf in "$ROOT"/nginx-conf/*.conf; do
        sed "s#^load_module .*#load_module $KYLIN_MODULE;#" "$conf" >"$dir/conf/nginx.conf"
        if "$NGINX_BIN" -p "$dir" -c conf/nginx.conf -t -q -g "pid $dir/nginx.pid; error_log $dir/logs/error.log;"; then
            echo "ok: $(basename "$conf")"
        else
            echo "FAILED: nginx -t on $conf" >&2
            rc=1
        fi
    done
    rm -rf "$dir"
    return $rc
}

# Builds the module for the nginx that Debian installs (/usr/sbin/nginx, with nginx-dev's
# sources in /usr/share/nginx/src): configures a copy of those sources with Debian's own
# flags, then builds against it in target/debian. Sets and exports DEBIAN_NGINX_BIN and
# DEBIAN_KYLIN_MODULE.
build_module_debian() {
    ensure_deps nginx-core nginx-dev
    local src=/usr/share/nginx/src tree="$ROOT/target/debian/nginx-src" stamp
    stamp="$(/usr/sbin/nginx -v 2>&1) $(md5sum "$src/conf_flags" | cut -d' ' -f1)"
    if [ ! -f "$tree/objs/Makefile" ] || [ "$(cat "$tree/.kylin-stamp" 2>/dev/null)" != "$stamp" ]; then
        log "configuring a copy of Debian's nginx sources ($(/usr/sbin/nginx -v 2>&1))"
        rm -rf "$tree"
        mkdir -p "$tree"
        cp -a "$src/." "$tree/"
        (
            cd "$tree"
            # shellcheck disable=SC1091
            . ./conf_flags
            ./configure "${NGX_CONF_FLAGS[@]}" >configure.log 2>&1
        ) || die "configure failed: see $tree/configure.log"
        echo "$stamp" >"$tree/.kylin-stamp"
    fi
    DEBIAN_KYLIN_MODULE="$(build_module_external "$tree" "$ROOT/target/debian" "Debian's nginx")" || exit 1
    DEBIAN_NGINX_BIN=/usr/sbin/nginx
    export DEBIAN_NGINX_BIN DEBIAN_KYLIN_MODULE
}

# Builds the module against a configured external nginx tree ($1, with $1/objs) and copies
# it to directory $2 as ngx_http_kylin_upstream_module.so; prints that path. $3 names the
# nginx in error messages. Every external nginx shares one cargo target directory
# (target/external): the crates that do not depend on nginx are built once for all of them.
build_module_external() {
    local tree="$1" dest="$2" what="$3" msgs cdylib so
    msgs="$(mktemp)"
    ( cd "$ROOT" && NGINX_SOURCE_DIR="$tree" NGINX_BUILD_DIR="$tree/objs" \
        cargo build --release --lib --no-default-features --features export-modules \
        --target-dir "$ROOT/target/external" --message-format=json-render-diagnostics ) >"$msgs" \
        || { rm -f "$msgs"; die "cargo build for $what failed"; }
    cdylib="$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "ngx_http_kylin_upstream_module":
        for f in m.get("filenames", []):
            if f.endswith(".so"):
                print(f)
' "$msgs")"
    rm -f "$msgs"
    [ -n "$cdylib" ] || die "could not find the module built for $what"
    mkdir -p "$dest"
    so="$dest/ngx_http_kylin_upstream_module.so"
    cp -f "$cdylib" "$so.tmp" && mv -f "$so.tmp" "$so"
    echo "$so"
}

# nginx.org releases the test command builds and tests against, besides the vendored nginx
# and Debian's: the current stable and mainline.
NGINX_ORG_VERSIONS=(1.30.4 1.31.4)

# The source of nginx.org release $1: nginx-$1.tar.gz or a tree nginx-$1/ in the directory
# NGINX_ORG_SOURCES (default: shared/nginx beside the checkout), or NGINX_ORG_SOURCES itself
# when it is that tarball or tree. Prints the path; fails when there is none.
nginx_org_source() {
    local v="$1" dir="${NGINX_ORG_SOURCES:-$ROOT/../shared/nginx}" c
    for c in "$dir" "$dir/nginx-$v.tar.gz" "$dir/nginx-$v"; do
        case "$c" in
            *nginx-"$v".tar.gz) [ -f "$c" ] && { echo "$c"; return 0; } ;;
            *nginx-"$v") [ -x "$c/configure" ] && { echo "$c"; return 0; } ;;
        esac
    done
    return 1
}

# configure flags of the nginx.org builds: those of the vendored build.
NGINX_ORG_FLAGS=(--with-compat --with-threads --with-http_realip_module --with-http_ssl_module
    --with-http_v2_module --with-stream --with-stream_realip_module --with-stream_ssl_module)

# Builds nginx.org release $1 from its source (verified against SHA256SUMS beside a tarball)
# in target/nginx-$1/src, configured like the vendored nginx, then the module against it.
# Sets NGINX_ORG_BIN and NGINX_ORG_MODULE. Builds only what changed since the last run.
build_module_nginx_org() {
    local v="$1" src top="$ROOT/target/nginx-$1" stamp sums
    src="$(nginx_org_source "$v")" || die "no source of nginx $v: put nginx-$v.tar.gz (or the unpacked nginx-$v/) into ${NGINX_ORG_SOURCES:-$ROOT/../shared/nginx} or point NGINX_ORG_SOURCES at it (NGINX_ORG_SKIP=1 skips these builds, loudly)"
    if [ -f "$src" ]; then
        sums="$(dirname "$src")/SHA256SUMS"
        if [ -f "$sums" ]; then
            ( cd "$(dirname "$src")" && grep " $(basename "$src")\$" SHA256SUMS | sha256sum -c --quiet - ) \
                || die "$src does not match $sums"
        fi
        stamp="$v $(sha256sum "$src" | cut -d' ' -f1) ${NGINX_ORG_FLAGS[*]}"
    else
        stamp="$v $(find "$src" -type f -newer "$src/configure" | wc -l) ${NGINX_ORG_FLAGS[*]}"
    fi
    if [ ! -x "$top/src/objs/nginx" ] || [ "$(cat "$top/.kylin-stamp" 2>/dev/null)" != "$stamp" ]; then
        log "building nginx $v from $src"
        rm -rf "$top/src"
        mkdir -p "$top/src"
        if [ -f "$src" ]; then
            tar -xzf "$src" -C "$top/src" --strip-components=1
        else
            cp -a "$src/." "$top/src/"
        fi
        (
            cd "$top/src"
            ./configure "${NGINX_ORG_FLAGS[@]}" >configure.log 2>&1 || { tail -20 configure.log; exit 1; }
            make -j"$(nproc)" >make.log 2>&1 || { tail -30 make.log; exit 1; }
        ) || die "building nginx $v failed (see $top/src/configure.log and make.log)"
        echo "$stamp" >"$top/.kylin-stamp"
    fi
    NGINX_ORG_MODULE="$(build_module_external "$top/src" "$top" "nginx $v")" || exit 1
    NGINX_ORG_BIN="$top/src/objs/nginx"
    export NGINX_ORG_BIN NGINX_ORG_MODULE
}
