#!/usr/bin/env bash
# Installs avatarv-jax and what it needs on a fresh machine.
#   bash scripts/setup.sh              # the library (demo)
#   bash scripts/setup.sh dev,parity   # + test tools and the PyTorch parity extra
# Debian packages (espeak-ng for speech, ffmpeg libraries for PyAV) are installed when running
# as root and missing; otherwise a note says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}") \
      >/dev/null 2>&1 || echo "setup: could not install ${need_apt[*]} (continuing)" >&2
  else
    echo "setup: please install ${need_apt[*]} (Debian: apt-get install ${need_apt[*]})" >&2
  fi
fi

python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
