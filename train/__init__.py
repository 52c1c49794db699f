"""Synthetic scenes and PaliGemma task targets for training and evaluating a small PaliGemma 2 (issue 6)."""
