"""Prepared rows -> the pre-tokenized parquet verl's PSFT trainer reads.

The prepare stage tokenizes each demonstration once (chat template, EOS, truncation) into
`input_ids` and `response_start` (psft.trainer.data); both engines must train on exactly
those ids. verl gets them as two list columns, `input_ids` and `loss_mask` (1 on response
tokens), read by `psft_trainer.PreTokenizedDataset`.
"""

from __future__ import annotations

from pathlib import Path

from psft.workflows.errors import UserError

COLUMNS = ("input_ids", "response_start")


def verl_rows(prepared: Path, out: Path) -> Path | None:
    """Write `out` from the prepared parquet; None when it holds no rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = pq.read_schema(prepared).names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise UserError(
            f"{prepared}: no {', '.join(missing)} column(s); it was not written by this "
            "version's prepare stage: run `psft run --fresh` or the prepare stage again"
        )
    table = pq.read_table(prepared, columns=list(COLUMNS))
    if table.num_rows == 0:
        return None
    ids = table.column("input_ids").to_pylist()
    starts = table.column("response_start").to_pylist()
    masks = []
    for i, (row, start) in enumerate(zip(ids, starts, strict=True)):
        if not 0 < start < len(row):
            raise UserError(
                f"{prepared}: row {i}: response_start {start} outside 1..{len(row) - 1}; "
                "run the prepare stage again"
            )
        masks.append([0] * start + [1] * (len(row) - start))
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"input_ids": ids, "loss_mask": masks}), out)
    return out
