#!/usr/bin/env bash
# Smoke test of one built mesh file, as a user would run it: from an empty
# directory with an empty HOME, `--version`, `serve` on the built-in demo
# model, one chat completion and one streamed one. Used by the release
# workflow on each platform's runner.
#
#   scripts/smoke.sh dist/mesh-linux-x64 [--expect-log TEXT]... [-- PREFIX...]
#
# --expect-log TEXT  the serve log must contain TEXT (e.g. "Vulkan0", "no CUDA device")
# -- PREFIX...       run the file through PREFIX (e.g. qemu-aarch64-static -L /usr/aarch64-linux-gnu)
# Environment: SMOKE_TIMEOUT (seconds to wait for the model, default 120).
set -euo pipefail

usage() { echo "smoke: $1" >&2; exit 2; }
[ $# -ge 1 ] || usage "usage: scripts/smoke.sh FILE [--expect-log TEXT]... [-- PREFIX...]"
file=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
[ -x "$file" ] || usage "not an executable file: $1"
shift
expect=()
prefix=()
while [ $# -gt 0 ]; do
  case "$1" in
    --expect-log) [ $# -ge 2 ] || usage "--expect-log takes a text"; expect+=("$2"); shift 2 ;;
    --) shift; prefix=("$@"); break ;;
    *) usage "unknown argument '$1'" ;;
  esac
done

work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/run" "$work/home"
cp "$file" "$work/run/mesh"
cd "$work/run"
run() { env -i PATH=/usr/bin:/bin HOME="$work/home" ${GGML_VK_VISIBLE_DEVICES:+GGML_VK_VISIBLE_DEVICES=$GGML_VK_VISIBLE_DEVICES} "${prefix[@]}" ./mesh "$@"; }

echo "== $(basename "$file") --version"
run --version | tee "$work/version"
grep -q '^llama.cpp .*commit ' "$work/version" || { echo "smoke: --version does not name the llama.cpp commit" >&2; exit 1; }

port=$(( 20000 + RANDOM % 20000 ))
run serve --port "$port" --ctx-size 1024 --parallel 1 >"$work/log" 2>&1 &
pid=$!
deadline=$(( $(date +%s) + ${SMOKE_TIMEOUT:-120} ))
until grep -q '^ready: POST' "$work/log"; do
  if ! kill -0 "$pid" 2>/dev/null || [ "$(date +%s)" -gt "$deadline" ]; then
    echo "smoke: serve did not become ready" >&2; cat "$work/log" >&2; exit 1
  fi
  sleep 1
done
grep -E 'device |layers placed|backend|CUDA|Vulkan' "$work/log" || true
for t in "${expect[@]}"; do
  grep -qF -- "$t" "$work/log" || { echo "smoke: the serve log does not contain '$t'" >&2; cat "$work/log" >&2; exit 1; }
done

url="http://127.0.0.1:$port/v1/chat/completions"
body='{"model":"mesh-tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'
out=$(curl -sf "$url" -H 'content-type: application/json' -d "$body")
echo "$out" | grep -q '"completion_tokens":4' || { echo "smoke: chat completion failed: $out" >&2; exit 1; }
stream=$(curl -sfN "$url" -H 'content-type: application/json' -d "${body%\}},\"stream\":true}")
echo "$stream" | grep -q '^data: \[DONE\]' || { echo "smoke: the stream did not end with [DONE]: $stream" >&2; exit 1; }
[ "$(echo "$stream" | grep -c '"delta"')" -ge 2 ] || { echo "smoke: the stream carried no tokens" >&2; exit 1; }
echo "== $(basename "$file"): version, serve, one completion and one stream passed"
