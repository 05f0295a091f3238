"""Test-time scaling paradigms (single, Best-of-N, multi-round), datasets, grading and voting."""
