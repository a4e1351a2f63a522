"""Converting written blocks (NumPy / torch / JAX, float32 / float16 / bfloat16) to a store dtype."""

from __future__ import annotations

import threading
import warnings
from typing import Any

import numpy as np

from .._arrays import as_matrix, is_torch_tensor
from .._caller import user_stacklevel


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 array with the values of bfloat16 numbers given as uint16 bits (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """uint16 bits of the bfloat16 nearest to each float32 (ties to even; NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bits = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = ((u[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)  # keep it a quiet NaN
    return bits


class BeyondRangeError(ValueError):
    """to_store_dtype's error: finite values that would become infinite in the store dtype. row: the
    first row of the block holding one; source / dtype: the block's and the store's dtypes; limit: the
    largest magnitude the store dtype holds. Exporters re-raise it in their own words (sinks)."""

    def __init__(self, message: str, row: int, source: str, dtype: str, limit: float):
        super().__init__(message)
        self.row, self.source, self.dtype, self.limit = row, source, dtype, limit

    def __reduce__(self) -> tuple:  # picklable (a worker process's error reaches its parent)
        return type(self), (str(self), self.row, self.source, self.dtype, self.limit)


class NonFiniteError(ValueError):
    """to_store_dtype's error (refuse_nonfinite=True): the block holds NaN or Inf. rows: the first
    (up to SHOWN_ROWS) rows holding one, counted from first_row; count: how many rows hold one; name
    / where: the block's words. Store writers and exporters re-raise it in their own words."""

    def __init__(self, message: str, rows: list[int], count: int, name: str, where: str):
        super().__init__(message)
        self.rows, self.count, self.name, self.where = rows, count, name, where

    def __reduce__(self) -> tuple:  # picklable (a worker process's error reaches its parent)
        return type(self), (str(self), self.rows, self.count, self.name, self.where)


SHOWN_ROWS = 5  # rows named in a NonFiniteError


def rows_text(rows: list[int], count: int) -> str:
    """'row 7' / 'rows 7, 9' / 'rows 7, 9, ... (12 rows in all)'."""
    named = ", ".join(str(r) for r in rows)
    if count == 1:
        return f"row {named}"
    return f"rows {named}" + (f", ... ({count} rows in all)" if count > len(rows) else "")


def _nonfinite(view: np.ndarray, source: str, name: str, first_row: int, where: str) -> NonFiniteError | None:
    """The NonFiniteError for `view` (rows, d) in `source` dtype (bfloat16 as uint16 bits), or None
    when every value is finite: one pass over the block, a second only to find the rows of a bad one."""
    if source == "bfloat16":  # by the exponent bits (all ones: Inf or NaN)
        bad = (view & np.uint16(0x7F80)) == np.uint16(0x7F80)
    elif source == "float16":  # the same: ~4x faster than NumPy's isfinite on float16
        bad = (view.view(np.uint16) & np.uint16(0x7C00)) == np.uint16(0x7C00)
    else:
        bad = ~np.isfinite(view)
    if not bad.any():
        return None
    found = np.flatnonzero(bad.any(axis=1))
    rows = [first_row + int(r) for r in found[:SHOWN_ROWS]]
    return NonFiniteError(
        f"{name} holds NaN or Inf values in {rows_text(rows, len(found))}{where}",
        rows,
        len(found),
        name,
        where,
    )


# per store dtype: the dtypes that hold the finite values beyond its range; LIMITS: the largest
# magnitude it holds; OVERFLOWS: the smallest that rounds beyond it (to inf: the midpoint between LIMITS
# and the next power of two, a tie rounding up to even), so LIMITS < |x| < OVERFLOWS rounds to LIMITS
WIDER = {"float16": ("float32", "bfloat16"), "bfloat16": ("float32",)}
LIMITS = {"float16": float(np.finfo(np.float16).max), "bfloat16": 3.3895314e38}
OVERFLOWS = {"float16": 65520.0, "bfloat16": float(np.array(0x7F7F8000, np.uint32).view(np.float32))}

# float16's smallest normal magnitude (2**-14 ~ 6.1e-5); below it float16 keeps fewer than its 11
# significant bits (subnormals), and |x| <= 2**-25 becomes 0. As float16 bits (sign cleared):
FLOAT16_TINY = 2.0**-14
_TINY_BITS = np.uint16(0x0400)


def beyond_range_text(name: str, source: str, dtype: str, row: int, where: str) -> str:
    """'block holds float32 values beyond the float16 range (|x| >= 65520 rounds beyond 65504), first
    in row 7 of checkpoint 0' (row: counted as the caller counts rows)."""
    return (
        f"{name} holds {source} values beyond the {dtype} range (|x| >= {OVERFLOWS[dtype]:.8g} rounds beyond "
        f"{LIMITS[dtype]:.8g}), first in row {row}{where}"
    )


class LowPrecisionWarning(RuntimeWarning):
    """float16 left rows with little or no precision (LowPrecisionRows): a RuntimeWarning of its own kind,
    to filter on its own (warnings.filterwarnings(..., category=LowPrecisionWarning))."""


class LowPrecisionRows:
    """Warns (a LowPrecisionWarning), once, when float16 conversions leave rows with little or no precision:
    rows, not all zero, whose largest |x| is below float16's smallest normal number (FLOAT16_TINY), which
    float16 holds as subnormals (fewer significant bits, the smaller the fewer) or as 0. A few tiny values
    in a row do no harm (its large ones dominate its scores); a row of only tiny ones loses its scores.

    A store writer or an export holds one and passes it to every to_store_dtype call (low=), so the
    warning comes once per writer or export, not once per block; it names the rows of the first block
    holding such rows, and later blocks are not checked. what: whose rows (e.g. "gradient store PATH");
    advice: the sentence saying what to use instead (e.g. dtype="bfloat16", nearly float32's range in 16 bits).
    Threads may share one (a writer's): the decision to warn is taken under a lock, so it warns once."""

    def __init__(self, what: str = "", advice: str = "store them as bfloat16 (nearly float32's range) or float32"):
        self.what, self.advice = what, advice
        self.warned = False
        self._lock = threading.Lock()  # around testing and setting `warned` (the scan runs outside it)

    def check(
        self,
        out: np.ndarray,
        as_f32: np.ndarray,
        name: str,
        first_row: int,
        where: str,
        rows_max: np.ndarray | None = None,
    ) -> None:
        """Warns about the rows of `out` (float16, converted from the float32 `as_f32`) left below
        float16's normal range, unless warned before. rows_max: each row's largest magnitude bits of
        `out` (bits & 0x7FFF) when the caller has them, else one pass over out's bits finds them; then
        the source rows of the rows found only are read."""
        if self.warned or out.size == 0:
            return
        if rows_max is None:  # magnitude bits are ordered like |x| (NaN and Inf: at the top)
            rows_max = (out.view(np.uint16) & np.uint16(0x7FFF)).max(axis=1)
        found = np.flatnonzero(rows_max < _TINY_BITS)
        if found.size == 0:
            return
        largest = np.abs(as_f32[found]).max(axis=1)  # > 0: the row had a value float16 made tiny or 0
        lost = largest > 0
        if not lost.any():  # rows of zeros only: nothing lost
            return
        count, zero = int(lost.sum()), int((rows_max[found[lost]] == 0).sum())
        with self._lock:  # another thread may have scanned its block at the same time: one of them warns
            if self.warned:
                return
            self.warned = True  # before warning: warnings turned into errors still warn once
        rows = out.shape[0]
        span = f"row {first_row}" if rows == 1 else f"rows {first_row} to {first_row + rows - 1}"
        one = count == 1
        head = f"{count} of the {rows} rows" if rows > 1 else "the row"
        zeros = (
            "; it became all zero (it scores 0)"
            if one
            else f"; {zero} of them became all zero ({'it scores' if zero == 1 else 'they score'} 0)"
        )
        warnings.warn(
            f"{self.what + ': ' if self.what else ''}{head} of {name} ({span}{where}) {'holds' if one else 'hold'} "
            f"only values below float16's smallest normal number, {FLOAT16_TINY:.2g}, in magnitude (the largest: "
            f"{float(largest[lost].max()):.3g}), which float16 keeps with fewer significant bits (subnormals) or as 0, "
            f"so {'its' if one else 'their'} scores lose precision{zeros if zero else ''}; {self.advice}",
            LowPrecisionWarning,
            stacklevel=user_stacklevel(),
        )


def to_store_dtype(
    x: Any,
    dtype: str,
    name: str,
    first_row: int = 0,
    where: str = "",
    refuse_nonfinite: bool = False,
    low: LowPrecisionRows | None = None,
) -> np.ndarray:
    """C-contiguous (rows, d) array of `x` in the store dtype (bfloat16 as uint16 bits).

    x: 2-D NumPy / torch (any device) / JAX array in float32, float16 or bfloat16. No copy when
    `x` is already a contiguous array of that dtype. Finite values that would become infinite in
    the store dtype are a BeyondRangeError (a ValueError; rather than silently stored as inf) naming
    `name`, the first row holding one (counted from `first_row`, described by `where`: " of checkpoint
    0", say) and the dtypes that would hold it. refuse_nonfinite: NaN or Inf in `x` is a
    NonFiniteError naming the first such rows the same way (store writers; else they are kept).
    Converting to float16, rows left with only values below float16's normal range (precision lost,
    or all zero) are a RuntimeWarning (LowPrecisionRows): once per `low`, which a writer or an export
    passes to each call; without it (None), once per call.
    """
    torch_rows = is_torch_tensor(x)
    if torch_rows and x.device.type != "cpu":
        if x.device.type == "meta":  # .cpu() would raise torch's NotImplementedError, naming nothing
            raise ValueError(f"{name} is a torch tensor on the meta device, which holds shapes but no values")
        x = x.detach().cpu()
    view, source = as_matrix(x, name)
    if refuse_nonfinite and (err := _nonfinite(view, source, name, first_row, where)) is not None:
        raise err
    if source == dtype:
        return np.ascontiguousarray(view)
    as_f32 = bfloat16_bits_to_float32(view) if source == "bfloat16" else view.astype(np.float32, copy=False)
    # torch's float32 rows: torch's multi-threaded CPU cast (2-3x NumPy's); NumPy's cast for the rest
    fast = torch_rows and source == "float32" and dtype != "float32"
    out = _torch_cast(as_f32, dtype) if fast else _numpy_cast(as_f32, dtype)
    if dtype != "float32":
        # only rows whose largest magnitude bits reach the all-ones exponent (Inf or NaN) can hold a value made
        # infinite: those rows alone are judged (full-size boolean temporaries cost as much as the cast, r251)
        bits = out.view(np.uint16)
        exponent = np.uint16(0x7F80 if dtype == "bfloat16" else 0x7C00)
        top = (bits & np.uint16(0x7FFF)).max(axis=1) if bits.shape[1] else np.zeros(bits.shape[0], np.uint16)
        suspect = np.flatnonzero(top >= exponent)
        if fast and suspect.size:  # NaN bits: NumPy's (torch's differ), so these rows are cast again by NumPy
            out[suspect] = _numpy_cast(as_f32[suspect], dtype)
            top[suspect] = (bits[suspect] & np.uint16(0x7FFF)).max(axis=1)
        bad = (bits[suspect] & exponent) == exponent
        beyond = (bad if refuse_nonfinite else bad & np.isfinite(as_f32[suspect])).any(axis=1)
        if beyond.any():
            row = int(suspect[np.argmax(beyond)])
            wider = " or ".join(WIDER[dtype])
            raise BeyondRangeError(
                f"{beyond_range_text(name, source, dtype, first_row + row, where)}; store them as {wider}",
                row,
                source,
                dtype,
                LIMITS[dtype],
            )
    if dtype == "float16":
        (low if low is not None else LowPrecisionRows()).check(out, as_f32, name, first_row, where, top)
    return out


def _numpy_cast(as_f32: np.ndarray, dtype: str) -> np.ndarray:
    """C-contiguous float32 rows in `dtype` (bfloat16 as uint16 bits), by NumPy; overflow becomes Inf."""
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(as_f32)
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(as_f32.astype(dtype))


def _torch_cast(as_f32: np.ndarray, dtype: str) -> np.ndarray:
    """_numpy_cast by torch on the CPU (multi-threaded; torch is imported: the rows came as a tensor).
    Both round to nearest even: the same bits wherever the result is finite (all 2**32 float32 checked, torch 2.13);
    a NaN's bits differ (torch's canonical NaN), so the caller casts rows holding NaN or Inf again by NumPy."""
    import torch

    cast = torch.from_numpy(as_f32).to(torch.float16 if dtype == "float16" else torch.bfloat16)
    out = cast.numpy() if dtype == "float16" else cast.view(torch.int16).numpy().view(np.uint16)
    return np.ascontiguousarray(out)
