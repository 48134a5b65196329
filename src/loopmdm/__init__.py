"""LoopMDM: looped masked diffusion language models (Lee et al., arXiv 2605.26106)."""

__version__ = "0.1.0"
