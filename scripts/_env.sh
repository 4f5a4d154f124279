# shellcheck shell=bash
# Sourced by the scripts: go to the repo root, make sure .venv exists and has the project
# installed (`pip install -e '.[test]'`, redone only when pyproject.toml is newer than the
# stamp), and put .venv/bin first on PATH.

MESH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$MESH_ROOT"

MESH_VENV="$MESH_ROOT/.venv"
MESH_STAMP="$MESH_VENV/.mesh-installed"

if [ ! -x "$MESH_VENV/bin/python" ]; then
    echo "[mesh] creating $MESH_VENV" >&2
    "${PYTHON:-python3}" -m venv "$MESH_VENV"
fi

if [ ! -f "$MESH_STAMP" ] || [ pyproject.toml -nt "$MESH_STAMP" ]; then
    echo "[mesh] installing the project into $MESH_VENV (pip install -e '.[test]')" >&2
    if ! "$MESH_VENV/bin/python" -m pip install --disable-pip-version-check -q -e '.[test]'; then
        echo "[mesh] pip install -e '.[test]' failed" >&2
        return 1 2>/dev/null || exit 1
    fi
    touch "$MESH_STAMP"
fi

export VIRTUAL_ENV="$MESH_VENV"
export PATH="$MESH_VENV/bin:$PATH"
unset PYTHONHOME
