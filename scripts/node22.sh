#!/usr/bin/env sh
# Runs a Node program with Node >= 22.18 (native TypeScript), doing the set-up a fresh
# machine needs first, so `npm start` and `npm test` work right after a clone:
#   - Node 22 from the npm package node@22 into .tools/ when the system node is older;
#   - the project's dependencies (npm ci) when node_modules is missing or older than the lockfile;
#   - for tests (FLOTILLA_NEED_NATS=1): nats-server from apt when it is missing and we are root.
set -e
cd "$(dirname "$0")/.."

new_enough() {
  "$1" -e 'const [a,b]=process.versions.node.split(".").map(Number);process.exit(a>22||(a===22&&b>=18)?0:1)' >/dev/null 2>&1
}

if ! new_enough node; then
  if ! new_enough .tools/node_modules/.bin/node; then
    echo "flotilla: installing Node 22 (npm package node@22) into .tools/ ..." >&2
    mkdir -p .tools
    [ -f .tools/package.json ] || echo '{"name":"flotilla-tools","private":true}' > .tools/package.json
    (cd .tools && npm install --no-audit --no-fund --loglevel=error node@22 >&2)
    if ! new_enough .tools/node_modules/.bin/node; then
      # npm may skip the package's install script (allowScripts): run it by hand
      (cd .tools/node_modules/node && node installArchSpecificPackage >&2)
    fi
  fi
  PATH="$PWD/.tools/node_modules/.bin:$PATH"
  export PATH
fi

if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "flotilla: installing dependencies (npm ci) ..." >&2
  npm ci --no-audit --no-fund --loglevel=error >&2
fi

if [ "${FLOTILLA_NEED_NATS:-}" = 1 ] && [ -z "${NATS_URL:-}" ] && ! command -v nats-server >/dev/null 2>&1 \
  && [ ! -x /usr/sbin/nats-server ] && [ ! -x /usr/bin/nats-server ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "flotilla: installing nats-server (apt) for the tests ..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >&2
  else
    echo "flotilla: the tests need a NATS server: install nats-server (e.g. apt-get install nats-server) or set NATS_URL" >&2
  fi
fi

exec node "$@"
