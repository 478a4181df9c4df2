"""Constants of the reference's statistics shared by both vocabulary kernels."""

RANK_CLIP = 100  # a target's rank is counted up to this (the RSR statistic's clip)
