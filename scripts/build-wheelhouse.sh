#!/usr/bin/env bash
# Build a wheelhouse on the host so the image builds without reaching a package index:
# every runtime dependency as a wheel, plus the build backend (setuptools, wheel) that the
# Dockerfile needs to build gpumesh itself from the current source inside the image.
#
#   scripts/build-wheelhouse.sh          # into ./wheels (git-ignored)
#   WHEELS_DIR=/path scripts/build-wheelhouse.sh
#
# The wheels must match the image's Python (3.11, linux x86_64/aarch64 like the host), so run
# it with a Python 3.11: PYTHON defaults to .venv/bin/python, else python3.
set -euo pipefail

cd "$(dirname "$0")/.."
wheels="${WHEELS_DIR:-wheels}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$version" != "3.11" ]]; then
    echo "warning: $python is Python $version; the image runs 3.11 and needs cp311 wheels" >&2
fi

mkdir -p "$wheels"
# The project's own wheel is built inside the image from the source being built; a copy here
# would go stale, so only its dependencies and the build backend are kept.
"$python" -m pip wheel --quiet --wheel-dir "$wheels" . "setuptools>=68" wheel
rm -f "$wheels"/gpumesh-*.whl
echo "wheelhouse: $(ls "$wheels" | wc -l) wheels in $wheels"
