"""Prepared rows -> the pre-tokenized parquet verl's PSFT trainer reads.

The prepare stage tokenizes each demonstration once (chat template, EOS, truncation); both
engines must train on exactly those ids. verl gets them as two list columns, `input_ids`
and `loss_mask` (1 on response tokens), read by `psft_trainer.PreTokenizedDataset`.
"""

from __future__ import annotations

from pathlib import Path

from psft.workflows.errors import UserError


def _loss_mask(row: dict) -> list[int]:
    n = len(row["input_ids"])
    if row.get("loss_mask") is not None:
        return [int(x) for x in row["loss_mask"]]
    if row.get("labels") is not None:
        return [0 if int(x) < 0 else 1 for x in row["labels"]]
    for key in ("prompt_length", "prompt_len", "prompt_tokens"):
        if row.get(key) is not None:
            p = int(row[key])
            return [0] * p + [1] * (n - p)
    raise KeyError("loss_mask")


def verl_rows(prepared: Path, out: Path) -> Path | None:
    """Write `out` from the prepared parquet; None when it holds no rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(prepared)
    if table.num_rows == 0:
        return None
    if "input_ids" not in table.column_names:
        raise UserError(f"{prepared}: no input_ids column; run the prepare stage again")
    ids, masks = [], []
    for i, row in enumerate(table.to_pylist()):
        try:
            mask = _loss_mask(row)
        except KeyError:
            raise UserError(
                f"{prepared}: row {i} has no loss_mask, labels or prompt length; "
                "run the prepare stage again"
            ) from None
        if len(mask) != len(row["input_ids"]):
            raise UserError(f"{prepared}: row {i}: loss mask and input_ids differ in length")
        ids.append([int(x) for x in row["input_ids"]])
        masks.append(mask)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"input_ids": ids, "loss_mask": masks}), out)
    return out
