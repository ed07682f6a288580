#!/usr/bin/env bash
# On a GPU node that reaches no package index: install the bundle of tools/gpu_bundle.py into a
# site folder and check that the GPU path imports. The parts may come over several copies: each
# run keeps the parts it finds (checked against SHA256SUMS) and installs once all of them are there.
#
#   tools/gpu_install.sh [PARTS_DIR]        # default .gpu/parts; then:
#   export PYTHONPATH=/tmp/site:$PWD
#
# MMPRETRAIN_SITE (default /tmp/site) is the install folder, MMPRETRAIN_STASH (default
# /tmp/mmpretrain-bundle) keeps the parts between runs, PYTHON (default python3) is the node's
# Python with torch. Exit 0: installed; 3: parts still missing (named); 1: anything else failed.
set -euo pipefail
parts=${1:-.gpu/parts}
site=${MMPRETRAIN_SITE:-/tmp/site}
stash=${MMPRETRAIN_STASH:-/tmp/mmpretrain-bundle}
py=${PYTHON:-python3}
mkdir -p "$stash"
if [ -d "$parts" ]; then
  find "$parts" -maxdepth 1 -type f \( -name 'bundle.tar.part*' -o -name SHA256SUMS \) \
    -exec cp {} "$stash/" \;
fi
if [ ! -f "$stash/SHA256SUMS" ]; then
  echo "no SHA256SUMS in $parts or $stash: copy it with the parts" >&2
  exit 3
fi

# Every part named in SHA256SUMS must be here and intact; a damaged one is dropped.
whole=$(awk '$2 == "bundle.tar" {print $1}' "$stash/SHA256SUMS")
missing=()
listed=()
while read -r sum name; do
  [ "$name" = bundle.tar ] && continue
  listed+=("$stash/$name")
  if [ -f "$stash/$name" ] && [ "$(sha256sum < "$stash/$name" | cut -d' ' -f1)" = "$sum" ]; then
    continue
  fi
  [ -f "$stash/$name" ] && { echo "$name does not match SHA256SUMS: dropped" >&2; rm -f "$stash/$name"; }
  missing+=("$name")
done < "$stash/SHA256SUMS"
if [ ${#missing[@]} -gt 0 ]; then
  echo "have $((${#listed[@]} - ${#missing[@]})) of ${#listed[@]} parts in $stash; missing: ${missing[*]}" >&2
  exit 3
fi

marker="$site/.mmpretrain-bundle-$whole"
if [ ! -f "$marker" ]; then
  echo "all ${#listed[@]} parts here: joining, installing into $site" >&2
  rm -rf "$stash/wheels"
  mkdir -p "$stash/wheels" "$site"
  cat "${listed[@]}" | tar -x -C "$stash/wheels"  # the listed parts, in order: no stale one
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$stash"/wheels/*.whl
  # Transformer Engine's PyTorch extension is built here, against this node's torch and CUDA.
  # The CUDA toolkit's headers leave out NCCL's and cuDNN's; the node's pip packages hold them.
  # CUDA_HOME, where unset, is the toolkit nvcc runs from (nvcc may be a wrapper elsewhere).
  for sdist in "$stash"/wheels/transformer_engine_torch-*.tar.gz; do
    [ -f "$sdist" ] || continue
    if [ -z "${CUDA_HOME:-}" ] && command -v nvcc > /dev/null; then
      top=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p')
      if [ -n "$top" ]; then CUDA_HOME=$(cd "$top" && pwd); export CUDA_HOME; fi
    fi
    nvidia_includes=$("$py" -c 'import glob, nvidia
print(":".join(d for p in nvidia.__path__ for d in sorted(glob.glob(p + "/*/include"))))')
    built=("$stash/built/$(basename "$sdist" .tar.gz)"-*.whl)  # kept from an earlier run?
    if [ ! -f "${built[0]}" ]; then
      jobs=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
      echo "building $(basename "$sdist") on $jobs cores (a few minutes)" >&2
      CPATH="$nvidia_includes${CPATH:+:$CPATH}" NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=$jobs \
        PYTHONPATH="$site" "$py" -m pip wheel -q --no-deps --no-build-isolation --no-index \
        -w "$stash/built" "$sdist"
      built=("$stash/built/$(basename "$sdist" .tar.gz)"-*.whl)
    fi
    # Its library goes inside transformer_engine/, which the core wheel installed: pip --target
    # would skip that folder (or, with --upgrade, replace it), so the files are merged instead.
    rm -rf "$stash/ext"
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$stash/ext" "${built[0]}"
    cp -a "$stash/ext/." "$site/"
  done
  touch "$marker"
fi

# Import the GPU path's packages among those installed, and name the device torch sees.
PYTHONPATH="$site:$PWD" "$py" - "$site" <<'EOF'
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
