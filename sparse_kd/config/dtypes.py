"""Embedding dtypes a config may name: one per table (``int4``) or precision tiers
(``"int8:0.05,int4:0.25,int2"``: the hottest 5% of stored rows in int8, the next 25% in int4, the
rest in int2; :mod:`sparse_kd.compress.tiers` stores and serves them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sparse_kd.config.base import QUANT_DTYPES

@dataclass(frozen=True)
class Tier:
    """One tier: its dtype and its share of the stored rows (None: the rest, the last tier)."""

    dtype: str
    share: Optional[float]


def is_tiered(dtype: str) -> bool:
    return "," in dtype or ":" in dtype


def parse_tiers(spec: str, where: str = "dtype") -> list[Tier]:
    """``"int8:0.05,int4:0.25,int2"`` -> tiers; ValueError naming ``where`` and how to fix it."""
    fix = (f"Fix: write {where} as comma-separated 'dtype:share' parts, hottest first, the last one without a "
           "share (it takes the rest), e.g. 'int8:0.05,int4:0.25,int2'; dtypes: " + ", ".join(QUANT_DTYPES))
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) < 2:
        raise ValueError(f"{where}: {spec!r} has one tier; a tiered dtype needs at least two. {fix}")
    out: list[Tier] = []
    for i, p in enumerate(parts):
        name, _, share = p.partition(":")
        if name not in QUANT_DTYPES:
            raise ValueError(f"{where}: tier {i + 1} of {spec!r} has dtype {name!r}. {fix}")
        if i == len(parts) - 1:
            if share:
                raise ValueError(f"{where}: the last tier of {spec!r} takes the rest of the rows and has no share. {fix}")
            out.append(Tier(name, None))
            continue
        try:
            s = float(share)
        except ValueError:
            raise ValueError(f"{where}: tier {i + 1} of {spec!r} needs a share in (0, 1), got {share!r}. {fix}") from None
        if not 0.0 < s < 1.0:
            raise ValueError(f"{where}: tier {i + 1} of {spec!r} needs a share in (0, 1), got {s:g}. {fix}")
        out.append(Tier(name, s))
    if sum(t.share or 0.0 for t in out) >= 1.0:
        raise ValueError(f"{where}: the shares of {spec!r} add up to 1 or more; the last tier would be empty. {fix}")
    return out


def dtype_problem(dtype: str, where: str) -> Optional[str]:
    """Why ``dtype`` is not a valid plain or tiered dtype (None: it is)."""
    if is_tiered(dtype):
        try:
            parse_tiers(dtype, where)
        except ValueError as e:
            return str(e).split(": ", 1)[1]
        return None
    if dtype not in QUANT_DTYPES:
        return (f"{dtype!r} is not valid; expected one of {', '.join(QUANT_DTYPES)}, or precision tiers such as "
                "'int8:0.05,int4:0.25,int2'")
    return None
