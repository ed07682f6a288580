#!/usr/bin/env bash
# Make .venv usable: build it from requirements.lock if needed.
# The venv lives outside the clone, keyed by the lock's hash, so clones that share a lock
# share one venv; .venv is a symlink to it. A fresh machine builds it from nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
key=$(sha256sum requirements.lock | cut -c1-16)
store="${MMPRETRAIN_VENV_STORE:-$HOME/.cache/mmpretrain}"
venv="$store/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "building venv $venv from requirements.lock (a few minutes, ~6.5 GB)" >&2
  rm -rf "$venv"; mkdir -p "$store"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r requirements.lock
  touch "$venv/.complete"
fi
if [ "$(readlink .venv 2>/dev/null)" != "$venv" ]; then rm -rf .venv; ln -s "$venv" .venv; fi
# The project is installed editable into the shared venv for whichever clone runs this;
# reinstalled when the clone or its pyproject.toml changes.
stamp="$(pwd) $(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$venv/.mmpretrain-stamp" 2>/dev/null)" != "$stamp" ]; then
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e . >&2
  echo "$stamp" > "$venv/.mmpretrain-stamp"
fi
