#!/usr/bin/env bash
# Make .venv usable: the heavy third-party packages live in a shared venv built from
# requirements.lock (outside the clone, keyed by the lock's hash, so clones that share a lock share
# it); .venv is a small per-clone venv layered on it that holds this clone's editable install, so
# two clones never import each other's code. A fresh machine builds both from nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
key=$(sha256sum requirements.lock | cut -c1-16)
store="${MMPRETRAIN_VENV_STORE:-$HOME/.cache/mmpretrain}"
shared="$store/venv-$key"
if [ ! -f "$shared/.complete" ]; then
  echo "building $shared from requirements.lock (a few minutes, ~7 GB)" >&2
  rm -rf "$shared"; mkdir -p "$store"
  python3 -m venv "$shared"
  "$shared/bin/pip" install -q --upgrade pip
  "$shared/bin/pip" install -q -r requirements.lock
  touch "$shared/.complete"
fi
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
if [ "$(cat .venv/.layered-on 2>/dev/null)" != "$shared" ]; then
  rm -rf .venv
  python3 -m venv --without-pip .venv
  echo "import site; site.addsitedir('$(purelib "$shared/bin/python")')" \
    > "$(purelib .venv/bin/python)/_shared_venv.pth"
  printf '#!%s\nfrom torch.distributed.run import main\nmain()\n' "$(pwd)/.venv/bin/python" > .venv/bin/torchrun
  chmod +x .venv/bin/torchrun
  ln -s "$shared/bin/ruff" .venv/bin/ruff  # a native binary
  echo "$shared" > .venv/.layered-on
fi
[ -e .venv/bin/tensorboard ] || ln -s "$shared/bin/tensorboard" .venv/bin/tensorboard  # README's viewer
stamp=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . >&2
  echo "$stamp" > .venv/.installed
fi
