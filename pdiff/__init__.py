"""pdiff: Patch Diffusion training (Wang et al., NeurIPS 2023) on EDM foundations."""

__version__ = "0.1.0"
