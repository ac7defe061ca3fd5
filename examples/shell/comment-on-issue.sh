#!/usr/bin/env bash
# An unattended agent as a shell script: `latchkey token` gets a short-lived upstream token for
# the demo user (the agent proves who it is with its own private key; no secret in this file),
# then plain curl uses it against the demo provider's API: list a repository's issues, file one
# if there is none, comment on it, and read the issue back to check the comment is there.
#
# Run it from the directory where `latchkey demo` runs (it reads ./latchkey-data), after
# connecting the demo account (step 1 of the demo's walkthrough):
#
#   bash examples/shell/comment-on-issue.sh
#
# Settings (environment, all optional):
#   LATCHKEY           the latchkey binary (default: `latchkey` on PATH, else target/release/latchkey)
#   LATCHKEY_ISSUER    Latchkey's URL (default https://127.0.0.1:8750/)
#   LATCHKEY_DATA_DIR  the demo's data directory (default ./latchkey-data): CA, agent key, demo.json
#   REPO               the demo repository (default hello-world)
#
# Needs curl and jq. Exits 0 only when the comment is on the issue, read back through the API;
# the last line then is `ok: REPO#ISSUE comment ID: BODY`.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
issuer="${LATCHKEY_ISSUER:-https://127.0.0.1:8750/}"
issuer="${issuer%/}/"
data="${LATCHKEY_DATA_DIR:-latchkey-data}"
repo="${REPO:-hello-world}"

fail() {
  echo "error: $*" >&2
  exit 1
}

for tool in curl jq; do
  command -v "$tool" >/dev/null || fail "$tool is needed (apt-get install $tool)"
done
if [ -z "${LATCHKEY:-}" ]; then
  if command -v latchkey >/dev/null; then
    LATCHKEY=latchkey
  else
    LATCHKEY="$here/../../target/release/latchkey"
  fi
fi
[ -x "$LATCHKEY" ] || command -v "$LATCHKEY" >/dev/null ||
  fail "no latchkey binary at $LATCHKEY (build it: cargo build --release -p latchkey-cli, or set LATCHKEY)"
ca="$data/tls/ca.pem"
[ -f "$data/demo.json" ] || fail "no $data/demo.json: run this where \`latchkey demo\` runs, or set LATCHKEY_DATA_DIR"
agent_id="$(jq -r .agent_id "$data/demo.json")"
user_id="$(jq -r .user_id "$data/demo.json")"

# 1. The upstream token, narrowed to what this script needs: it can read the repository and
#    write issues, but not, say, read the user's profile.
if ! token="$("$LATCHKEY" token --issuer "$issuer" --ca-cert "$ca" --client-id "$agent_id" \
  --key "$data/demo-agent.key" --user "$user_id" --connection demo-git \
  --scope 'repo:read issues:write' --audit-context 'examples/shell: comment on an issue')"; then
  fail "no token from Latchkey (not connected yet? open ${issuer}connect/demo-git and approve)"
fi

# api METHOD PATH [JSON]: the demo API's answer on stdout; fails on anything but 2xx.
api() {
  local out status args=(-X "$1" -H "Authorization: Bearer $token")
  [ $# -lt 3 ] || args+=(-H 'Content-Type: application/json' --data "$3")
  out="$(mktemp)"
  status="$(curl -sS --cacert "$ca" -o "$out" -w '%{http_code}' "${args[@]}" "${issuer}demo/api$2")" ||
    { rm -f "$out"; fail "$1 $2: curl failed"; }
  if [ "${status:0:1}" != 2 ]; then
    echo "error: $1 $2 answered $status: $(cat "$out")" >&2
    rm -f "$out"
    return 1
  fi
  cat "$out"
  rm -f "$out"
}

# The token really is narrowed: the profile is out of its scope (403 at the provider).
profile_status="$(curl -sS --cacert "$ca" -o /dev/null -w '%{http_code}' \
  -H "Authorization: Bearer $token" "${issuer}demo/api/user")"
[ "$profile_status" = 403 ] || fail "GET /user with a repo-only token answered $profile_status, expected 403"

# 2. The repository's issues; file one when there is none.
issues="$(api GET "/repos/$repo/issues")"
echo "$repo has $(jq length <<<"$issues") issue(s)"
number="$(jq -r 'first(.[].number) // empty' <<<"$issues")"
if [ -z "$number" ]; then
  created="$(api POST "/repos/$repo/issues" \
    "$(jq -n '{title: "Try Latchkey from a shell script", body: "Filed by examples/shell."}')")"
  number="$(jq -r .number <<<"$created")"
  echo "filed $repo#$number"
fi

# 3. Comment on it, with a body that is unique to this run.
body="Looked at this from examples/shell ($(date -u +%Y-%m-%dT%H:%M:%SZ), run $$-$RANDOM)"
comment="$(api POST "/repos/$repo/issues/$number/comments" "$(jq -n --arg body "$body" '{body: $body}')")"
comment_id="$(jq -r .id <<<"$comment")"

# 4. Check the outcome: read the issue back and find exactly this comment on it.
found="$(api GET "/repos/$repo/issues" | jq --argjson n "$number" --argjson id "$comment_id" --arg body "$body" \
  '[.[] | select(.number == $n) | .comments[] | select(.id == $id and .body == $body)] | length')"
[ "$found" = 1 ] || fail "comment $comment_id is not on $repo#$number when read back"
echo "ok: $repo#$number comment $comment_id: $body"
