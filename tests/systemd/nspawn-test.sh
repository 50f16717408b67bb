#!/usr/bin/env bash
# Real-systemd test of the units in systemd/: boots Debian bookworm under systemd-nspawn (a real
# systemd 252 as PID 1), installs kakao-tokend, runs kakao-tokend.service against the Kakao
# emulator and checks READY/STATUS, refreshes, journald priorities, credentials, token-file
# access, reload, the watchdog, stop and the no-restart-on-78 policy; then the per-account
# template (kakao-tokend@default.service) and the user unit under a user's own service manager
# (start, refreshes, files, reload, stop). Slow and root-only: NOT part of pytest;
# .ci/systemd-test runs it where the machine allows.
#
# Usage: tests/systemd/nspawn-test.sh
#   KT_NSPAWN_CACHE   cache dir for the rootfs layers (default /var/cache/kakao-tokend-ci)
#   KT_NSPAWN_MIRROR  Debian mirror (default: the first bookworm mirror in /etc/apt, else deb.debian.org)
#   PYTHON            python with pip used to build the wheel (default python3)
#   KT_NSPAWN_KEEP=1  leave the work dir (console log, journal) behind for inspection
#   KT_NSPAWN_HOLD=N  keep the booted container up N seconds after the checks (prints how to enter)
#   KT_NSPAWN_DROPIN  extra [Service] lines for the unit (\n-separated), to prove a check can fail
# Exit: 0 all checks passed; 1 a check failed; 77 the machine cannot run it (reason printed).
#
# Layers, each cached under a key that hashes what it is built from:
#   rootfs-<key>   debootstrap minbase + PACKAGES                      (~50 s, ~300 MB, once)
#   venv-<key>     rootfs + /opt/kakao-tokend venv with the runtime deps from PyPI (once per deps)
#   per run        overlayfs on top of venv-<key> (falls back to a copy): the freshly built wheel,
#                  units, config, credentials; discarded at the end.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here="$repo/tests/systemd"
cache=${KT_NSPAWN_CACHE:-/var/cache/kakao-tokend-ci}
python=${PYTHON:-python3}
suite=bookworm
packages=systemd,systemd-sysv,dbus,python3,python3-venv,procps
recipe=2   # bump to invalidate every cached layer
t_start=$SECONDS

say() { printf 'nspawn-test: %s\n' "$*"; }
skip() { say "skipped: $*"; exit 77; }

# ------------------------------------------------------------------ preconditions
[ "$(id -u)" -eq 0 ] || skip "needs root (debootstrap, mounts, systemd-nspawn)"
for tool in debootstrap systemd-nspawn nsenter mount sha256sum flock; do
    command -v "$tool" >/dev/null 2>&1 || skip "$tool not installed (apt-get install debootstrap systemd-container)"
done
"$python" -m pip --version >/dev/null 2>&1 || skip "$python has no pip (set PYTHON=...) to build the wheel"

mirror=${KT_NSPAWN_MIRROR:-}
if [ -z "$mirror" ]; then
    # deb822 "URIs:" or one-line "deb URI bookworm ..." entries; the first Debian main archive wins
    mirror=$({ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } \
        | sed -n -e 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)\/\{0,1\}$/\1/p' \
                 -e 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]\{1,\}\)\{0,1\}\([^[:space:]]*\/debian\)\/\{0,1\}[[:space:]]\{1,\}bookworm[[:space:]].*/\2/p' \
)
    mirror=${mirror%%$'\n'*}
    mirror=${mirror:-http://deb.debian.org/debian}
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock -w 900 9 || skip "another nspawn test holds $cache/.lock for 15 min"

key() { printf '%s\n' "$@" | sha256sum | cut -c1-16; }
base_key=$(key "$recipe" "$suite" "$packages" "$mirror")
base="$cache/rootfs-$base_key"
deps=$(sed -n '/^dependencies = \[/,/^\]/p' "$repo/pyproject.toml")
venv_key=$(key "$base_key" "$deps")
layer="$cache/venv-$venv_key"

work=$(mktemp -d /var/tmp/kt-nspawn.XXXXXX)
root="$work/root"
nspawn_pid=
mounted=
cleanup() {
    local rc=$?
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -TERM "$nspawn_pid" 2>/dev/null || true   # nspawn turns this into a clean shutdown
        for _ in $(seq 40); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$nspawn_pid" 2>/dev/null || true
        wait "$nspawn_pid" 2>/dev/null || true
    fi
    if [ -n "$mounted" ]; then umount "$root" 2>/dev/null || umount -l "$root" || true; fi
    if [ "${KT_NSPAWN_KEEP:-0}" = 1 ]; then say "work dir kept: $work"; else rm -rf "$work"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'say "FAIL: unexpected error (rc $?) at line $LINENO: $BASH_COMMAND"' ERR

# Run a command in a (not booted) container: used to build layers and install the wheel.
nspawn_run() { systemd-nspawn --quiet --keep-unit --register=no --as-pid2 "$@"; }

# ------------------------------------------------------------------ layer 1: the base rootfs
t0=$SECONDS
if [ ! -x "$base/usr/bin/python3" ]; then
    say "building the $suite rootfs from $mirror (once; about a minute)"
    rm -rf "$base.tmp"
    if ! debootstrap --variant=minbase --include="$packages" "$suite" "$base.tmp" "$mirror" \
            >"$work/debootstrap.log" 2>&1; then
        tail -n 5 "$work/debootstrap.log" | sed 's/^/    /'
        rm -rf "$base.tmp"
        skip "debootstrap from $mirror failed (no Debian mirror reachable?)"
    fi
    mv "$base.tmp" "$base"
    say "rootfs built in $((SECONDS - t0)) s"
fi

# ------------------------------------------------------------------ layer 2: venv + runtime deps
t0=$SECONDS
wheels="$work/dist"
# Build from a copy: setuptools leaves build/ and *.egg-info in the source tree.
mkdir "$work/src"
tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude='.*_cache' --exclude=__pycache__ --exclude=.hypothesis \
    -cf - . | tar -C "$work/src" -xf -
"$python" -m pip wheel --quiet --no-deps -w "$wheels" "$work/src" >"$work/wheel.log" 2>&1 \
    || { cat "$work/wheel.log"; say "FAIL: cannot build the kakao-tokend wheel"; exit 1; }
wheel=$(cd "$wheels" && ls kakao_tokend-*.whl)
if [ ! -x "$layer/opt/kakao-tokend/bin/python" ]; then
    say "building the venv layer (once per dependency set)"
    # Download on the host, with the host's pip configuration (index, proxy CA): the container
    # has none of it. Binary wheels for the rootfs' CPython 3.11 only.
    arch=$(uname -m)
    if ! "$python" -m pip download --quiet --disable-pip-version-check -d "$work/wheelhouse" \
            --only-binary=:all: --python-version 3.11 --implementation cp \
            --abi cp311 --abi abi3 --abi none --platform any --platform "manylinux_2_36_$arch" \
            --platform "manylinux_2_28_$arch" --platform "manylinux_2_17_$arch" \
            --platform "manylinux2014_$arch" --platform "manylinux1_$arch" \
            "$wheels/$wheel" >"$work/download.log" 2>&1; then
        grep -v '^WARNING: Location' "$work/download.log" | tail -n 10 | sed 's/^/    /'
        skip "could not download the runtime dependencies with $python -m pip (no package index?)"
    fi
    rm -rf "$layer.tmp"
    cp -a --reflink=auto "$base" "$layer.tmp"
    # The wheel brings the dependency list; the per-run step replaces the package itself.
    if ! nspawn_run -D "$layer.tmp" --bind-ro="$work/wheelhouse:/mnt/wheelhouse" /bin/sh -c \
            "python3 -m venv /opt/kakao-tokend && /opt/kakao-tokend/bin/pip install --quiet \
             --disable-pip-version-check --no-cache-dir --no-index --find-links /mnt/wheelhouse \
             /mnt/wheelhouse/$wheel" >"$work/venv.log" 2>&1; then
        tail -n 20 "$work/venv.log" | sed 's/^/    /'
        rm -rf "$layer.tmp"
        say "FAIL: installing kakao-tokend and its dependencies into the rootfs venv failed"
        exit 1
    fi
    mv "$layer.tmp" "$layer"
    say "venv layer built in $((SECONDS - t0)) s"
fi
# Old layers from other keys only take space.
for old in "$cache"/rootfs-* "$cache"/venv-*; do
    case "$old" in "$base" | "$layer") ;; *) rm -rf "$old" ;; esac
done

# ------------------------------------------------------------------ per run: overlay + install
t_run=$SECONDS
mkdir -p "$root" "$work/upper" "$work/ovl-work"
if mount -t overlay overlay -o "lowerdir=$layer,upperdir=$work/upper,workdir=$work/ovl-work" "$root" \
        2>/dev/null; then
    mounted=1
else
    say "overlayfs unavailable, copying the rootfs"
    rmdir "$root"
    cp -a --reflink=auto "$layer" "$root"
fi
exec 9>&-   # the cache is only read from here on

nspawn_run -D "$root" --bind-ro="$wheels:/mnt/dist" /opt/kakao-tokend/bin/pip install --quiet \
    --disable-pip-version-check --no-index --no-deps --force-reinstall "/mnt/dist/$wheel" \
    >"$work/install.log" 2>&1 || { cat "$work/install.log"; say "FAIL: wheel install"; exit 1; }

install -m 0644 "$repo/systemd/kakao-tokend.sysusers.conf" "$root/usr/lib/sysusers.d/kakao-tokend.conf"
install -m 0644 "$repo/systemd/kakao-tokend.service" "$root/etc/systemd/system/kakao-tokend.service"
install -m 0644 "$repo/systemd/kakao-tokend@.service" "$root/etc/systemd/system/kakao-tokend@.service"
# Test-only drop-in: a short watchdog so the watchdog check takes seconds, not half a minute.
# Everything else is the shipped unit.
install -d "$root/etc/systemd/system/kakao-tokend.service.d"
# KT_NSPAWN_DROPIN adds [Service] lines, e.g. "RestartPreventExitStatus=" to see a check fail.
printf '[Service]\nWatchdogSec=4s\n%b\n' "${KT_NSPAWN_DROPIN:-}" \
    >"$root/etc/systemd/system/kakao-tokend.service.d/test.conf"
# The template's drop-in also cuts TimeoutStopSec= to 1 s: a stop during a 2.5 s refresh then
# ends cleanly only because the daemon asks systemd for more time (EXTEND_TIMEOUT_USEC).
install -d "$root/etc/systemd/system/kakao-tokend@.service.d"
printf '[Service]\nWatchdogSec=4s\nTimeoutStopSec=1s\n' \
    >"$root/etc/systemd/system/kakao-tokend@.service.d/test.conf"

# Secrets only in the credstore (root:root 0600); the config names them by credential id.
install -d -m 0700 "$root/etc/credstore"
printf 'emulator-rest-key' >"$root/etc/credstore/kakao-tokend.rest_api_key"
printf 'emulator-client-secret' >"$root/etc/credstore/kakao-tokend.client_secret"
chmod 0600 "$root"/etc/credstore/*
install -d -m 0755 "$root/etc/kakao-tokend"
cat >"$root/etc/kakao-tokend/config.toml" <<'TOML'
log_level = "info"
[kakao]
rest_api_key_credential = "rest_api_key"
client_secret_credential = "client_secret"
auth_url = "http://127.0.0.1:8790"
api_url = "http://127.0.0.1:8790"
timeout = "3s"
connect_timeout = "2s"
[refresh]
heartbeat = "1s"
retry_initial = "1s"
retry_max = "2s"
TOML
chmod 0644 "$root/etc/kakao-tokend/config.toml"

# The emulator: access tokens live 8 s, so the daemon refreshes about every 6 s (75 %).
cat >"$root/etc/systemd/system/kakao-emulator.service" <<'UNIT'
[Unit]
Description=Kakao emulator for the nspawn test
[Service]
ExecStart=/opt/kakao-tokend/bin/kakao-tokend emulator --port 8790 --access-lifetime 8s
DynamicUser=yes
[Install]
WantedBy=multi-user.target
UNIT
ln -s /etc/systemd/system/kakao-emulator.service "$root/etc/systemd/system/multi-user.target.wants/"
install -d "$root/usr/local/lib/kt-test"
install -m 0644 "$here/seed_tokens.py" "$root/usr/local/lib/kt-test/seed_tokens.py"
# Quiet, fast boot: nothing in this rootfs needs a getty on the console.
ln -sf /dev/null "$root/etc/systemd/system/console-getty.service"

# ------------------------------------------------------------------ boot
t0=$SECONDS
systemd-nspawn --quiet --keep-unit --register=no -D "$root" -b >"$work/console.log" 2>&1 </dev/null &
nspawn_pid=$!
# The container's init: nspawn's child that runs systemd. Not just its oldest child: while
# the container is set up, that may be nspawn's own helper, which exits (a run once waited
# 60 s on such a pid with a container that had booted).
find_leader() {
    local pid
    for pid in $(pgrep -P "$nspawn_pid" 2>/dev/null || true); do
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = systemd ]; then
            echo "$pid"
            return 0
        fi
    done
    return 0
}
leader=
for _ in $(seq 100); do
    leader=$(find_leader)
    [ -n "$leader" ] && break
    kill -0 "$nspawn_pid" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$leader" ]; then
    tail -n 20 "$work/console.log" | sed 's/^/    /'
    skip "systemd-nspawn did not start a container here"
fi

# Run a command inside the booted container (no machined/system bus on the host: nsenter).
inside() {
    nsenter --target "$leader" --mount --uts --ipc --net --pid --root --wd \
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        SYSTEMD_PAGER= SYSTEMD_COLORS=0 LC_ALL=C.UTF-8 "$@"
}
prop() { inside systemctl show -P "$1" "${2:-kakao-tokend.service}"; }
jctl() { inside journalctl --no-pager -q -o cat "$@"; }

booted=
for _ in $(seq 120); do
    [ -d "/proc/$leader" ] || leader=$(find_leader)
    case "$(inside systemctl is-system-running 2>/dev/null || true)" in
        running | degraded) booted=1; break ;;
    esac
    kill -0 "$nspawn_pid" 2>/dev/null || break
    sleep 0.5
done
if [ -z "$booted" ]; then
    tail -n 30 "$work/console.log" | sed 's/^/    /'
    skip "the container's systemd did not finish booting within 60 s"
fi
say "container booted in $((SECONDS - t0)) s ($(inside systemctl --version | sed -n 1p))"

# ------------------------------------------------------------------ checks
results=()
failures=0
record() {  # record NAME ok|FAIL DETAIL
    results+=("$(printf '%-4s  %-22s %s' "$2" "$1" "$3")")
    if [ "$2" = ok ]; then say "ok    $1: $3"; else say "FAIL  $1: $3"; failures=$((failures + 1)); fi
}
# wait_until SECONDS COMMAND...: poll every 0.5 s; true once COMMAND succeeds
wait_until() {
    local limit=$1; shift
    local end=$((SECONDS + limit))
    until "$@"; do
        [ "$SECONDS" -lt "$end" ] || return 1
        sleep 0.5
    done
}
count_lines() { jctl -u kakao-tokend.service "$@" | grep -c "${pattern:?}" || true; }
at_least() { local n=$1; shift; [ "$(pattern="$1" count_lines "${@:2}")" -ge "$n" ]; }

# setup: the service user exists (systemd-sysusers ran at boot from the shipped sysusers.d file)
if ! inside getent passwd kakao-tokend >/dev/null; then
    record sysusers FAIL "no user kakao-tokend after boot (sysusers.d file not applied)"
else
    record sysusers ok "user kakao-tokend created at boot: $(inside id kakao-tokend)"
fi
inside useradd --system --no-create-home --groups kakao-tokend consumer

# Operator commands run as the service would, with the unit's user, directories and
# credentials (as plain root the CLI cannot read the secrets, which exist only as credentials):
# the `kt` helper exactly as docs/operations.md prints it (the block after its kt-helper
# marker), with --pipe for a script, and its systemd-run running inside the container.
kt_source=$(sed -n '/<!-- kt-helper/,/^```$/p' "$repo/docs/operations.md" | sed -e '1,2d' -e '$d')
case $kt_source in
    "kt() {"*"systemd-run "*) ;;
    *) say "docs/operations.md has no kt helper block after its kt-helper marker"; exit 1 ;;
esac
systemd-run() { inside systemd-run "$@"; }
eval "${kt_source//--pty/--pipe}"

# setup: migrate from a blog-script kakao_token.json with `kakao-tokend import` (operations guide)
t0=$SECONDS
if inside /opt/kakao-tokend/bin/python /usr/local/lib/kt-test/seed_tokens.py http://127.0.0.1:8790 \
        /var/tmp/kakao_token.json >"$work/seed.log" 2>&1 \
    && inside install -d -o kakao-tokend -g kakao-tokend -m 0750 /var/lib/kakao-tokend \
    && inside install -o kakao-tokend -m 0600 /var/tmp/kakao_token.json \
        /var/lib/kakao-tokend/kakao_token.json 2>>"$work/seed.log" \
    && kt import /var/lib/kakao-tokend/kakao_token.json >>"$work/seed.log" 2>&1; then
    inside rm -f /var/tmp/kakao_token.json /var/lib/kakao-tokend/kakao_token.json
    record "import (kt wrapper)" ok "kakao_token.json adopted in $((SECONDS - t0)) s: $(tail -n1 "$work/seed.log" | cut -c1-70)"
else
    record "import (kt wrapper)" FAIL "$(tail -n 3 "$work/seed.log" | paste -sd'|' -)"
    jctl -b -n 30 | sed 's/^/    /'
    say "cannot continue without tokens"
    exit 1
fi

# 1. start: Type=notify, so `systemctl start` returns only after READY=1
t0=$SECONDS
if timeout 90 nsenter --target "$leader" --mount --pid --root --wd systemctl start kakao-tokend.service; then
    state="$(prop ActiveState)/$(prop SubState)"
    status=$(prop StatusText)
    if [ "$state" = active/running ] && [[ $status == default:* ]]; then
        record "READY + STATUS" ok "active/running after $((SECONDS - t0)) s; StatusText='$status'"
    else
        record "READY + STATUS" FAIL "state $state, StatusText='$status'"
    fi
else
    record "READY + STATUS" FAIL "systemctl start failed: $(prop Result) / status $(prop ExecMainStatus)"
    jctl -u kakao-tokend.service | tail -n 30 | sed 's/^/    /'
    say "cannot continue without a running service"
    exit 1
fi
pid1=$(prop MainPID)

# 2. refreshes happen (8 s tokens: one about every 6 s)
t0=$SECONDS
if wait_until 30 at_least 2 "refreshed default"; then
    record refreshes ok "2 'refreshed default' lines within $((SECONDS - t0)) s"
else
    record refreshes FAIL "$(pattern='refreshed default' count_lines) refresh lines after 30 s"
fi

# operator view: `kt status` exits 0 (ok) and names the account
if out=$(kt status 2>&1) && grep -q "default" <<<"$out"; then
    record "status (kt wrapper)" ok "exit 0: $(sed -n 1p <<<"$out" | cut -c1-70)"
else
    record "status (kt wrapper)" FAIL "$(paste -sd'|' - <<<"$out" | cut -c1-200)"
fi

# a system install from a shell: plain root (no kt) finds the service's state and socket
# through /etc/kakao-tokend/config.toml; kt reaches the daemon too (its RuntimeDirectory=), and
# leaves the daemon's socket in place when it exits (RuntimeDirectoryPreserve=yes)
root_out=$(inside /opt/kakao-tokend/bin/kakao-tokend status 2>&1) || true
kt_out=$(kt status --json 2>&1) || true
if grep -q "socket: /run/kakao-tokend/api.sock (the daemon answered)" <<<"$root_out" \
        && grep -q '"source": "daemon"' <<<"$kt_out" \
        && inside test -S /run/kakao-tokend/api.sock; then
    record "shell + kt reach daemon" ok "root shell and kt status answered by the daemon; socket kept"
else
    record "shell + kt reach daemon" FAIL "$(paste -sd'|' - <<<"$root_out$kt_out" | cut -c1-200)"
fi
# kt doctor: the documented health check passes on this install (the unit is there and active)
if out=$(kt doctor --consumer consumer 2>&1); then
    record "doctor (kt wrapper)" ok "exit 0, $(grep -c '^✓' <<<"$out") checks passed"
else
    record "doctor (kt wrapper)" FAIL "$(grep -A1 '^✗' <<<"$out" | paste -sd'|' - | cut -c1-200)"
fi
# memo through the daemon's proxy, as a member of the kakao-tokend group (no secrets needed)
if out=$(inside setpriv --reuid=consumer --regid=consumer --init-groups \
        /opt/kakao-tokend/bin/kakao-tokend memo "nspawn test" 2>&1) && grep -q "(by the daemon)" <<<"$out"; then
    record "memo (consumer)" ok "$out"
else
    record "memo (consumer)" FAIL "$(paste -sd'|' - <<<"$out" | cut -c1-200)"
fi

# 3. credentials: they exist only in /etc/credstore, the emulator insists on both values
if grep -q 'emulator-' "$root/etc/kakao-tokend/config.toml"; then
    record credentials FAIL "the test config contains a secret"
else
    creds=$(inside stat -c '%n %a %U' /run/credentials/kakao-tokend.service/rest_api_key \
        /run/credentials/kakao-tokend.service/client_secret 2>&1 | sed 's|.*/||' | paste -sd, -)
    if at_least 1 "refreshed default" && [[ $creds == "rest_api_key 400 kakao-tokend,client_secret 400 kakao-tokend" ]]; then
        record credentials ok "refresh accepted with key+secret read from \$CREDENTIALS_DIRECTORY ($creds)"
    else
        record credentials FAIL "credential files: $creds"
    fi
fi

# 4. token file: group kakao-tokend may read it, nobody else; the state file is private
files=$(inside stat -c '%a %U:%G' /var/lib/kakao-tokend /var/lib/kakao-tokend/default.token.json \
    /var/lib/kakao-tokend/default.state.json 2>&1 | paste -sd, -)
as() { local user=$1; shift; inside setpriv --reuid="$user" --regid="$(inside id -g "$user")" --init-groups "$@"; }
token=/var/lib/kakao-tokend/default.token.json
problems=()
[ "$files" = "750 kakao-tokend:kakao-tokend,640 kakao-tokend:kakao-tokend,600 kakao-tokend:kakao-tokend" ] \
    || problems+=("modes/owners: $files")
as consumer /opt/kakao-tokend/bin/python -c "import json,sys; json.load(open(sys.argv[1]))['access_token']" \
    "$token" >/dev/null 2>&1 || problems+=("group member 'consumer' cannot read the token file")
as consumer cat /var/lib/kakao-tokend/default.state.json >/dev/null 2>&1 \
    && problems+=("group member can read the private state file")
as nobody cat "$token" >/dev/null 2>&1 && problems+=("user nobody can read the token file")
if [ "${#problems[@]}" -eq 0 ]; then
    record "token file access" ok "dir 750, token 640, state 600 (all kakao-tokend); consumer reads, nobody cannot"
else
    record "token file access" FAIL "$(IFS=';'; echo "${problems[*]}")"
fi

# 5. journald priorities: routine lines at info, problems at warning or above
before_warn=$(jctl -u kakao-tokend.service -p warning)
inside /opt/kakao-tokend/bin/python -c '
import json, urllib.request
body = json.dumps({"endpoint": "token", "kind": "http503", "count": 1}).encode()
req = urllib.request.Request("http://127.0.0.1:8790/_emulator/faults", body, {"Content-Type": "application/json"})
urllib.request.urlopen(req, timeout=5).read()'
fault_seen=
wait_until 20 at_least 1 "refresh failed" -p warning && fault_seen=1
recovered=
n_before=$(pattern="refreshed default" count_lines)
wait_until 20 at_least $((n_before + 1)) "refreshed default" && recovered=1
warn=$(jctl -u kakao-tokend.service -p warning)
# every "refreshed default" entry, by PRIORITY field: all must be 6 (info)
info_prio=$(inside journalctl --no-pager -q -o json -u kakao-tokend.service | grep '"MESSAGE":"refreshed default' \
    | sed -n 's/.*"PRIORITY":"\([0-9]\)".*/\1/p' | sort -u | paste -sd, -)
if [ -n "$before_warn" ]; then
    record "journal priorities" FAIL "warning+ lines before any fault: $(head -n1 <<<"$before_warn")"
elif [ -z "$fault_seen" ]; then
    record "journal priorities" FAIL "injected HTTP 503 not visible at -p warning"
elif grep -q "refreshed default" <<<"$warn"; then
    record "journal priorities" FAIL "routine refresh lines appear at -p warning"
elif [ "$info_prio" != 6 ] || [ -z "$recovered" ]; then
    record "journal priorities" FAIL "refresh line PRIORITY=$info_prio, recovered=${recovered:-no}"
else
    record "journal priorities" ok "-p warning: nothing until the fault, then only '$(head -n1 <<<"$warn" | cut -c1-60)...'; refresh lines PRIORITY=6"
fi

# 6. reload: ExecReload waits for the daemon; the process stays the same
t0=$SECONDS
if timeout 30 nsenter --target "$leader" --mount --pid --root --wd systemctl reload kakao-tokend.service \
        && wait_until 10 at_least 1 "configuration reloaded"; then
    if [ "$(prop MainPID)" = "$pid1" ] && [ "$(prop ActiveState)" = active ]; then
        record reload ok "'configuration reloaded' in $((SECONDS - t0)) s, same MainPID $pid1"
    else
        record reload FAIL "MainPID $pid1 -> $(prop MainPID), state $(prop ActiveState)"
    fi
else
    record reload FAIL "systemctl reload failed or no 'configuration reloaded' line"
    jctl -u kakao-tokend.service | tail -n 10 | sed 's/^/    /'
fi

# 7. watchdog: a frozen process is killed (Result=watchdog) and restarted
t0=$SECONDS
restarts=$(prop NRestarts)
inside kill -STOP "$pid1"
restarted() { [ "$(prop NRestarts)" -gt "$restarts" ] && [ "$(prop ActiveState)" = active ] \
    && [ "$(prop MainPID)" != "$pid1" ] && [ "$(prop MainPID)" != 0 ]; }
if wait_until 60 restarted && grep -q "Watchdog timeout" <<<"$(jctl -u kakao-tokend.service)"; then
    result=$(grep -o "Failed with result 'watchdog'" <<<"$(jctl -u kakao-tokend.service)" | tail -n1)
    record watchdog ok "SIGSTOP -> '${result:-?}', restarted as pid $(prop MainPID) after $((SECONDS - t0)) s"
else
    record watchdog FAIL "no watchdog restart within 60 s (NRestarts $(prop NRestarts), $(prop ActiveState))"
fi

# 8. stop: graceful, exit 0
t0=$SECONDS
inside systemctl stop kakao-tokend.service || true
code="Result=$(prop Result) status=$(prop ExecMainStatus) $(prop ActiveState)"
tail_log=$(jctl -u kakao-tokend.service | tail -n 4)
if [ "$code" = "Result=success status=0 inactive" ] && grep -qx "stopped" <<<"$tail_log" \
        && grep -q "Deactivated successfully" <<<"$tail_log"; then
    record stop ok "$code after $((SECONDS - t0)) s; daemon logged 'stopped', systemd 'Deactivated successfully'"
else
    record stop FAIL "$code; last lines: $(paste -sd"|" - <<<"$tail_log")"
fi

# 9. the template unit: one process per account, with its own state and runtime directory.
# The account moves from the single unit (stopped above) to the template, never both at once.
tunit=kakao-tokend@default.service
tprop() { prop "$1" "$tunit"; }
tjournal() { jctl -u "$tunit"; }
tsaid() { tjournal | grep -qF "$1"; }
inside install -d -o kakao-tokend -g kakao-tokend -m 0750 /var/lib/kakao-tokend/default
inside mv /var/lib/kakao-tokend/default.state.json /var/lib/kakao-tokend/default/default.state.json
inside rm -f /var/lib/kakao-tokend/default.token.json
t0=$SECONDS
problems=()
if timeout 90 nsenter --target "$leader" --mount --pid --root --wd systemctl start "$tunit"; then
    tpid=$(tprop MainPID)
    [ "$(tprop ActiveState)/$(tprop SubState)" = active/running ] \
        || problems+=("state $(tprop ActiveState)/$(tprop SubState)")
    [[ $(tprop StatusText) == default:* ]] || problems+=("StatusText '$(tprop StatusText)'")
    wait_until 30 tsaid "refreshed default" || problems+=("no refresh in 30 s")
    files=$(inside stat -c '%a %U' /var/lib/kakao-tokend/default/default.token.json \
        /run/kakao-tokend/default/api.sock 2>&1 | paste -sd, -)
    [ "$files" = "640 kakao-tokend,660 kakao-tokend" ] || problems+=("token file/socket: $files")
    ident=$(inside journalctl --no-pager -q -o json -u "$tunit" | grep '"MESSAGE":"kakao-tokend running' \
        | grep -o '"SYSLOG_IDENTIFIER":"[^"]*"' | sort -u | paste -sd, -)
    [ "$ident" = '"SYSLOG_IDENTIFIER":"kakao-tokend@default"' ] || problems+=("identifiers $ident")
    if timeout 30 nsenter --target "$leader" --mount --pid --root --wd systemctl reload "$tunit" \
            && wait_until 10 tsaid "configuration reloaded"; then
        [ "$(tprop MainPID)" = "$tpid" ] || problems+=("reload changed MainPID")
    else
        problems+=("reload failed")
    fi
    # Stop while Kakao takes 2.5 s to answer a refresh (TimeoutStopSec=1s in the drop-in).
    emu_py() { inside /opt/kakao-tokend/bin/python -c "import json, urllib.request as u
base = 'http://127.0.0.1:8790/_emulator/'
$1"; }
    slow_before=$(emu_py "print(json.load(u.urlopen(base + 'stats'))['faults_fired'].get('slow', 0))")
    emu_py "u.urlopen(u.Request(base + 'faults', json.dumps({'endpoint': 'token', 'kind': 'slow',
    'count': 1, 'delay': 2.5}).encode(), {'Content-Type': 'application/json'})).read()"
    slow_fired() { [ "$(emu_py "print(json.load(u.urlopen(base + 'stats'))['faults_fired'].get('slow', 0))")" -gt "$slow_before" ]; }
    if wait_until 15 slow_fired; then
        ts=$SECONDS
        inside systemctl stop "$tunit" || true
        took=$((SECONDS - ts))
        tcode="Result=$(tprop Result) status=$(tprop ExecMainStatus) $(tprop ActiveState)"
        after=$(tjournal | sed -n '/shutting down/,$p')
        if [ "$tcode" != "Result=success status=0 inactive" ] || ! grep -q "refreshed default" <<<"$after" \
                || ! grep -qx stopped <<<"$after" || [ "$took" -lt 1 ]; then
            problems+=("stop during a slow refresh: $tcode after ${took} s")
        fi
    else
        problems+=("the slow refresh never started")
        inside systemctl stop "$tunit" || true
    fi
else
    problems+=("systemctl start failed: $(tprop Result) / status $(tprop ExecMainStatus)")
fi
if [ "${#problems[@]}" -eq 0 ]; then
    record "template unit" ok "$tunit: READY, refreshes, token 640 + socket in its own dirs, reload; stop during a 2.5 s refresh with TimeoutStopSec=1s: saved, clean (EXTEND_TIMEOUT_USEC), in $((SECONDS - t0)) s"
else
    record "template unit" FAIL "$(IFS=';'; echo "${problems[*]}")"
    tjournal | tail -n 20 | sed 's/^/    /'
fi

# 10. the user unit: a user's own service manager runs it, no root involved. A desktop has no
# /etc/kakao-tokend/config.toml, and the config search would find that one before the user's:
# set it aside meanwhile.
t0=$SECONDS
inside mv /etc/kakao-tokend/config.toml /etc/kakao-tokend/config.toml.system
problems=()
user=alice
inside useradd --create-home --shell /bin/bash "$user"
uid=$(inside id -u "$user")
home=/home/$user
ustate=$home/.local/state/kakao-tokend
inside install -d -o "$user" -g "$user" -m 0700 "$home/.config" "$home/.config/kakao-tokend" \
    "$home/.config/systemd" "$home/.config/systemd/user" "$home/.local" "$home/.local/bin"
inside ln -s /opt/kakao-tokend/bin/kakao-tokend "$home/.local/bin/kakao-tokend"
install -m 0644 "$repo/systemd/user/kakao-tokend.service" "$root$home/.config/systemd/user/kakao-tokend.service"
mkdir -p "$root$home/.config/systemd/user/kakao-tokend.service.d"
printf '[Service]\nWatchdogSec=4s\n' >"$root$home/.config/systemd/user/kakao-tokend.service.d/test.conf"
printf 'emulator-rest-key' >"$root$home/.config/kakao-tokend/rest_api_key"
printf 'emulator-client-secret' >"$root$home/.config/kakao-tokend/client_secret"
cat >"$root$home/.config/kakao-tokend/config.toml" <<'TOML'
log_level = "info"
[kakao]
rest_api_key_file = "rest_api_key"
client_secret_file = "client_secret"
auth_url = "http://127.0.0.1:8790"
api_url = "http://127.0.0.1:8790"
timeout = "3s"
connect_timeout = "2s"
[refresh]
heartbeat = "1s"
TOML
inside chown -R "$user:$user" "$home/.config"
inside chmod 0600 "$home/.config/kakao-tokend/rest_api_key" "$home/.config/kakao-tokend/client_secret"
as_user() { inside runuser -u "$user" -- env HOME="$home" XDG_RUNTIME_DIR="/run/user/$uid" "$@"; }
usr() { as_user systemctl --user "$@"; }
uprop() { usr show -P "$1" kakao-tokend.service; }
ujournal() { jctl _SYSTEMD_USER_UNIT=kakao-tokend.service; }
usaid() { ujournal | grep -qF "$1"; }
# The minbase rootfs has no libpam-systemd, which sets XDG_RUNTIME_DIR for a user manager
# (user@.service refuses to start without it); a drop-in does the same.
install -d "$root/etc/systemd/system/user@.service.d"
printf '[Service]\nEnvironment=XDG_RUNTIME_DIR=/run/user/%%i\n' \
    >"$root/etc/systemd/system/user@.service.d/runtime-dir.conf"
inside systemctl daemon-reload
if ! inside systemctl start "user@$uid.service"; then
    problems+=("the user manager user@$uid did not start")
    jctl -b -u "user@$uid.service" -u "user-runtime-dir@$uid.service" | tail -n 15 | sed 's/^/    /'
elif ! { as_user /opt/kakao-tokend/bin/python /usr/local/lib/kt-test/seed_tokens.py \
            http://127.0.0.1:8790 "$home/kakao_token.json" \
        && as_user "$home/.local/bin/kakao-tokend" import "$home/kakao_token.json"; } >"$work/user-seed.log" 2>&1; then
    problems+=("import as $user: $(tail -n 2 "$work/user-seed.log" | paste -sd'|' -)")
elif ! usr daemon-reload || ! usr start kakao-tokend.service; then
    problems+=("systemctl --user start failed: $(uprop Result) / status $(uprop ExecMainStatus)")
else
    upid=$(uprop MainPID)
    [ "$(uprop ActiveState)/$(uprop SubState)" = active/running ] \
        || problems+=("state $(uprop ActiveState)/$(uprop SubState)")
    [[ $(uprop StatusText) == default:* ]] || problems+=("StatusText '$(uprop StatusText)'")
    wait_until 30 usaid "refreshed default" || problems+=("no refresh in 30 s")
    files=$(inside stat -c '%a %U' "$ustate" "$ustate/default.state.json" \
        "/run/user/$uid/kakao-tokend/api.sock" 2>&1 | paste -sd, -)
    [[ $files =~ ^7[0-5]0\ $user,600\ $user,6[0-6]0\ $user$ ]] || problems+=("files: $files")
    out=$(as_user "$home/.local/bin/kakao-tokend" status 2>&1) \
        && grep -q "daemon:        running" <<<"$out" || problems+=("status: $(paste -sd'|' - <<<"$out" | cut -c1-160)")
    if usr reload kakao-tokend.service && wait_until 10 usaid "configuration reloaded"; then
        [ "$(uprop MainPID)" = "$upid" ] || problems+=("reload changed MainPID")
    else
        problems+=("reload failed")
    fi
    usr stop kakao-tokend.service || true
    ucode="Result=$(uprop Result) status=$(uprop ExecMainStatus) $(uprop ActiveState)"
    [ "$ucode" = "Result=success status=0 inactive" ] && grep -qx stopped <<<"$(ujournal | tail -n 4)" \
        || problems+=("stop: $ucode")
fi
if [ "${#problems[@]}" -eq 0 ]; then
    record "user unit" ok "systemctl --user as $user: READY, refreshes, files in ~/.local/state (private), status via socket, reload, clean stop in $((SECONDS - t0)) s"
else
    record "user unit" FAIL "$(IFS=';'; echo "${problems[*]}")"
    ujournal | tail -n 20 | sed 's/^/    /'
fi

inside mv /etc/kakao-tokend/config.toml.system /etc/kakao-tokend/config.toml

# 11. exit 78 (bad config) is not restarted
printf 'this is = not [valid toml\n' >"$root/etc/kakao-tokend/config.toml"
inside systemctl start kakao-tokend.service >/dev/null 2>&1 || true
sleep 8   # RestartSec=5s plus slack: a restart would have happened by now
state="status=$(prop ExecMainStatus) NRestarts=$(prop NRestarts) $(prop ActiveState) Result=$(prop Result)"
errline=$(jctl -u kakao-tokend.service -p err | grep -i "toml\|config" | tail -n1)
if [ "$state" = "status=78 NRestarts=0 failed Result=exit-code" ] && [ -n "$errline" ]; then
    record "exit 78 no restart" ok "$state; at -p err: '$(cut -c1-60 <<<"$errline")'"
else
    record "exit 78 no restart" FAIL "$state; err line '${errline}'"
fi

# no token (access or refresh) ever reaches the journal
tokens=$(inside /opt/kakao-tokend/bin/python -c '
import glob, json
for path in glob.glob("/var/lib/kakao-tokend/**/*.state.json", recursive=True) + glob.glob(
        "/home/*/.local/state/kakao-tokend/*.state.json"):
    t = json.load(open(path))["tokens"]
    print(t["access_token"]); print(t["refresh_token"])' 2>/dev/null || true)
if [ -z "$tokens" ]; then
    record "no token in journal" FAIL "could not read the state file to compare"
elif grep -qF "$tokens" <<<"$(jctl -b)"; then
    record "no token in journal" FAIL "a current token appears in the journal"
else
    record "no token in journal" ok "current access and refresh tokens of every unit absent from the boot's journal"
fi

# ------------------------------------------------------------------ summary
if [ -n "${KT_NSPAWN_HOLD:-}" ]; then   # debugging: keep the container up for a while
    say "holding the container ${KT_NSPAWN_HOLD}s: nsenter --target $leader --mount --uts --ipc --net --pid --root --wd bash"
    sleep "$KT_NSPAWN_HOLD" || true
fi
if [ "$failures" -ne 0 ]; then
    inside journalctl --no-pager -b -u kakao-tokend.service -u kakao-emulator.service \
        >"$work/journal.txt" 2>&1 || true
    say "journal of the failed run:"
    tail -n 60 "$work/journal.txt" | sed 's/^/    /'
fi
echo
echo "nspawn-test summary (systemd $(inside systemctl --version | sed -n 1p | cut -d' ' -f2), run $((SECONDS - t_run)) s, total $((SECONDS - t_start)) s)"
printf '%s\n' "${results[@]}"
if [ "$failures" -ne 0 ]; then
    say "FAILED: $failures check(s)"
    exit 1
fi
say "passed"
