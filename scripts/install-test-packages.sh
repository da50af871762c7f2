#!/usr/bin/env bash
# System packages some tests use, installed by `make setup` where that is possible:
#   prometheus (Debian's package: the server and promtool) - tests/e2e/test_dashboard.py evaluates the
#   Grafana dashboard's queries on a real Prometheus scraping the test mesh; tests/deploy checks the
#   queries' syntax with promtool;
#   chromium - tests/e2e/test_pathway_page.py drives the pathway page in it with Playwright;
#   redis-server - tests/hosts/test_head_loss.py: the external Redis of Ray's GCS fault tolerance.
# Only as root on a machine with apt-get; elsewhere it does nothing (those tests skip and say why).
# Never fails the setup: a package that cannot be had is reported and the tests that need it skip.
set -uo pipefail

PACKAGES=(prometheus chromium redis-server)
BINARIES=(prometheus chromium redis-server)

missing=0
for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || missing=1; done
[ "$missing" = 1 ] || exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: not root or no apt-get: ${PACKAGES[*]} not installed (tests that need them skip)" >&2
    exit 0
fi

# no service of the package may start (a Debian postinst starts prometheus on 0.0.0.0:9090 where it can)
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -q --no-install-recommends "$1" >/dev/null; }
updated=0
for i in "${!PACKAGES[@]}"; do  # one at a time: one that cannot be had does not keep the others out
    command -v "${BINARIES[$i]}" >/dev/null 2>&1 && continue
    if ! install "${PACKAGES[$i]}"; then
        if [ "$updated" = 0 ]; then apt-get update -q >/dev/null; updated=1; fi
        install "${PACKAGES[$i]}" || echo "note: apt-get could not install ${PACKAGES[$i]} (tests that need it skip)" >&2
    fi
done
[ "$made_policy" = 1 ] && rm -f "$policy"
exit 0
