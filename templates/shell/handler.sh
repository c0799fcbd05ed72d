#!/bin/sh
# Reads the JSON payload on stdin, answers one JSON object on stdout.
payload=$(cat)
[ -n "$payload" ] || payload=null
printf '{"greeting":"%s","sandbox":"%s","payload":%s}\n' "$GREETING" "$THAW_SANDBOX_ID" "$payload"
