# Sourced by scripts/test and scripts/demo: make sure .venv exists and holds this
# project (editable) with the extras named in $1. Needs only python3 with venv and pip.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SONA_SHM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

ensure_venv() {  # $1: extras, comma-separated, or "" for none
  local extras="$1"
  local stamp="$VENV/.installed-${extras//,/-}"
  local spec="$ROOT"
  [ -n "$extras" ] && spec="$ROOT[$extras]"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
    touch "$stamp"
  fi
}

ensure_promtool() {  # promtool checks the Prometheus text in the tests; Debian's prometheus package has it
  if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts: installing promtool (apt-get install prometheus)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } >/dev/null 2>&1 \
      || echo "scripts: could not install promtool; its test is skipped (fails under CI=true)" >&2
  fi
}

ensure_redis() {  # the fleet tests run a real redis-server; Debian's redis-server package has it
  if ! command -v redis-server >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts: installing redis-server (apt-get install redis-server)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; } >/dev/null 2>&1 \
      || echo "scripts: could not install redis-server; the fleet tests are skipped (fail under CI=true)" >&2
  fi
}

ensure_sentinel() {  # the testbed's failover tests run three redis-sentinel processes; Debian's redis-sentinel package has it
  if ! command -v redis-sentinel >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts: installing redis-sentinel (apt-get install redis-sentinel)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-sentinel; } >/dev/null 2>&1 \
      || echo "scripts: could not install redis-sentinel; the testbed's Sentinel tests are skipped (fail under CI=true)" >&2
  fi
}

ensure_systemd_analyze() {  # systemd-analyze verifies the shipped unit (examples/sona-shm-flusher@.service); Debian's systemd package has it
  if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts: installing systemd-analyze (apt-get install systemd)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd; } >/dev/null 2>&1 \
      || echo "scripts: could not install systemd-analyze; the unit's verify test is skipped (fails under CI=true)" >&2
  fi
}
