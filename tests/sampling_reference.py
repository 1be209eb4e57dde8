"""The independent reference of DAMamba's adaptive sampling, shared by its torch-backend and Triton tests."""
import torch
import torch.nn.functional as F


def grid_sample_reference(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[b, c, i, j] = x[b, c] bilinearly at (i + dy_g, j + dx_g), zeros outside: the release's convention,
    written with F.grid_sample(align_corners=False), one call per channel group g (offsets (B, H, W, 2G))."""
    batch, channels, height, width = x.shape
    groups = offsets.shape[-1] // 2
    per = channels // groups
    rows = torch.arange(height, dtype=offsets.dtype, device=offsets.device).view(-1, 1)
    cols = torch.arange(width, dtype=offsets.dtype, device=offsets.device).view(1, -1)
    outs = []
    for g in range(groups):
        dx, dy = offsets[..., 2 * g], offsets[..., 2 * g + 1]
        grid = torch.stack([(2 * (cols + dx) + 1) / width - 1, (2 * (rows + dy) + 1) / height - 1], -1)
        outs.append(F.grid_sample(x[:, g * per:(g + 1) * per], grid.to(x.dtype), mode="bilinear",
                                  padding_mode="zeros", align_corners=False))
    return torch.cat(outs, 1)
