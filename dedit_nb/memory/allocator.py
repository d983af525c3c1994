"""CUDA's caching allocator, simulated: allocated and reserved bytes from a sequence of mallocs and frees."""
from __future__ import annotations

import bisect

MiB = 2 ** 20
GiB = 2 ** 30


class CachingAllocator:
    """Allocated and reserved bytes as CUDA's caching allocator would have them (segments are never given
    back to the device: reserved only grows, as without ``empty_cache``)."""

    SMALL = MiB                   # requests up to this size share 2 MiB segments
    SMALL_SEGMENT = 2 * MiB
    MEDIUM_SEGMENT = 20 * MiB     # requests below 10 MiB get a 20 MiB segment
    ROUND_LARGE = 2 * MiB

    def __init__(self):
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        # reserved memory in segments holding at least one block: what a device must have, since on running
        # out the allocator gives wholly free cached segments back and retries
        self.in_use = self.peak_in_use = 0
        self._free = {True: [], False: []}   # per pool (small or not): sorted (size, segment, offset)
        self._segments: list[tuple[bool, list[int], dict[int, list]]] = []   # (small, offsets, offset -> [size, free])
        self._segment_blocks: list[list[int]] = []                            # per segment: [size, blocks in use]

    @staticmethod
    def rounded(nbytes: int) -> int:
        return max(512, -(-nbytes // 512) * 512)

    def malloc(self, nbytes: int) -> tuple[int, int]:
        """A block for ``nbytes``: best fit among the free blocks of its pool, else a new segment."""
        size = self.rounded(nbytes)
        small = size <= self.SMALL
        free = self._free[small]
        i = bisect.bisect_left(free, (size, -1, -1))
        if i < len(free):
            block_size, segment, offset = free.pop(i)
        else:
            if small:
                block_size = self.SMALL_SEGMENT
            elif size < 10 * MiB:
                block_size = self.MEDIUM_SEGMENT
            else:
                block_size = -(-size // self.ROUND_LARGE) * self.ROUND_LARGE
            segment, offset = len(self._segments), 0
            self._segments.append((small, [0], {0: [block_size, True]}))
            self._segment_blocks.append([block_size, 0])
            self.reserved += block_size
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        counts = self._segment_blocks[segment]
        if counts[1] == 0:
            self.in_use += counts[0]
            self.peak_in_use = max(self.peak_in_use, self.in_use)
        counts[1] += 1
        _, offsets, blocks = self._segments[segment]
        rest = block_size - size
        if rest >= (512 if small else MiB + 1):   # a large block is split only when over 1 MiB would remain
            bisect.insort(offsets, offset + size)
            blocks[offset + size] = [rest, True]
            bisect.insort(free, (rest, segment, offset + size))
            block_size = size
        blocks[offset] = [block_size, False]
        self.allocated += block_size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return segment, offset

    def free(self, block: tuple[int, int]) -> None:
        """Give a block back to its segment, merged with free neighbours."""
        segment, offset = block
        small, offsets, blocks = self._segments[segment]
        free = self._free[small]
        size = blocks[offset][0]
        self.allocated -= size
        counts = self._segment_blocks[segment]
        counts[1] -= 1
        if counts[1] == 0:
            self.in_use -= counts[0]
        i = bisect.bisect_left(offsets, offset)
        if i + 1 < len(offsets) and blocks[offsets[i + 1]][1]:
            after = offsets.pop(i + 1)
            _remove(free, (blocks[after][0], segment, after))
            size += blocks.pop(after)[0]
        if i > 0 and blocks[offsets[i - 1]][1]:
            before = offsets[i - 1]
            _remove(free, (blocks[before][0], segment, before))
            offsets.pop(i)
            del blocks[offset]
            offset, size = before, size + blocks[before][0]
        blocks[offset] = [size, True]
        bisect.insort(free, (size, segment, offset))


def _remove(ordered: list, key: tuple) -> None:
    ordered.pop(bisect.bisect_left(ordered, key))
