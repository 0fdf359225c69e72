"""Weight-space domains (LIDs): boxes now, zonotopes later."""

from verifier.domains.box import Box, width_summary

__all__ = ["Box", "width_summary"]
