"""Candidate search for the sparse solver: each row's and each column's k most similar partners.

One pass over the cosine matrix `a @ b.T`, `block_rows` rows at a time, finds both: rows'
candidates from each block's rows, columns' from the same blocks (a block's entry is looked
at only when it beats its column's threshold, set before the pass from a sample of rows). The
blocks are scanned at lower precision where that is measurably faster (`scan_dtype`):
bfloat16 on a CPU whose AMX / AVX-512 BF16 units run it faster than float32 (timed once per
process), float32 on CUDA, where float32 is fast already. A scanned value differs from the
float32 cosine by a proven amount (`scan_error`: the rounding of the inputs, of the sums and
of the result). Each line's 2k best scanned entries are rescored in float32; a line whose k
best cosines might lie off that list, by that bound, is redone from every entry that could
reach them. The candidates and their cosines are therefore those of a float32 scan: the
margin can add work, never drop a true candidate.

Only three passes touch a whole block: the matrix product, a maximum over groups of columns
(for the rows) and one over groups of rows (for the columns). The rows' maxima are grouped
again (groups of groups), and everything after works on the few groups of each level that
can hold a row's best entries, or on the groups above a column's threshold. These passes
read the block's values as integer keys, their bit patterns (`as_keys`), which torch
compares, reduces and gathers in a fraction of the time: the keys order as the values do
among values >= 0, which the values that decide a row's list or a column's hits are in all
but degenerate cases; a block or chunk where they are not is read by value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from sae.precision import bfloat16_is_faster
from sae.sampled_product import sampled_product

Progress = Callable[[str, int, int], None]
"""Called as progress(stage, done, total) while work is done."""

# Columns are grouped by this many for the maxima that decide which entries of a row are
# looked at one by one, and those maxima again, up to LEVELS times while a level keeps at
# least as many groups as the entries sought.
GROUP = 8
LEVELS = 3
# Scanned lists of LIST_FACTOR * k entries per row are rescored in float32.
LIST_FACTOR = 2
# List entries (rows x entries a row) scanned for and rescored at a time by `scanned_lists`:
# blocks with longer lists have fewer rows.
LIST_ENTRIES = 1 << 16
# Rows (or columns) redone from the scan at a time when their list may miss a top-k entry.
REDO_CHUNK = 64
# Columns scanned again whole at a time when too few entries beat their threshold.
SHORT_CHUNK = 256
# Columns compared with their thresholds (and sampled for them) this many at a time.
COLUMN_CHUNK = 8192
# Columns' thresholds come from every SAMPLE_STEP-th row, set so that about
# THRESHOLD_MARGIN * spare entries of a column beat them.
SAMPLE_STEP = 32
THRESHOLD_MARGIN = 1.5
# `list_dots` works from the table's side when the table has this many times the rows.
TABLE_SIDE = 8
# Rows whose norms `scan_error` takes at a time.
NORM_CHUNK = 1024
# When more than this share of a block's groups of rows may beat their column's threshold,
# the block's entries are compared one by one instead.
DENSE_SHARE = 1 / 4
# Signed integers of each float width (bytes), to read floats' bit patterns as (`as_keys`).
KEY_DTYPES = {2: torch.int16, 4: torch.int32}
# Rows of the cosine matrix per block: on the CPU, 1,024. On a GPU every block costs a few
# thousand small kernel launches, so blocks are as large as GPU_BLOCK_ROWS while one block's
# float32 cosines take at most 1/GPU_BLOCK_SHARE of its memory: on an H200, one side's
# candidates of a 131,072-latent pair took 6.4 s in blocks of 1,024 rows, 2.1 s in 4,096 and
# 1.8 s in 8,192.
CPU_BLOCK_ROWS = 1024
GPU_BLOCK_ROWS = 8192
GPU_BLOCK_SHARE = 16


def report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def cosine_blocks(
    a: torch.Tensor, b: torch.Tensor, block_rows: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, a[start:start+block_rows] @ b.T) in a's dtype, one block at a time.

    Every block is written into the same buffer (a fresh 0.5 GiB block per step would cost
    page faults on each): a block is only valid until the next one is requested."""
    bt = b.T
    buffer = torch.empty((min(block_rows, a.shape[0]), b.shape[0]), dtype=a.dtype, device=a.device)
    for start in range(0, a.shape[0], block_rows):
        rows = a[start : start + block_rows]
        block = buffer[: rows.shape[0]]
        torch.matmul(rows, bt, out=block)
        yield start, block


def scan_device() -> torch.device:
    """Where candidates are searched: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def scan_block_rows(columns: int, device: torch.device) -> int:
    """Rows of `a @ b.T` per block for a `b` of `columns` rows scanned on `device`."""
    if device.type != "cuda":
        return CPU_BLOCK_ROWS
    memory = torch.cuda.get_device_properties(device).total_memory
    fits = memory // (GPU_BLOCK_SHARE * 4 * columns) // GROUP * GROUP
    return int(max(CPU_BLOCK_ROWS, min(GPU_BLOCK_ROWS, fits)))


def scan_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a CPU where it is measurably faster than float32, else float32 (on CUDA
    float32 is fast already, and the scan's answer is the same for either)."""
    if device.type == "cpu" and bfloat16_is_faster():
        return torch.bfloat16
    return torch.float32


@dataclass
class ScanError:
    """How far a scanned value can be from the float32 cosine: the scanned result is the
    rounding (unit roundoff `unit`) of a sum within `base` of the float32 cosine."""

    base: float
    unit: float

    def lower(self, cosine: torch.Tensor) -> torch.Tensor:
        """The least scanned value of an entry whose float32 cosine is >= `cosine`: entries
        scanned below it cannot reach `cosine`."""
        least_sum = cosine.double() - self.base
        rounded = torch.where(
            least_sum >= 0, least_sum * (1 - self.unit), least_sum * (1 + self.unit)
        )
        narrowed = rounded.to(cosine.dtype)
        # One step further down covers the rounding of the float64 result to float32.
        return narrowed.nextafter(torch.full_like(narrowed, -torch.inf))

    def greatest_cosine(self, scanned: torch.Tensor) -> torch.Tensor:
        """The greatest float32 cosine of an entry scanned at <= `scanned` (float64)."""
        value = scanned.double()
        greatest_sum = torch.where(value >= 0, value / (1 - self.unit), value / (1 + self.unit))
        return (greatest_sum + self.base).nextafter(torch.full_like(value, torch.inf))


def scan_error(
    a: torch.Tensor, b: torch.Tensor, scan_a: torch.Tensor, scan_b: torch.Tensor
) -> ScanError:
    """How far `scan_a @ scan_b.T` can be from the float32 cosines `a @ b.T`.

    a.b - a'.b' = (a - a').b + a'.(b - b'), bounded by Cauchy-Schwarz with the actual rounding
    residuals; the float32 accumulation of d products adds at most d * 2^-24 of |a'||b'|, and
    the float32 rescoring as much again; the sum is then rounded to the scan dtype. TF32 (if
    the user turned it on for CUDA matmuls) rounds the inputs inside the product: 2^-10 each."""
    d = a.shape[1]

    def largest_norm(x: torch.Tensor, minus: torch.Tensor | None = None) -> float:
        """The largest row norm of x (of x - minus), a few rows at a time (whole float32
        copies of large matrices cost more than the norms)."""
        most = 0.0
        for first in range(0, x.shape[0], NORM_CHUNK):
            rows = x[first : first + NORM_CHUNK].float()
            if minus is not None:
                # A float32 minus its own rounding to fewer bits is exact in float32.
                rows = rows - minus[first : first + NORM_CHUNK].float()
            most = max(most, float(torch.linalg.vector_norm(rows, dim=1).max()))
        # float32 norms of d terms are within d * 2^-24 relative of the true norm.
        return most * (1 + d * 2.0**-23)

    scan_a_norm = largest_norm(scan_a)
    product = scan_a_norm * largest_norm(scan_b)
    tf32 = (
        scan_a.dtype == torch.float32
        and scan_a.device.type == "cuda"
        and torch.backends.cuda.matmul.allow_tf32
    )
    base = (
        largest_norm(a, minus=scan_a) * largest_norm(b)
        + scan_a_norm * largest_norm(b, minus=scan_b)
        + (2 * 2.0**-10 * product if tf32 else 0.0)
        + 2 * d * 2.0**-24 * product
    )
    unit = 2.0**-8 if scan_a.dtype == torch.bfloat16 else 2.0**-24
    # Headroom for the bound's own float64 arithmetic.
    return ScanError(base=1.001 * base + 1e-9, unit=unit)


@dataclass
class Spare:
    """Each line's longer list from the same scan, kept for a first widening: its best
    entries by scanned value, the float32 cosines of the first of them (those rescored for
    the line's top k), a bound on the cosine of every entry left out of the whole list and
    one for every entry left out of its rescored first part (-inf when none is), and the
    scan's error bound, which holds for any later scan of the same matrices (a widening does
    not compute it again)."""

    members: torch.Tensor  # int64 (lines, size); -1 past the end of a shorter list
    rescored: torch.Tensor  # float32 (lines, list): cosines of members[:, :list]
    rescored_cutoff: np.ndarray  # float64 (lines,)
    cutoff: np.ndarray  # float64 (lines,)
    err: ScanError

    @property
    def rescored_members(self) -> torch.Tensor:
        """The members whose float32 cosines are `rescored`: the list's first part."""
        return self.members[:, : self.rescored.shape[1]]


@dataclass
class Candidates:
    """Each row's top-k columns and each column's top-k rows, with their float32 cosines,
    and the spare lists of rows (`row_spare`: columns) and of columns (`col_spare`: rows)."""

    row_cols: torch.Tensor  # int64 (p, k_row)
    row_vals: torch.Tensor  # float32 (p, k_row), descending
    col_rows: torch.Tensor  # int64 (k_col, q)
    col_vals: torch.Tensor  # float32 (k_col, q), descending
    row_spare: Spare
    col_spare: Spare
    # Rows and columns whose k best were redone from every entry that could reach them (the
    # only lines whose top-k may lie partly off their rescored lists).
    redone: tuple[np.ndarray, np.ndarray]

    def row_cutoff(self, q: int) -> np.ndarray:
        """Upper bound on the cosine of any edge of a row outside both its top-k and its
        rescored list (-inf if none)."""
        return _cutoff(self.row_vals, q, self.row_spare)

    def col_cutoff(self, p: int) -> np.ndarray:
        return _cutoff(self.col_vals.T, p, self.col_spare)


def _cutoff(top: torch.Tensor, width: int, spare: Spare) -> np.ndarray:
    """The least of two bounds on a line's entries outside its top-k (`top`, descending)
    and its rescored list: the k-th cosine (everything else ranks below it) and the list's
    own bound from the scan."""
    if top.shape[1] >= width:
        return np.full(top.shape[0], -np.inf)
    return np.minimum(top[:, -1].double().numpy(), spare.rescored_cutoff)


def list_dots(left: torch.Tensor, table: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """float32 cosines left[n] . table[members[n, m]] -> (n, m).

    A few rows of `left` against a long table (a block's lists) are computed from the
    table's side: its rows read once each, in order, against `left`'s rows, which stay in
    cache, instead of one scattered read of a table row per entry (about twice as fast). An
    entry's value is the same either way."""
    count, size = members.shape
    flat = members.reshape(-1)
    if count * TABLE_SIDE > table.shape[0]:
        crow = torch.arange(count + 1, device=left.device) * size
        return sampled_product(left, table, crow, flat).view(count, size)
    sorted_members, order = torch.sort(flat)
    crow = _row_starts(torch.bincount(sorted_members, minlength=table.shape[0]))
    values = torch.empty(flat.shape[0], dtype=left.dtype, device=left.device)
    values[order] = sampled_product(table, left, crow, order // size)
    return values.view(count, size)


def _dots(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
    """float32 cosines a[rows[n]] . b[cols[n]]; a row's pairs that come one after another
    share one copy of its row."""
    ids, counts = torch.unique_consecutive(rows, return_counts=True)
    return sampled_product(a.index_select(0, ids), b, _row_starts(counts), cols)


def _row_starts(counts: torch.Tensor) -> torch.Tensor:
    """Where each row's entries start, and the end, from each row's count (a CSR `crow`)."""
    crow = torch.zeros(counts.shape[0] + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow


def _line_slots(
    line: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For entries sorted by `line` id: the ids, each line's first entry and number of
    entries, and each entry's line (index into the ids) and place within its line."""
    ids, sizes = torch.unique_consecutive(line, return_counts=True)
    first = torch.cumsum(sizes, 0) - sizes
    slot = torch.repeat_interleave(torch.arange(ids.shape[0], device=line.device), sizes)
    position = torch.arange(line.shape[0], device=line.device) - first.index_select(0, slot)
    return ids, first, sizes, slot, position


def _line_top(
    line: torch.Tensor, members: torch.Tensor, values: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries sorted by `line` id: each line's id, its `count` best values (descending) and
    their members. Every line must have at least `count` entries."""
    ids, first, sizes, slot, position = _line_slots(line)
    table = torch.full((ids.shape[0], int(sizes.max())), -torch.inf, device=values.device)
    table[slot, position] = values
    best, index = table.topk(count, dim=1)
    return ids, best, members[first[:, None] + index]


class RowSearch:
    """One pass over `a @ b.T` keeping each row's k best columns; rows are final as soon as
    their block is done."""

    def __init__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        k: int,
        device: torch.device,
        dtype: torch.dtype,
        spare: int = 0,
        err: ScanError | None = None,
    ):
        self.a, self.b = a.to(device), b.to(device)
        p, q = a.shape[0], b.shape[0]
        self.k = min(k, q)
        # A scanned list longer than k, so that a row's k best float32 cosines are almost
        # always in it (checked per row; a row where they may not be is redone).
        self.list = min(q, LIST_FACTOR * k)
        # A longer list still, scanned values only, kept for widening the row later.
        self.spare = min(q, max(spare, self.list))
        self.scan_a, self.scan_b = self.a.to(dtype), self.b.to(dtype)
        # A bound computed for all of a's rows holds for any of them (and, the entries being
        # the same, for b @ a.T).
        self.err = err or scan_error(self.a, self.b, self.scan_a, self.scan_b)
        self.cols = torch.empty((p, self.k), dtype=torch.int64)
        self.vals = torch.empty((p, self.k))
        self.spare_members = torch.empty((p, self.spare), dtype=torch.int64)
        self.spare_rescored = torch.empty((p, self.list))
        self.spare_cutoff = np.full(p, -np.inf)
        self.rescored_cutoff = np.full(p, -np.inf)
        # Rows whose k best were redone from every entry that could reach them.
        self.redone: list[torch.Tensor] = []

    def scanned_list(self, block: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's `size` best scanned values (descending) and their columns."""
        keys = as_keys(block)
        found = _best_members(keys, size)
        if found is None:
            scanned, cols = block.float().topk(size, dim=1)
            return scanned, cols
        members, coarsest = found
        if bool((coarsest >= 0).all()):
            # The best groups' maxima are >= +0, and so is every entry picked from them: the
            # keys order them as their values.
            best, position = keys.gather(1, members).topk(size, dim=1)
            return best.view(block.dtype).float(), members.gather(1, position)
        # A row with a negative value among its best groups, which keys misorder: the
        # block's rows are looked at by value.
        by_value = _best_members(block, size)
        assert by_value is not None  # the keys' shape
        members = by_value[0]
        scanned, position = block.gather(1, members).float().topk(size, dim=1)
        return scanned, members.gather(1, position)

    def block(self, start: int, block: torch.Tensor) -> None:
        count, q = block.shape
        longer, longer_cols = self.scanned_list(block, self.spare)
        self.spare_members[start : start + count] = longer_cols.cpu()
        if self.spare < q:
            cutoff = self.err.greatest_cosine(longer[:, -1]).cpu().numpy()
            self.spare_cutoff[start : start + count] = cutoff
        scanned, cols = longer[:, : self.list], longer_cols[:, : self.list]
        if self.list < q:
            cutoff = self.err.greatest_cosine(scanned[:, -1]).cpu().numpy()
            self.rescored_cutoff[start : start + count] = cutoff
        true = list_dots(self.a[start : start + count], self.b, cols)
        self.spare_rescored[start : start + count] = true.cpu()
        vals, index = true.topk(self.k, dim=1)
        kept = cols.gather(1, index)
        if self.list < q:
            # An entry off the list was scanned <= the list's last; if that can still reach
            # the k-th best rescored cosine, the row is redone from every entry that can.
            cut = self.err.lower(vals[:, -1])
            unsure = torch.nonzero(scanned[:, -1] >= cut).flatten()
            if unsure.numel():
                self.redone.append(unsure + start)
                lines, hit = _entries_at_least(block, unsure, cut[unsure])
                values = _dots(self.a, self.b, lines + start, hit)
                ids, best, members = _line_top(lines, hit, values, self.k)
                vals[ids], kept[ids] = best, members
        self.vals[start : start + count] = vals.cpu()
        self.cols[start : start + count] = kept.cpu()


class ColumnSearch:
    """Each column's k best rows of `a @ b.T`, from the blocks a RowSearch scans (no second
    product). Before the pass, each column gets a threshold from a sample of every
    SAMPLE_STEP-th row: its value of rank about THRESHOLD_MARGIN * spare * (sample / rows),
    so that some THRESHOLD_MARGIN * spare of the column's entries lie above it. A block's
    entry is looked at only when it beats its column's threshold (`last`). Such entries are
    added to the column's list, which has room for `spare / 2` more than `spare`; a column
    out of room keeps its `spare` best (and its last rises to the least of them). A column
    left with fewer than 2k entries is scanned again whole. `finish` rescores the lists in
    float32 once every block is done."""

    def __init__(self, rows: RowSearch, k: int, spare: int = 0):
        self.rows = rows
        p, q = rows.a.shape[0], rows.b.shape[0]
        device = rows.a.device
        self.k = min(k, p)
        self.list = min(p, LIST_FACTOR * k)
        self.spare = min(p, max(spare, self.list))
        room = self.spare + max(1, self.spare // 2)
        # -inf (and row 0) in the places not in use.
        self.scanned = torch.full((q, room), -torch.inf, device=device)
        self.members = torch.zeros((q, room), dtype=torch.int64, device=device)
        self.used = torch.zeros(q, dtype=torch.int64, device=device)
        self.last = self._thresholds()
        # Columns whose k best were redone from every entry that could reach them.
        self.redone = torch.empty(0, dtype=torch.int64)

    def _thresholds(self) -> torch.Tensor:
        """Each column's threshold from the sampled rows (-inf where the sample is too small
        to leave `spare` entries above one: every entry is then looked at)."""
        scan_a, scan_b = self.rows.scan_a, self.rows.scan_b
        sample = scan_a[::SAMPLE_STEP]
        rank = math.ceil(THRESHOLD_MARGIN * self.spare * sample.shape[0] / scan_a.shape[0])
        last = torch.full((scan_b.shape[0],), -torch.inf, dtype=scan_a.dtype, device=sample.device)
        if rank >= sample.shape[0]:
            return last
        for first in range(0, scan_b.shape[0], COLUMN_CHUNK):
            values = scan_b[first : first + COLUMN_CHUNK] @ sample.T
            last[first : first + values.shape[0]] = values.topk(rank, dim=1).values[:, -1]
        return last

    def block(self, start: int, block: torch.Tensor) -> None:
        for first in range(0, block.shape[1], COLUMN_CHUNK):
            part = block[:, first : first + COLUMN_CHUNK]
            col, row, value = _above(part, self.last[first : first + part.shape[1]])
            if col.numel():
                self._add(first + col, start + row, value)

    def _add(self, line: torch.Tensor, members: torch.Tensor, values: torch.Tensor) -> None:
        """Add entries (sorted by column `line`) to their columns' lists: into the free
        places where they fit, else the column keeps its `spare` best of both."""
        ids, _, sizes, slot, position = _line_slots(line)
        room = self.scanned.shape[1]
        used = self.used.index_select(0, ids)
        fits = used + sizes <= room
        # Each entry's place in the (q * room) storage of the lists, were its column to fit.
        flat = line * room + used.index_select(0, slot) + position
        if bool(fits.all()):
            self._put(flat, values, members)
            self.used.index_add_(0, ids, sizes)
            return
        entry_fits = fits.index_select(0, slot)
        taken = torch.nonzero(entry_fits).flatten()
        self._put(
            flat.index_select(0, taken),
            values.index_select(0, taken),
            members.index_select(0, taken),
        )
        fitting = torch.nonzero(fits).flatten()
        self.used.index_add_(0, ids.index_select(0, fitting), sizes.index_select(0, fitting))
        # Columns out of room: a table of their list and their new entries.
        out = torch.nonzero(~fits).flatten()
        full = ids.index_select(0, out)
        renumber = torch.cumsum(~fits, 0) - 1
        over = torch.nonzero(~entry_fits).flatten()
        width = room + int(sizes.index_select(0, out).max())
        table = torch.full((full.shape[0], width), -torch.inf, device=values.device)
        who = torch.zeros((full.shape[0], width), dtype=torch.int64, device=values.device)
        table[:, :room] = self.scanned.index_select(0, full)
        who[:, :room] = self.members.index_select(0, full)
        line_of = renumber.index_select(0, slot.index_select(0, over))
        at = line_of * width + room + position.index_select(0, over)
        table.view(-1).index_copy_(0, at, values.index_select(0, over))
        who.view(-1).index_copy_(0, at, members.index_select(0, over))
        self._keep_best(full, table, who)

    def _put(self, flat: torch.Tensor, values: torch.Tensor, members: torch.Tensor) -> None:
        """Write entries at places `flat` of the lists' (q * room) storage."""
        self.scanned.view(-1).index_copy_(0, flat, values)
        self.members.view(-1).index_copy_(0, flat, members)

    def _keep_best(self, columns: torch.Tensor, table: torch.Tensor, who: torch.Tensor):
        """Columns keep their `spare` best of `table` (members `who`)."""
        best, index = table.topk(self.spare, dim=1, sorted=False)
        lists = torch.full(
            (columns.shape[0], self.scanned.shape[1]), -torch.inf, device=best.device
        )
        lists[:, : self.spare] = best
        kept = torch.zeros(lists.shape, dtype=torch.int64, device=best.device)
        kept[:, : self.spare] = who.gather(1, index)
        self.scanned.index_copy_(0, columns, lists)
        self.members.index_copy_(0, columns, kept)
        self.used.index_fill_(0, columns, self.spare)
        self.last.index_copy_(0, columns, best.amin(dim=1).to(self.last.dtype))

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, Spare]:
        """Each column's k best rows and their float32 cosines, (q, k) each, descending, and
        the columns' spare lists (shorter than `spare` where fewer entries beat a column's
        threshold: -1 past their end)."""
        a, b, err = self.rows.a, self.rows.b, self.rows.err
        p, q = a.shape[0], b.shape[0]
        # Columns with fewer than 2k entries above their threshold are scanned again whole.
        short = torch.nonzero(self.used < self.list).flatten()
        for first in range(0, short.shape[0], SHORT_CHUNK):
            columns = short[first : first + SHORT_CHUNK]
            best, rows = _top(self.rows.scan_b[columns] @ self.rows.scan_a.T, self.spare)
            self._keep_best(columns, best, rows)
        scanned, order = self.scanned.topk(self.spare, dim=1)
        members = self.members.gather(1, order)
        members[torch.isinf(scanned)] = -1
        cutoff, list_cutoff = np.full(q, -np.inf), np.full(q, -np.inf)
        # An entry left out was scanned at or below its column's last (when it came, or when
        # the column last chose its best) or below the list's last.
        last = self.last.float()
        if self.spare < p:
            cutoff = err.greatest_cosine(torch.maximum(scanned[:, -1], last)).cpu().numpy()
        if self.list < p:
            left_out = torch.maximum(scanned[:, self.list - 1], last)
            list_cutoff = err.greatest_cosine(left_out).cpu().numpy()
        listed = members[:, : self.list]
        rescored = list_dots(b, a, listed)
        vals, index = rescored.topk(self.k, dim=1)
        kept = listed.gather(1, index)
        if self.list < p:
            # As for rows: a column whose list may miss one of its k best is redone from
            # every entry that can reach them, its entries scanned again.
            cut = err.lower(vals[:, -1])
            unsure = torch.nonzero(scanned[:, self.list - 1] >= cut).flatten()
            self.redone = unsure.cpu()
            for first in range(0, unsure.shape[0], REDO_CHUNK):
                columns = unsure[first : first + REDO_CHUNK]
                block = self.rows.scan_b[columns] @ self.rows.scan_a.T
                local = torch.arange(columns.shape[0], device=a.device)
                lines, hit = _entries_at_least(block, local, cut[columns])
                values = _dots(b, a, columns[lines], hit)
                ids, best, best_rows = _line_top(columns[lines], hit, values, self.k)
                vals[ids], kept[ids] = best, best_rows
        spare = Spare(members.cpu(), rescored.cpu(), list_cutoff, cutoff, err)
        return kept.cpu(), vals.cpu(), spare


def _above(block: torch.Tensor, last: torch.Tensor):
    """(column, row, value as float32) of the entries of `block` above their column's `last`,
    sorted by column, then row. Where rows split into GROUP-strided groups, the groups'
    maxima are compared first and only the groups above a column's last are looked into
    (unless many are). Thresholds >= +0 (all but the smallest problems') are compared as keys
    (`as_keys`): an entry's key beats its column's exactly when its value does."""
    count, width = block.shape
    values, bound = block, last
    last_keys = as_keys(last)
    if bool((last_keys >= 0).all()):
        values, bound = as_keys(block), last_keys
    # Entry (row, col) lies at row * stride + col of the block's flattened storage.
    stride = values.stride(0)
    flat = values.as_strided(((count - 1) * stride + width,), (1,))
    if count % GROUP == 0:
        groups = count // GROUP
        maxima = values.view(GROUP, groups, width).amax(dim=0)
        group, col = torch.nonzero(maxima > bound).T
        if group.numel() < DENSE_SHARE * maxima.numel():
            spread = torch.arange(GROUP, device=block.device) * (groups * stride)
            # (GROUP, hits): the members of each group, read a slab of rows at a time in
            # storage order (read group by group, column-sorted, nearly every read misses).
            place = spread[:, None] + (group * stride + col)
            value = flat.index_select(0, place.view(-1))
            above = value.view(place.shape) > bound.index_select(0, col)
            keep = torch.nonzero(above.view(-1)).flatten()
            # Stable: within a column, slab then group, which is row order.
            hit_col, order = _sort_columns(col.index_select(0, keep % group.numel()), width)
            keep = keep[order]
            slab, hit = keep // group.numel(), keep % group.numel()
            row = group.index_select(0, hit) + slab * groups
            found = value.index_select(0, keep)
            return hit_col, row, found.view(block.dtype).float()
    col, rows = torch.nonzero((values > bound).T.contiguous()).T
    return col, rows, flat.index_select(0, rows * stride + col).view(block.dtype).float()


def _sort_columns(col: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column numbers below `width`, stably sorted, and their order. Where they fit in 16
    bits, NumPy sorts them by radix: a few times torch's sort on a chunk's hits."""
    if col.device.type != "cpu" or width > np.iinfo(np.int16).max:
        return torch.sort(col, stable=True)
    order = torch.from_numpy(col.numpy().astype(np.int16).argsort(kind="stable"))
    return col.index_select(0, order), order


def as_keys(values: torch.Tensor) -> torch.Tensor:
    """Floats' bit patterns as signed integers of their width (a view, no copy), which
    torch's reductions, comparisons and gathers handle faster. Among values >= +0 the keys
    order as the values do; every negative value (and -0) has a negative key, below them
    all, but negatives' keys are in reverse order: a result read from keys is the values'
    only where the values that decide it are >= +0."""
    return values.view(KEY_DTYPES[values.element_size()])


def _top(values: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's `count` best scanned `values`, in no order, as float32, and their places;
    compared as keys where every one picked is >= +0, by value elsewhere."""
    best, index = as_keys(values).topk(count, dim=1, sorted=False)
    if bool((best >= 0).all()):
        return best.view(values.dtype).float(), index
    best, index = values.topk(count, dim=1, sorted=False)
    return best.float(), index


def _best_members(values: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Columns holding each row's `size` best entries of `values` (rows x size * GROUP, with
    others), and the coarsest level's best group maxima (rows x size) they came from; None
    where the rows do not split into `size` groups. From the coarsest level of group
    maxima down, only the best `size` groups' members are looked at: the best `size` groups
    of a level hold the best `size` members of the level below."""
    count = values.shape[0]
    # maxima[l + 1][:, g] is the maximum of maxima[l][:, g + i * width] for i < GROUP.
    maxima = [values]
    while len(maxima) <= LEVELS and _groups_fit(maxima[-1].shape[1], size):
        below = maxima[-1]
        maxima.append(below.view(count, GROUP, below.shape[1] // GROUP).amax(dim=1))
    members: torch.Tensor | None = None
    coarsest: torch.Tensor | None = None
    for level in range(len(maxima) - 1, 0, -1):
        above = maxima[level]
        level_values = above if members is None else above.gather(1, members)
        top, best = level_values.topk(size, dim=1, sorted=False)
        if members is None:
            coarsest = top
        groups = best if members is None else members.gather(1, best)
        spread = torch.arange(GROUP, device=values.device) * above.shape[1]
        members = (groups[:, :, None] + spread).reshape(count, -1)
    if members is None or coarsest is None:
        return None
    return members, coarsest


def _groups_fit(width: int, size: int) -> bool:
    """Whether `width` entries split into GROUP-strided groups, at least `size` of them."""
    return width % GROUP == 0 and width // GROUP >= size


def _entries_at_least(
    block: torch.Tensor, rows: torch.Tensor, cut: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the entries of the given block rows at or above each row's cut, in
    row order, a few rows at a time (a float copy of many whole rows would be large)."""
    found_rows, found_cols = [], []
    for start in range(0, rows.shape[0], REDO_CHUNK):
        part = rows[start : start + REDO_CHUNK]
        lines = block.index_select(0, part).float()
        hit_row, hit_col = torch.nonzero(lines >= cut[start : start + REDO_CHUNK, None]).T
        found_rows.append(part[hit_row])
        found_cols.append(hit_col)
    return torch.cat(found_rows), torch.cat(found_cols)


def scanned_lists(
    a: torch.Tensor,
    b: torch.Tensor,
    size: int,
    block_rows: int | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    err: ScanError | None = None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Each row's `size` best entries by scanned value, rescored in float32: columns and
    cosines (p, size), and per row a bound on the cosine of every entry left out (-inf when
    none is). Cheaper than the exact top `size`, and as good a list to widen a row with.
    `err`: an earlier scan's error bound for the same matrices and dtype, if any."""
    device = device or scan_device()
    block_rows = block_rows or scan_block_rows(b.shape[0], device)
    search = RowSearch(a, b, size, device, dtype or scan_dtype(device), err=err)
    p, q = a.shape[0], b.shape[0]
    search.list = min(q, size)
    cols = torch.empty((p, search.list), dtype=torch.int64)
    values = torch.empty((p, search.list))
    cutoff = np.full(p, -np.inf)
    rows_per_block = max(1, min(block_rows, LIST_ENTRIES // search.list))
    for start, block in cosine_blocks(search.scan_a, search.scan_b, rows_per_block):
        scanned, found = search.scanned_list(block, search.list)
        count = block.shape[0]
        values[start : start + count] = list_dots(
            search.a[start : start + count], search.b, found
        ).cpu()
        cols[start : start + count] = found.cpu()
        if search.list < q:
            cutoff[start : start + count] = search.err.greatest_cosine(scanned[:, -1]).cpu()
    return cols, values, cutoff


def top_candidates(
    a: torch.Tensor,
    b: torch.Tensor,
    k: int,
    block_rows: int | None = None,
    progress: Progress | None = None,
    stage: str = "candidates",
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    spare: int = 0,
) -> Candidates:
    """Each row's and each column's k best partners by float32 cosine, and their `spare`
    best by scanned value, from one pass over `a @ b.T`. `device` and the scan's `dtype`
    default to the GPU if any and `scan_dtype`, `block_rows` to `scan_block_rows`; the
    answer is the same for any."""
    device = device or scan_device()
    rows = RowSearch(a, b, k, device, dtype or scan_dtype(device), spare)
    columns = ColumnSearch(rows, k, spare)
    block_rows = block_rows or scan_block_rows(b.shape[0], device)
    for start, block in cosine_blocks(rows.scan_a, rows.scan_b, block_rows):
        rows.block(start, block)
        columns.block(start, block)
        report(progress, stage, start + block.shape[0], a.shape[0])
    col_rows, col_vals, col_spare = columns.finish()
    return Candidates(
        rows.cols,
        rows.vals,
        col_rows.T.contiguous(),
        col_vals.T.contiguous(),
        Spare(
            rows.spare_members,
            rows.spare_rescored,
            rows.rescored_cutoff,
            rows.spare_cutoff,
            rows.err,
        ),
        col_spare,
        (
            torch.cat(rows.redone).cpu().numpy() if rows.redone else np.empty(0, np.int64),
            columns.redone.numpy(),
        ),
    )
