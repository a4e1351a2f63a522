"""tqdm progress bars (tqdm is imported only when a bar is shown); a silent bar when not wanted."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int | None, enabled: bool, desc: str, unit: str = "ex") -> Any:
    """A tqdm bar counting `unit`s towards `total` (None: unknown); a no-op bar when not enabled.
    Needs tqdm only when enabled."""
    if not enabled:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, dynamic_ncols=True)


class _Silent:
    """The bar's interface, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass
