"""Analytical models: MoESD's speculative-decoding speedup for (sparse) targets."""
