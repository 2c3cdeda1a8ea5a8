#!/usr/bin/env bash
# Score the production configuration with the MDN HTTP Observatory's own grader.
#
# Serves the app the way `make run` does (gunicorn.conf.py) with
# FLASK_FORCE_HTTPS=true, twice on free loopback ports: once with TLS (a
# throwaway self-signed certificate for 127.0.0.1) and once on plain http,
# which the app itself redirects to its https origin (FLASK_PUBLIC_URL). gunicorn
# puts TLS on every address it binds, hence two servers. Then it grades both
# with bench/observatory/scan.mjs, prints each test, and exits non-zero when
# the score is below OBSERVATORY_MIN_SCORE (140: every bonus a site not on the
# HSTS preload list can earn, the +5 for Subresource Integrity on every script
# included: the home page loads public/js/passkeys.js with SRI) or any test fails.
#
# Needs node, npm and openssl; installs its npm package into
# bench/observatory/node_modules on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MIN_SCORE="${OBSERVATORY_MIN_SCORE:-140}"
PKG=bench/observatory/node_modules/@mdn/mdn-http-observatory

for tool in node npm openssl; do
  command -v "$tool" >/dev/null || { echo "observatory: $tool is not installed" >&2; exit 1; }
done
[ -x .venv/bin/gunicorn ] || { echo "observatory: run 'make test' or 'make run' first (.venv)" >&2; exit 1; }

# The package's postinstall downloads the HSTS preload list and a certificate
# bundle from the internet; neither is needed here, so scripts are skipped and
# an empty preload list stands in (nothing on 127.0.0.1 is preloaded).
wanted=$(node -p 'require("./bench/observatory/package.json").dependencies["@mdn/mdn-http-observatory"]')
have=$(node -p "try { require('./$PKG/package.json').version } catch { '' }")
if [ "$have" != "$wanted" ]; then
  (cd bench/observatory && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
[ -s "$PKG/conf/hsts-preload.json" ] || echo '{}' >"$PKG/conf/hsts-preload.json"

tmp=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=127.0.0.1" -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
  -keyout "$tmp/key.pem" -out "$tmp/cert.pem" 2>/dev/null

read -r http_port https_port < <(.venv/bin/python -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')

serve() { # serve PORT LOG [gunicorn args...]: the app as `make run` serves it, in production mode
  local port=$1 log=$2
  shift 2
  env FLASK_FORCE_HTTPS=true FLASK_PUBLIC_URL="https://127.0.0.1:$https_port" PORT="$port" \
    FLASK_DATA_DIR="$tmp/data" FLASK_PHOTO_DIR="$tmp/photos" FLASK_INSTANCE_PATH="$tmp/instance" \
    .venv/bin/gunicorn -c gunicorn.conf.py --no-control-socket "$@" >"$log" 2>&1 &
  pids+=($!)
}
serve "$https_port" "$tmp/https.log" --certfile "$tmp/cert.pem" --keyfile "$tmp/key.pem"
serve "$http_port" "$tmp/http.log"

wait_for() { # wait_for PORT PID: until something accepts connections there
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    kill -0 "$2" 2>/dev/null || break # the server exited: no point waiting
    sleep 0.1
  done
  echo "observatory: nothing listening on 127.0.0.1:$1" >&2
  cat "$tmp"/*.log >&2
  return 1
}
wait_for "$https_port" "${pids[0]}"
wait_for "$http_port" "${pids[1]}"

status=0
NODE_EXTRA_CA_CERTS="$tmp/cert.pem" OBSERVATORY_VERSION="$wanted" \
  node "$ROOT/bench/observatory/scan.mjs" 127.0.0.1 "$http_port" "$https_port" "$MIN_SCORE" ||
  status=$?
if [ "$status" -ne 0 ]; then
  echo "--- server logs ---" >&2
  cat "$tmp"/*.log >&2
fi
exit "$status"
