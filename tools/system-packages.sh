#!/usr/bin/env bash
# Debian packages the test suite drives for real: Chromium (operator console browser tests)
# and promtool (alert rules). Installs what is missing when run as root with apt-get; otherwise
# prints what is missing and exits 0 (the tests that need a missing tool say so themselves and
# fail under CI=true).
set -euo pipefail
declare -A want=([chromium]=chromium [chromedriver]=chromium-driver [promtool]=prometheus)
missing=()
for cmd in "${!want[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${want[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d keeps package scripts from starting daemons (prometheus) on this machine.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "missing Debian packages (install them to run every test): ${missing[*]}" >&2
fi
