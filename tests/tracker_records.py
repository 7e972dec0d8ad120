"""Reading back what a run sent to its trackers (wandb's offline run files), for the tests."""

from __future__ import annotations

import struct
from pathlib import Path


def wandb_records(run_dir: Path) -> list:
    """Every record of the wandb offline runs under ``run_dir/wandb`` (its log format: 7-byte file header, 32 KiB
    blocks of records, each with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0 and length == 0:
                break
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):
                rec = pb.Record()
                rec.ParseFromString(buf + chunk)
                records.append(rec)
                buf = b""
            else:
                buf = buf + chunk if kind == 3 else chunk
    return records
