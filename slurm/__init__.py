"""sbatch templates, installed as package data of `mmpretrain.sbatch`."""
