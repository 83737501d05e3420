"""Print modeldata's small_fine_foods reviews (training_data, then testing_data) as JSON lines {"review", "score"}.

    PYTHONPATH=RDATA_LIB python scripts/read_fine_foods.py .../modeldata/data/Rdata > fine_foods.jsonl

The data sits in R's lazy-load database (Rdata.rdx index, Rdata.rdb chunks); `rdata` (pip, no R needed) parses the
serialized objects. scripts/fetch_eval_assets.sh installs rdata into a scratch folder for this one step.
"""

import bz2
import gzip
import json
import lzma
import sys
import warnings
import zlib

import rdata


def unpack(chunk: bytes) -> bytes:
    """One lazy-load chunk: a 4-byte length, then zlib data, or a type byte (Z = xz, 2 = bzip2, 1 = zlib, 0 = raw)."""
    body = chunk[4:]
    try:
        return zlib.decompress(body)
    except zlib.error:
        kind, payload = body[:1], body[1:]
        if kind == b"Z":
            return lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
        return {b"2": bz2.decompress, b"1": zlib.decompress, b"0": lambda x: x}[kind](payload)


def parse(raw: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS" for every chunk
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def main(prefix: str) -> None:
    with open(prefix + ".rdx", "rb") as f:
        index = parse(gzip.decompress(f.read()))["variables"]
    with open(prefix + ".rdb", "rb") as f:
        blob = f.read()
    for name in ("training_data", "testing_data"):
        offset, length = (int(x) for x in index[name])
        frame = parse(unpack(blob[offset:offset + length]))
        for review, score in zip(frame["review"], frame["score"], strict=True):
            print(json.dumps({"review": str(review), "score": str(score)}))


if __name__ == "__main__":
    main(sys.argv[1])
