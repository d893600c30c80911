#!/bin/sh
# Installs the real tools the ops tests drive, when they are missing: promtool (Debian package
# "prometheus") for tests/ops/test_alert_rules.py and chromium for tests/ops/test_status_page.py.
# Idempotent: a tool already on PATH is not reinstalled. Needs root and apt-get (Debian/Ubuntu);
# anywhere else it says what is missing and exits 1, and those tests skip saying why.
#
#     sh tests/ops/install_tools.sh [promtool] [chromium]     # default: both
set -eu

wanted="${*:-promtool chromium}"
packages=""
for tool in $wanted; do
    case "$tool" in
        promtool) command -v promtool >/dev/null 2>&1 || packages="$packages prometheus" ;;
        chromium) command -v chromium >/dev/null 2>&1 || packages="$packages chromium" ;;
        *) echo "install_tools.sh: unknown tool $tool (promtool or chromium)" >&2; exit 2 ;;
    esac
done
[ -z "$packages" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_tools.sh: missing$packages; install as root with apt-get" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# A fresh container has no package lists yet; an install from stale lists may 404.
apt-get install -y --no-install-recommends $packages >/dev/null 2>&1 || {
    apt-get update -qq && apt-get install -y --no-install-recommends $packages >/dev/null
}
