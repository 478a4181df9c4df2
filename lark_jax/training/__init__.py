"""Weighted SFT of the student: data, loss, optimiser, checkpoints, export."""
