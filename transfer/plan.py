"""Pure transfer planning shared by every backend: rounds, merged segments, frames, token runs.

A pull goes in rounds of at most ``max_tokens_in_buffer`` tokens. Within a round, blocks that are
contiguous in both pools merge into one segment. When the two sides use the same block size the
destination of a segment is a block of the sink's pool; otherwise it is a slot of the sink's
staging buffer, and ``token_runs`` scatters the staged tokens into the sink's blocks.
This module does no I/O.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple


class Segment(NamedTuple):
    src: int        # first source block
    dst: int        # first destination block (or staging slot)
    n: int          # number of blocks


class Round(NamedTuple):
    first: int              # index of the round's first block in the transfer's block list
    count: int              # number of source blocks in the round
    segments: list          # [Segment]


class Frame(NamedTuple):
    src: int        # byte offset in the source pool
    dst: int        # byte offset in the destination (pool or staging buffer)
    nbytes: int


def merge_segments(src_ids: list, dst_ids: list) -> list:
    """Runs of blocks contiguous in both lists, in order."""
    segments: list = []
    for s, d in zip(src_ids, dst_ids):
        last = segments[-1] if segments else None
        if last is not None and s == last.src + last.n and d == last.dst + last.n:
            segments[-1] = Segment(last.src, last.dst, last.n + 1)
        else:
            segments.append(Segment(s, d, 1))
    return segments


def plan_rounds(src_ids: list, dst_ids: list | None, blocks_per_round: int) -> list:
    """Rounds of at most ``blocks_per_round`` source blocks. ``dst_ids=None`` means staging:
    each round's blocks land in staging slots 0, 1, ... in order."""
    if blocks_per_round < 1:
        raise ValueError(f"blocks_per_round={blocks_per_round} must be >= 1")
    rounds = []
    for first in range(0, len(src_ids), blocks_per_round):
        src = src_ids[first:first + blocks_per_round]
        dst = list(range(len(src))) if dst_ids is None else dst_ids[first:first + len(src)]
        rounds.append(Round(first, len(src), merge_segments(src, dst)))
    return rounds


def split_frames(segments: list, src_block_nbytes: int, dst_block_nbytes: int,
                 frame_bytes: int) -> list:
    """Cut each segment's byte range into frames of at most ``frame_bytes`` bytes (a frame
    never spans two segments: they are not contiguous in the source pool)."""
    if frame_bytes < 1:
        raise ValueError(f"frame_bytes={frame_bytes} must be >= 1")
    frames = []
    for seg in segments:
        size = seg.n * src_block_nbytes
        src0, dst0 = seg.src * src_block_nbytes, seg.dst * dst_block_nbytes
        for off in range(0, size, frame_bytes):
            frames.append(Frame(src0 + off, dst0 + off, min(frame_bytes, size - off)))
    return frames


class TokenRun(NamedTuple):
    src_block: int      # index into the transfer's source block list
    src_off: int        # token offset within that block
    dst_block: int      # index into the sink's destination block list
    dst_off: int
    n: int              # tokens


def token_runs(t0: int, t1: int, src_block_size: int, dst_block_size: int) -> Iterator[TokenRun]:
    """Maximal token runs in ``[t0, t1)`` that cross no block boundary on either side."""
    t = t0
    while t < t1:
        s_off, d_off = t % src_block_size, t % dst_block_size
        n = min(src_block_size - s_off, dst_block_size - d_off, t1 - t)
        yield TokenRun(t // src_block_size, s_off, t // dst_block_size, d_off, n)
        t += n


def buffer_blocks(max_tokens_in_buffer: int, block_size: int) -> int:
    """Source blocks per round: at least one, even if a block is larger than the buffer."""
    return max(1, max_tokens_in_buffer // block_size)
