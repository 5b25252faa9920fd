"""Errors shared by the checkpoint readers and writers."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model (missing, corrupted or mismatched)."""
