"""mmpretrain: distributed pretraining of NVLM-style vision-language models on megatron-core."""
import importlib.util
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
_MAPPED = {"mmpretrain.parallel": "parallel", "mmpretrain.data": "data", "mmpretrain.sbatch": "slurm"}
"""pyproject.toml's [tool.setuptools.package-dir]: folders of the source tree that an install puts
inside this package."""


class _SourceTreeFinder:
    """Finds `_MAPPED`'s subpackages in the source tree when this package was imported from it and
    no install maps them: `python -m mmpretrain` in the repository root (the working directory comes
    first on sys.path) with mmpretrain installed elsewhere, e.g. into a container's Python. Last on
    sys.meta_path, so an install (editable or not) that finds them comes first."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        folder = _MAPPED.get(name)
        init = _CHECKOUT / folder / "__init__.py" if folder else None
        if init is None or not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(init.parent)])


if (_CHECKOUT / "pyproject.toml").is_file() and _SourceTreeFinder not in sys.meta_path:
    sys.meta_path.append(_SourceTreeFinder)
