"""Matching SAE latents across seeds, as Paulo & Belrose (2025) define it.

`solvers` finds maximum-cosine assignments (exact dense, or sparse with a proven gap bound);
`pair` matches two SAEs by decoder and by encoder directions, summarises the result, saves
and reads it, and reads it backwards (`invert_assignment`); `multiseed` matches every pair of
seeds of a training folder and counts in how many SAEs each latent is present.
"""

from sae.matching.pair import (
    MatchConfig,
    MatchSummary,
    PairMatch,
    SideAssignment,
    invert_assignment,
    match_checkpoints,
    match_saes,
    read_assignment,
    shared_mask,
    write_assignment,
)

__all__ = [
    "MatchConfig",
    "MatchSummary",
    "PairMatch",
    "SideAssignment",
    "invert_assignment",
    "match_checkpoints",
    "match_saes",
    "read_assignment",
    "shared_mask",
    "write_assignment",
]
