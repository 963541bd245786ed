# Shared helpers for the project's scripts. Source it; do not run it.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '==> %s\n' "$*" >&2; }
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

# Python modules the scenario tests use (jsonschema validates the status page), from Debian's
# packages for Debian's python3, from PyPI for another python3 (pyenv, venv).
ensure_python_modules() {
    python3 -c 'import jsonschema' 2>/dev/null && return 0
    if [ "$(command -v python3)" = /usr/bin/python3 ]; then
        ensure_deps python3-jsonschema
    else
        log "installing jsonschema (PyPI) for $(command -v python3)"
        python3 -m pip install -q jsonschema
    fi
}

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
    local msgs cdylib
    msgs="$(mktemp)"
    ( cd "$ROOT" && NGINX_SOURCE_DIR="$tree" NGINX_BUILD_DIR="$tree/objs" \
        cargo build --release --lib --no-default-features --features export-modules \
        --target-dir "$ROOT/target/debian" --message-format=json-render-diagnostics ) >"$msgs" \
        || { rm -f "$msgs"; die "cargo build for Debian's nginx failed"; }
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
    [ -n "$cdylib" ] || die "could not find the module built for Debian's nginx"
    DEBIAN_NGINX_BIN=/usr/sbin/nginx
    DEBIAN_KYLIN_MODULE="$(dirname "$cdylib")/ngx_http_kylin_upstream_module.so"
    cp -f "$cdylib" "$DEBIAN_KYLIN_MODULE.tmp" && mv -f "$DEBIAN_KYLIN_MODULE.tmp" "$DEBIAN_KYLIN_MODULE"
    export DEBIAN_NGINX_BIN DEBIAN_KYLIN_MODULE
}
