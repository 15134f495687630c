#!/usr/bin/env python3
"""Malformed ScienceQA parquet files for gemmaclip's data tests (tests/fixtures/bad_data/):
  missing_column/train.parquet  the layout without its `choices` column
  bad_rows/train.parquet        six rows: two good, then corrupt image bytes, an answer index out of
                                range, empty choices, a single choice

  python3 tools/assets/make_bad_data.py
"""
import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

OUT = "tests/fixtures/bad_data"
FIELDS = [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("question", pa.string()),
          ("choices", pa.list_(pa.string())), ("answer", pa.int8()), ("hint", pa.string()), ("task", pa.string()),
          ("grade", pa.string()), ("subject", pa.string()), ("topic", pa.string()), ("category", pa.string()),
          ("skill", pa.string()), ("lecture", pa.string()), ("solution", pa.string())]


def png():
    b = io.BytesIO()
    Image.new("RGBA", (7, 3), (255, 0, 0, 128)).save(b, format="PNG")
    return b.getvalue()


def row(**kw):
    r = dict(image=None, question="Which is a color?", choices=["red", "seven"], answer=0, hint="", task="closed choice",
             grade="grade1", subject="language science", topic="vocabulary", category="Words", skill="Identify",
             lecture="Red is a color.", solution="Red names a color.")
    r.update(kw)
    return r


def main():
    for d in ["missing_column", "bad_rows"]:
        os.makedirs(os.path.join(OUT, d), exist_ok=True)
    rows = [row(), row(image={"bytes": png(), "path": None}),
            row(image={"bytes": b"\x89PNG\r\n\x1a\nnot really a png", "path": None}),
            row(answer=5), row(choices=[], answer=0), row(choices=["only"], answer=0)]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(FIELDS)), os.path.join(OUT, "bad_rows/train.parquet"))
    fields = [f for f in FIELDS if f[0] != "choices"]
    rows = [{k: v for k, v in row().items() if k != "choices"}]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), os.path.join(OUT, "missing_column/train.parquet"))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
