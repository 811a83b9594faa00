#!/usr/bin/env bash
# Install espeak-ng, the MBROLA synthesiser and the diphone voices that scripts/make_corpus.py
# uses for its harder evaluation corpus (`--voices mb-us1,...`). Debian/Ubuntu only, as root.
#
# The voices (and, on Debian 12, `mbrola` itself) are in the contrib / non-free components, so
# this adds `contrib non-free` to the Components of the Debian entries already configured in
# /etc/apt/sources.list.d/*.sources (deb822) or the `deb` lines of *.list / sources.list; no new
# repository is added. Idempotent: it does nothing when everything is already installed, and a
# second run changes no file. The voices' licences forbid commercial use and redistribution of
# their output in some cases: don't commit the audio made with them (see data/README.md).
set -euo pipefail

VOICES="mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1 mbrola-de1 mbrola-de2 mbrola-fr1 mbrola-fr4 mbrola-nl2"

missing() {
  local p out=""
  for p in espeak-ng mbrola $VOICES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || out="$out $p"
  done
  echo "$out"
}

need=$(missing)
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "install_mbrola.sh: must run as root to apt-get install:$need" >&2; exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "install_mbrola.sh: needs apt-get (Debian/Ubuntu) to install:$need" >&2; exit 1
fi

# contrib + non-free on the Debian entries (only files that name a debian archive are touched)
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  grep -qi '^URIs:.*debian' "$f" || continue
  if grep -Eq '^Components:' "$f" && grep -E '^Components:' "$f" | grep -Evq '(^|[[:space:]])non-free([[:space:]]|$)'; then
    sed -i -E '/^Components:/{/(^|[[:space:]])non-free([[:space:]]|$)/!s/$/ contrib non-free/}' "$f"
    sed -i -E '/^Components:/s/ contrib(.*) contrib / contrib\1 /' "$f"
  fi
done
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
  [ -f "$f" ] || continue
  sed -i -E '/^deb(-src)? .*debian/{/(^|[[:space:]])non-free([[:space:]]|$)/!s/$/ contrib non-free/}' "$f"
done

log=$(mktemp)
if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need) >"$log" 2>&1; then
  echo "install_mbrola.sh: apt-get install$need failed: $(grep -E '^E:' "$log" | head -1)" >&2
  rm -f "$log"; exit 1
fi
rm -f "$log"
need=$(missing)
if [ -n "$need" ]; then
  echo "install_mbrola.sh: still not installed after apt-get:$need" >&2; exit 1
fi
