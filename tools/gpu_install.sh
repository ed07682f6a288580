#!/usr/bin/env bash
# On a GPU node that reaches no package index: install the bundle of tools/gpu_bundle.py into a
# site folder and check that the GPU path imports. The parts may come over several copies: each
# run keeps the intact parts it finds and installs once all of them are there.
#
#   tools/gpu_install.sh [PARTS_DIR]        # default .gpu/parts; every copy brings SHA256SUMS
#   export PYTHONPATH=$PWD/.gpu/site:$PWD   # from the repository root
#
# MMPRETRAIN_SITE (default .gpu/site in the repository) is the install folder, replaced whole by
# each new bundle. MMPRETRAIN_STASH (default .gpu/stash) keeps the parts between runs, one folder
# per bundle, and the built TE extension, per Python and torch. (A node's /tmp may not outlive
# a job.) PYTHON (default python3) is the node's Python with torch.
# Exit 0: installed and importable; 3: parts still missing (named); 1: anything else.
set -euo pipefail
trap 'echo "gpu_install.sh: failed at line $LINENO" >&2; exit 1' ERR
export PIP_REQUIRE_VIRTUALENV=0  # --target installs need no virtualenv
root=$(cd "$(dirname "$0")/.." && pwd)
parts=${1:-$root/.gpu/parts}
site=${MMPRETRAIN_SITE:-$root/.gpu/site}
stash=${MMPRETRAIN_STASH:-$root/.gpu/stash}
py=${PYTHON:-python3}
sha() { sha256sum < "$1" | cut -d' ' -f1; }

# Import the GPU path's packages among those in site folder $1, and name the device torch sees.
check() {
  PYTHONPATH="$1:$root" "$py" - "$1" <<'EOF'
import importlib
import importlib.metadata as md
import sys
from pathlib import Path

import torch

MODULES = {"megatron-core": "megatron.core", "mosaicml-streaming": "streaming",
           "nvidia-dali-cuda130": "nvidia.dali", "transformer-engine-torch": "transformer_engine.pytorch"}
site = Path(sys.argv[1])
dists = sorted((md.Distribution.at(d) for d in site.glob("*.dist-info")), key=lambda d: d.metadata["Name"])
print(f"{len(dists)} distributions in {site}")
for dist in dists:
    module = MODULES.get(dist.metadata["Name"].lower().replace("_", "-"))
    if module:
        importlib.import_module(module)
        print(f"imports {module} ({dist.metadata['Name']} {dist.version})")
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__} on {gpu}")
from mmpretrain.model.te_specs import te_unavailable  # noqa: E402

print("mmpretrain's TE spec:", te_unavailable() or "available")
EOF
}

# Which bundle: the one whose SHA256SUMS came with these parts, else the last one seen.
mkdir -p "$stash"
[ -d "$parts" ] || echo "no folder $parts: looking at the parts kept in $stash" >&2
if [ -f "$parts/SHA256SUMS" ]; then
  bundle=$(awk '$2 == "bundle.tar" {print $1}' "$parts/SHA256SUMS")
  [ -n "$bundle" ] || { echo "$parts/SHA256SUMS names no bundle.tar" >&2; exit 1; }
  mkdir -p "$stash/$bundle"
  cp "$parts/SHA256SUMS" "$stash/$bundle/SHA256SUMS"
  echo "$bundle" > "$stash/current"
elif [ -f "$stash/current" ]; then
  bundle=$(cat "$stash/current")
else
  echo "no SHA256SUMS in $parts: copy it with the parts" >&2
  exit 3
fi
keep="$stash/$bundle"

# Every part it lists must be kept intact; a part comes in only if it matches its sum.
listed=()
missing=()
while read -r sum name; do
  [ "$name" = bundle.tar ] && continue
  listed+=("$keep/$name")
  if [ -f "$keep/$name" ] && [ "$(sha "$keep/$name")" = "$sum" ]; then continue; fi
  if [ -f "$parts/$name" ]; then
    if [ "$(sha "$parts/$name")" = "$sum" ]; then cp "$parts/$name" "$keep/$name"; continue; fi
    echo "$parts/$name does not match SHA256SUMS: not taken" >&2
  fi
  missing+=("$name")
done < "$keep/SHA256SUMS"
[ ${#listed[@]} -gt 0 ] || { echo "$keep/SHA256SUMS lists no part" >&2; exit 1; }
if [ ${#missing[@]} -gt 0 ]; then
  echo "have $((${#listed[@]} - ${#missing[@]})) of ${#listed[@]} parts in $keep; missing: ${missing[*]}" >&2
  exit 3
fi

marker="$site/.mmpretrain-bundle-$bundle"
if [ -f "$marker" ]; then
  check "$site"
  exit 0
fi
echo "all ${#listed[@]} parts here: joining, installing into $site" >&2
new="$site.new"
rm -rf "$new" "$keep/wheels"
mkdir -p "$new" "$keep/wheels"
cat "${listed[@]}" | tar -x -C "$keep/wheels"
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$new" \
  "$keep"/wheels/*.whl

# Transformer Engine's PyTorch extension is built here, against this node's torch and CUDA, once
# per Python and torch. CUDA_HOME, where unset, is the toolkit nvcc runs from (nvcc may be a
# wrapper elsewhere); the toolkit's headers leave out NCCL's and cuDNN's, the node's pip
# packages (nvidia/*/include) hold them.
key=$("$py" -c 'import sys, torch; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}")')
for sdist in "$keep"/wheels/transformer_engine_torch-*.tar.gz; do
  [ -f "$sdist" ] || continue
  built_dir="$stash/built-$key"
  built=("$built_dir/$(basename "$sdist" .tar.gz)"-*.whl)
  if [ ! -f "${built[0]}" ]; then
    if [ -z "${CUDA_HOME:-}" ] && command -v nvcc > /dev/null; then
      top=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' || true)
      if [ -n "$top" ]; then CUDA_HOME=$(cd "$top" && pwd); export CUDA_HOME; fi
    fi
    nvidia_includes=$("$py" -c 'import glob, nvidia
print(":".join(d for p in nvidia.__path__ for d in sorted(glob.glob(p + "/*/include"))))')
    jobs=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    echo "building $(basename "$sdist") for $key on $jobs cores (a few minutes)" >&2
    CPATH="$nvidia_includes${CPATH:+:$CPATH}" NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=$jobs \
      PYTHONPATH="$new" "$py" -m pip wheel -q --no-deps --no-build-isolation --no-index \
      -w "$built_dir" "$sdist"
    built=("$built_dir/$(basename "$sdist" .tar.gz)"-*.whl)
  fi
  # Its library goes inside transformer_engine/, which the core wheel installed: pip --target
  # would skip that folder (or, with --upgrade, replace it), so the files are merged instead.
  rm -rf "$stash/ext"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$stash/ext" "${built[0]}"
  cp -a "$stash/ext/." "$new/"
  rm -rf "$stash/ext"
done

# Only a site that imports replaces the old one and is marked installed.
check "$new"
rm -rf "$site" "$keep/wheels"
mv "$new" "$site"
touch "$marker"
