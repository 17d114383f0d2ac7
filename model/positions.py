"""Fixed 2-D sin-cos position embeddings, interpolated across resolutions by pos_interp_scale."""
from __future__ import annotations

import torch


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) embedding: sin on the first half, cos on the second."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega  # (dim/2,)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def grid_1d(grid_size: int, base_size: int, pos_interp_scale: float, device=None) -> torch.Tensor:
    """Patch coordinates: arange(G) / (G / base_size) / pos_interp_scale."""
    g = torch.arange(grid_size, dtype=torch.float32, device=device)
    return g / (grid_size / base_size) / pos_interp_scale


def sincos_2d(dim: int, grid_size: int, base_size: int | None = None, pos_interp_scale: float = 1.0,
              device=None) -> torch.Tensor:
    """(G*G, dim) float32 embedding of a square patch grid in raster order (half for rows, half for columns).

    base_size defaults to grid_size, so positions are arange(G) / pos_interp_scale: a 512-px model
    (G=32, scale 2) sees the 256-px grid (G=16, scale 1) at half steps.
    """
    if dim % 4:
        raise ValueError(f"position embedding width {dim} must be a multiple of 4")
    base = grid_size if base_size is None else base_size
    g = grid_1d(grid_size, base, pos_interp_scale, device)
    rows, cols = torch.meshgrid(g, g, indexing="ij")  # (G, G) each
    # Same layout as the release (and MAE/DiT): first half embeds the column coordinate, second the row.
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (G*G, dim)
    return emb.float()
