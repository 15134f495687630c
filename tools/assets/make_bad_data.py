#!/usr/bin/env python3
"""Malformed ScienceQA parquet files and images for gemmaclip's data tests (tests/data.rs):

  bad_data/missing_column/train.parquet  the layout without its `choices` column
  bad_data/bad_rows/train.parquet        fifteen rows, in this order:
      0 good, text only              1 good, RGBA 7x3 PNG bytes       2 corrupt image bytes
      3 answer index out of range    4 empty choices                  5 a single choice
      6 truncated PNG (valid header, cut data)                        7 the 100000x1 PNG below
      8 no bytes, path images/red.png (exists, relative to the parquet file's directory)
      9 no bytes, path images/missing.png (does not exist)
     10 a null choice                11 27 choices (letters run out)  12 `<image_soft_token>` in the question
     13 good, image struct with neither bytes nor path (text only)
     14 answer null
  bad_data/bad_rows/images/red.png       the file row 8 points to
  bad_data/images/wide_100000x1.png      ~370 bytes that decode to 100000x1 (padding it to a square
                                         would take 30 GB)
  bad_data/images/claims_10000x10000.png  a PNG header claiming 10000x10000 with one short IDAT
                                         chunk (a decoder reads up to it for the header): must be
                                         refused from the header, before decoding
  bad_data/images/truncated.png          the image of row 6
  codecs/train-<codec>.parquet           the same three good rows written uncompressed and with every
                                         codec pyarrow writes (snappy, zstd, gzip, lz4, brotli)

Made with pyarrow 26.0.1, Pillow 13.0.0:

  python3 tools/assets/make_bad_data.py
"""
import io
import os
import struct
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

OUT = "tests/fixtures"
FIELDS = [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("question", pa.string()),
          ("choices", pa.list_(pa.string())), ("answer", pa.int8()), ("hint", pa.string()), ("task", pa.string()),
          ("grade", pa.string()), ("subject", pa.string()), ("topic", pa.string()), ("category", pa.string()),
          ("skill", pa.string()), ("lecture", pa.string()), ("solution", pa.string())]
CODECS = ["none", "snappy", "zstd", "gzip", "lz4", "brotli"]


def png(img, **kw):
    b = io.BytesIO()
    img.save(b, format="PNG", **kw)
    return b.getvalue()


def rgba():
    return png(Image.new("RGBA", (7, 3), (255, 0, 0, 128)))


def truncated():
    # Half of the file: the 33-byte signature and header stay whole, the cut lands inside IDAT.
    whole = png(Image.frombytes("RGB", (32, 32), bytes((i * 7919) % 251 for i in range(32 * 32 * 3))))
    return whole[:len(whole) // 2]


def wide():
    return png(Image.new("RGB", (100000, 1)), optimize=True)


def claims(w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(bytes(1 + 3 * w))  # the first scanline only
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def row(**kw):
    r = dict(image=None, question="Which is a color?", choices=["red", "seven"], answer=0, hint="", task="closed choice",
             grade="grade1", subject="language science", topic="vocabulary", category="Words", skill="Identify",
             lecture="Red is a color.", solution="Red names a color.")
    r.update(kw)
    return r


def image(b=None, path=None):
    return {"bytes": b, "path": path}


def write(rows, path, fields=FIELDS, compression="none"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path, compression=compression)


def main():
    images = os.path.join(OUT, "bad_data/images")
    os.makedirs(images, exist_ok=True)
    os.makedirs(os.path.join(OUT, "bad_data/bad_rows/images"), exist_ok=True)
    files = {os.path.join(images, "wide_100000x1.png"): wide(),
             os.path.join(images, "claims_10000x10000.png"): claims(10000, 10000),
             os.path.join(images, "truncated.png"): truncated(),
             os.path.join(OUT, "bad_data/bad_rows/images/red.png"): png(Image.new("RGB", (5, 4), (200, 10, 10)))}
    for path, data in files.items():
        with open(path, "wb") as f:
            f.write(data)

    rows = [row(), row(image=image(rgba())),
            row(image=image(b"\x89PNG\r\n\x1a\nnot really a png")),
            row(answer=5), row(choices=[], answer=0), row(choices=["only"], answer=0),
            row(image=image(truncated())), row(image=image(wide(), "wide.png")),
            row(image=image(path="images/red.png")), row(image=image(path="images/missing.png")),
            row(choices=["red", None, "seven"]), row(choices=[f"c{i}" for i in range(27)]),
            row(question="Which is <image_soft_token> a color?"),
            row(image=image()), row(answer=None)]
    write(rows, os.path.join(OUT, "bad_data/bad_rows/train.parquet"))

    fields = [f for f in FIELDS if f[0] != "choices"]
    write([{k: v for k, v in row().items() if k != "choices"}], os.path.join(OUT, "bad_data/missing_column/train.parquet"),
          fields)

    good = [row(), row(image=image(rgba()), hint="A hint.", answer=1, choices=["blue", "green", "seven"]),
            row(question="Which word is a number?", choices=["red", "seven"], answer=1, subject="natural science",
                grade="grade7", lecture="Numbers count things. " * 20, solution="Seven is a number.")]
    for codec in CODECS:
        write(good, os.path.join(OUT, f"codecs/train-{codec}.parquet"), compression=codec)
    print("wrote", OUT + "/bad_data and", OUT + "/codecs")


if __name__ == "__main__":
    main()
