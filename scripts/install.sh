#!/bin/sh
# Installs inverse-cloud from this copy of the repository for the user who runs it, on Debian 12 or any
# Linux with Python 3.11+: as root, or as a user with sudo (needed only when python3-venv is missing).
#   - python3-venv, if `python3 -m venv` cannot work yet (Debian leaves ensurepip out of python3);
#   - a venv in ~/.local/lib/inverse-cloud with the package (pip install ., not editable);
#   - the `inverse-cloud` command on PATH: a link in /usr/local/bin for root (root's PATH has no
#     ~/.local/bin on Debian), in ~/.local/bin for everyone else (Debian's ~/.profile puts it on PATH).
# Run it again to upgrade after pulling a new version; your config and data are not touched.
set -eu
cd "$(dirname "$0")/.."
VENV="$HOME/.local/lib/inverse-cloud"
if [ "$(id -u)" = 0 ]; then SUDO=""; BIN=/usr/local/bin; else SUDO="sudo"; BIN="$HOME/.local/bin"; fi
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    echo "installing python3-venv${SUDO:+ (with sudo)}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
fi
python3 -m venv "$VENV"
# an optional extra as the first argument: `sh scripts/install.sh dns` adds dns-lexicon (setup --dns PROVIDER)
EXTRAS="${1:-}"
case "$EXTRAS" in ""|dns) ;; *) echo "unknown extra: $EXTRAS (known: dns)" >&2; exit 2 ;; esac
"$VENV/bin/pip" install --quiet --disable-pip-version-check ".${EXTRAS:+[$EXTRAS]}"
mkdir -p "$BIN"
ln -sf "$VENV/bin/inverse-cloud" "$BIN/inverse-cloud"
echo "installed: $BIN/inverse-cloud -> $VENV/bin/inverse-cloud ($("$VENV/bin/inverse-cloud" --version))"
case ":$PATH:" in
    *":$BIN:"*) ;;
    *) echo "$BIN is not on your PATH yet: log in again (or run: export PATH=\"$BIN:\$PATH\")" ;;
esac
