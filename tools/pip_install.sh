# Sourced by the setup scripts: `pip install` into $venv, quiet, without this machine's notes
# about local package folders (pip's own errors still show).
pip_install() {
    local status=0
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2 || status=$?
    return $status
}
