"""Fused side-nets: one small network per hooked layer for the composed behaviour delta (issue #6)."""
