"""Trained draft heads (Medusa) as Flax modules, and their on-disk format."""
