"""NVLM dynamic tiling: a grid of fixed-size tiles chosen by aspect ratio, plus a global thumbnail.

An image of aspect ratio w/h is resized to (rows * tile, cols * tile) for the grid (rows, cols),
1 <= rows * cols <= max_tiles, whose aspect ratio cols/rows is closest to w/h; between grids of the
same ratio the larger is taken only when the image has at least half its pixels (so small images
are not blown up). The grid is cut into rows*cols tiles in reading order; with more than one tile
a thumbnail (the whole image at tile x tile) follows them.
"""
from __future__ import annotations


def candidate_grids(max_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, cols) with 1 <= rows * cols <= max_tiles, fewest tiles first."""
    grids = [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1)
             if r * c <= max_tiles]
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


def choose_grid(height: int, width: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """The (rows, cols) tile grid for an image of height x width pixels."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for rows, cols in candidate_grids(max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff - 1e-12:
            best, best_diff = (rows, cols), diff
        elif abs(diff - best_diff) <= 1e-12 and height * width > 0.5 * rows * cols * tile * tile:
            best = (rows, cols)
    return best


def tile_tags(n_tiles: int, thumbnail: bool) -> list[str]:
    """The text tag before each tile: `<tile_1>` ... `<tile_N>`, then `<tile_global_thumbnail>`."""
    tags = [f"<tile_{k}>" for k in range(1, n_tiles + 1)]
    return tags + (["<tile_global_thumbnail>"] if thumbnail and n_tiles > 1 else [])
