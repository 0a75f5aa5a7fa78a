#!/usr/bin/env bash
# Install the Debian packages that carry real speech for the offline eval set (Allison's
# Asterisk prompts and their transcripts; see docs/EVAL_DATA.md). Idempotent and quiet: does
# nothing when they are present; where apt-get is missing or not usable (not root, no network)
# it says so on stderr and exits 0, so the rest of the setup goes on.
set -u
PKGS="asterisk-core-sounds-en-wav asterisk-core-sounds-en"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup_system] apt-get not available; install$missing by hand for the offline eval set" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "[setup_system] not root; install$missing by hand for the offline eval set" >&2
    exit 0
  fi
fi
echo "[setup_system] installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1 ||
       { $SUDO apt-get update -qq >/dev/null 2>&1 &&
         $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1; }; }; then
  echo "[setup_system] warning: apt-get could not install$missing" >&2
fi
exit 0
