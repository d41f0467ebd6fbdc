#!/usr/bin/env bash
# Create the project's virtual environment with pinned versions (CPU torch) and,
# when run as root, the X libraries the viewer tests need.  Idempotent.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_x=(Xvfb)
if ! command -v Xvfb >/dev/null 2>&1 || ! ldconfig -p | grep -q libxcb-icccm.so.4; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Xvfb and the xcb libraries Qt needs (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-image0 \
            libxcb-render-util0 libxcb-xinerama0 libxcb-xkb1 libxcb-randr0 libxcb-shape0 \
            libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1 libfontconfig1 >/dev/null
    else
        echo "setup: Xvfb or libxcb-icccm4 is missing and this is not a root shell with apt-get." >&2
        echo "       Viewer tests need them; install with:" >&2
        echo "       sudo apt-get install xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0" >&2
        echo "       (continuing: the napari-free tests still run)" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# torch is pinned to the CPU build in constraints.txt; an unpinned torch would
# pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[test]"
"$VENV/bin/python" - <<'PY'
import napari_zoomin, torch
print(f"setup: napari-zoomin {napari_zoomin.__version__}, torch {torch.__version__}")
PY
