"""What a patch pipeline hands the trainer each step (``Batch``), and the error of a saved pipeline
state that does not fit. Apart from the backends (base.py and below): the package's __init__ exports
both without importing torch, which the shard writer's worker processes never load."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdiff.errors import UserError

if TYPE_CHECKING:
    import torch


class PipelineStateError(UserError, RuntimeError):
    """A saved pipeline state that does not fit the pipeline it is loaded into."""


@dataclass
class Batch:
    patches: torch.Tensor     # images: uint8 (b, s, s, C) in [0, 255]; latents: float32 (b, C, s, s),
                              # the stored values or a posterior's draw
    offsets: torch.Tensor     # int64 (b, 2) = (x0, y0)
    labels: torch.Tensor      # int64 (b,), -1 where the dataset has no labels
    patch_size: int
    images_seen: int          # global images seen before this step
    features: torch.Tensor | None = None   # repr.loss=align: float32 (b, C_f, g, g), each row's stored feature
                                           # grid of the whole image, flipped with its patch

    def float_patches(self) -> torch.Tensor:
        """float32 (b, C, s, s): images in [-1, 1] with the bits the training step's kernels use."""
        from pdiff.kernels.net_input import patches_to_float   # torch and Triton: this module stays without them
        return patches_to_float(self.patches)
