"""NSCT fusion: non-subsampled contourlet transform, low-pass averaged, high-pass by absolute
maximum with a consistency check.

Transform after da Cunha, Zhou & Do, "The nonsubsampled contourlet transform: theory, design, and
applications", IEEE TIP 15(10), 2006: a non-subsampled pyramid followed by a non-subsampled directional filter
bank on every band (2^l wedges with equal slope steps per cone), both built in the frequency
domain by ``frequency_bank.py`` (Gaussian pyramid bands, Meyer roll-off of a full wedge between
directions); the inverse is the sum of the bands.

Fusion rule as in the classic multiresolution comparisons (Li, Yang & Hu, Inf. Fusion 12(2), 2011;
consistency verification from Li, Manjunath & Mitra, 1995): the low-pass residuals are averaged;
in every directional band the coefficient with the larger magnitude is chosen, and the binary
choice map is then replaced by its 3x3 majority so that isolated choices follow their neighbours.
"""
from __future__ import annotations

import torch

from .frequency_bank import decompose
from .local_filters import majority_filter
from .registry import register_function

#: directions per level, finest first: 4 levels with 16, 8, 4, 2 directions (levels [1,2,3,4]
#: of the NSCT toolbox counted from the coarsest, the usual setting in NSCT fusion papers).
NSCT_DIRECTIONS = (16, 8, 4, 2)
#: half-size of the majority window of the consistency check (1 -> 3x3).
CONSISTENCY_RADIUS = 1
#: roll-off between neighbouring directional wedges, as a fraction of a wedge (smoother than the
#: shearlet's 0.5, closer to the DFB's fan filters).
DFB_TRANSITION = 1.0


def fuse_nsct(a: torch.Tensor, b: torch.Tensor, directions: tuple[int, ...] = NSCT_DIRECTIONS,
              consistency_radius: int = CONSISTENCY_RADIUS) -> torch.Tensor:
    """NSCT fusion of a, b [B,1,H,W] in [0,1] -> [B,1,H,W].

    Parameters: 4 levels, 16/8/4/2 directions (finest first), wedge roll-off of one wedge,
    16-pixel reflect padding; low-pass averaged; high-pass |max| with a (2r+1)^2 majority filter, r = 1.
    """
    ba = decompose(a, directions, DFB_TRANSITION)
    bb = decompose(b, directions, DFB_TRANSITION)
    low = 0.5 * (ba[:, -1:] + bb[:, -1:])
    ha, hb = ba[:, :-1], bb[:, :-1]
    choose_a = ha.abs() >= hb.abs()
    if consistency_radius > 0:
        choose_a = majority_filter(choose_a, consistency_radius)
    high = torch.where(choose_a, ha, hb)
    return (high.sum(dim=1, keepdim=True) + low).clamp(0.0, 1.0)


register_function("nsct", fuse_nsct, bytes_per_pixel=4 * 200)   # texts: options.METHODS
