#!/usr/bin/env bash
# Creates .venv and installs Rayline with its pinned dependencies (idempotent).
# Needs Python 3.11 and Java 17 on PATH. Usage: scripts/setup.sh [extras, default: dev]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then py="$c"; break; fi
  done
fi
[ -n "$py" ] || { echo "setup: Python 3.11 not found (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
if ! command -v java >/dev/null && [ -z "${JAVA_HOME:-}" ]; then
  echo "setup: Java 17 not found: install it (Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $py"
  "$py" -m venv .venv
fi
stamp=".venv/.rayline-installed-$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing rayline[$extras] and its pinned dependencies (first time: a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  touch "$stamp"
fi
