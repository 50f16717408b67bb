#!/usr/bin/env bash
# Real-systemd test of systemd/kakao-tokend.service (slow, root only; NOT part of pytest).
#
# STATUS: skeleton, never run yet. It was written where neither debootstrap nor systemd-nspawn
# is installed; expect to fix details on first use. The approach itself is proven (pitfalls.md
# §3.7: a bookworm minbase rootfs booted with `systemd-nspawn --keep-unit --register=no -b`).
#
# What it does:
#   1. debootstrap a bookworm minbase rootfs (systemd, dbus, python3, python3-venv) into a cache
#   2. build the wheel, install it into /opt/kakao-tokend inside a copy of the rootfs
#   3. run the Kakao emulator inside the container, seed tokens with `kakao-tokend import`
#   4. install the sysusers file, credentials and the unit; boot; then check:
#      active + READY, token file 0640 group kakao-tokend, journal priorities, reload, watchdog
#
# Usage: sudo tests/systemd/nspawn-test.sh [CACHE_DIR]     (default cache: /var/cache/kakao-tokend-nspawn)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache=${1:-/var/cache/kakao-tokend-nspawn}
machine=kt-test-$$

for tool in debootstrap systemd-nspawn; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "nspawn-test: skipped: $tool not available"
        exit 0
    fi
done
if [ "$(id -u)" -ne 0 ]; then
    echo "nspawn-test: skipped: needs root (debootstrap, nspawn)"
    exit 0
fi

# 1. base rootfs, built once (about 40 s and 300 MB)
base="$cache/bookworm"
if [ ! -x "$base/usr/bin/python3" ]; then
    mkdir -p "$cache"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3,python3-venv,procps \
        bookworm "$base.tmp" http://deb.debian.org/debian
    mv "$base.tmp" "$base"
fi

work=$(mktemp -d)
cleanup() {
    if [ -n "${nspawn_pid:-}" ]; then
        kill "$nspawn_pid" 2>/dev/null || true   # nspawn forwards this as a container shutdown
        wait "$nspawn_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
root="$work/root"
cp -a "$base" "$root"

# 2. the wheel, installed the way the unit expects (/opt/kakao-tokend/bin/kakao-tokend)
python3 -m pip wheel --no-deps -w "$work/dist" "$repo" >/dev/null
cp "$work"/dist/kakao_tokend-*.whl "$root/tmp/"
# dependencies come from PyPI inside the container (the host's pip cache would be better)
systemd-nspawn --quiet --register=no -D "$root" /bin/sh -c '
    python3 -m venv /opt/kakao-tokend &&
    /opt/kakao-tokend/bin/pip install --quiet /tmp/kakao_tokend-*.whl'

# 3. config, credentials, an emulator unit, seeded tokens
install -m 0644 "$repo/systemd/kakao-tokend.sysusers.conf" "$root/usr/lib/sysusers.d/kakao-tokend.conf"
install -m 0644 "$repo/systemd/kakao-tokend.service" "$root/etc/systemd/system/kakao-tokend.service"
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
[refresh]
heartbeat = "5s"
TOML
cat >"$root/etc/systemd/system/kakao-emulator.service" <<'UNIT'
[Unit]
Description=Kakao emulator for the nspawn test
Before=kakao-tokend.service
[Service]
ExecStart=/opt/kakao-tokend/bin/kakao-tokend emulator --port 8790 --access-lifetime 60s
[Install]
WantedBy=multi-user.target
UNIT
# TODO: seed tokens. Needs the emulator running to issue a real token pair, e.g. a oneshot unit
# ordered between the emulator and kakao-tokend that runs the login flow against the emulator
# (consent=auto) or `kakao-tokend import` of a file obtained from it, as user kakao-tokend with
# STATE_DIRECTORY=/var/lib/kakao-tokend.
ln -s /etc/systemd/system/kakao-emulator.service "$root/etc/systemd/system/multi-user.target.wants/"
ln -s /etc/systemd/system/kakao-tokend.service "$root/etc/systemd/system/multi-user.target.wants/"

# 4. boot and check
systemd-nspawn --quiet --keep-unit --register=no --machine="$machine" -D "$root" -b \
    >"$work/console.log" 2>&1 &
nspawn_pid=$!

in_container() {  # run a command inside the booted container
    # no machined/system bus on the host (--register=no), so nsenter into PID 1 of the container
    local leader
    leader=$(pgrep -P "$nspawn_pid" -o)
    nsenter -t "$leader" -a -- "$@"
}

for _ in $(seq 60); do
    state=$(in_container systemctl is-active kakao-tokend.service 2>/dev/null || true)
    [ "$state" = active ] && break
    sleep 1
done
fail() { echo "nspawn-test: FAIL: $*" >&2; in_container journalctl -b --no-pager -n 200 >&2 || true; exit 1; }

[ "$state" = active ] || fail "kakao-tokend.service is '$state', not active"
in_container systemctl show -p StatusText kakao-tokend.service
stat_out=$(in_container stat -c '%a %G' /var/lib/kakao-tokend/default.token.json) \
    || fail "no token file"
[ "$stat_out" = "640 kakao-tokend" ] || fail "token file is '$stat_out', want '640 kakao-tokend'"
# journald priorities: our lines carry <N>, so nothing from kakao-tokend is stored at the wrong level
in_container journalctl -b -t kakao-tokend -o json --no-pager | grep -q '"PRIORITY":"6"' \
    || fail "no INFO (PRIORITY=6) lines from kakao-tokend"
in_container systemctl reload kakao-tokend.service || fail "systemctl reload failed"
# TODO: watchdog: SIGSTOP the main pid, expect Result=watchdog and an automatic restart (~30 s)
# TODO: exit 78 (break config.toml) -> failed, NRestarts=0

echo "nspawn-test: passed"
