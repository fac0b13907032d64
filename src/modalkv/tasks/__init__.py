"""Evaluation tasks generated offline from a seed (text now; multimodal tasks join with the VLM)."""

from .needle import NeedleSample, make_needle, score_contains

__all__ = ["NeedleSample", "make_needle", "score_contains"]
