"""Weight-space domains (LIDs): boxes and zonotopes."""

from verifier.domains.box import Box, width_summary
from verifier.domains.zonotope import Zonotope

__all__ = ["Box", "Zonotope", "width_summary"]
