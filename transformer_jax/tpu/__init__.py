"""The TPU compile check: programs compiled ahead of time for a TPU slice, and what their HLO shows."""
