"""What a file's first bytes say it is, so that a refusal can name the likely mistake.

The format is chosen by the file's suffix, and a safetensors file saved as
`.ckpt` (or the reverse) fails on its first bytes. "first byte 0x00,
expected 0x0a" is true but unhelpful; "looks like a safetensors file" says
what to do.
"""
from __future__ import annotations

import struct
from typing import Optional

#: First four bytes (little-endian) of `.ckpt` files saved with enc_key.
ENCRYPTION_MAGICS = {0x7F3A5ED8: "AES-GCM", 0x7F3A5ED9: "AES-CBC", 0x7F3A5EDA: "SM4-CBC"}
#: Bytes to read for `kind`.
HEAD_SIZE = 16


def kind(head: bytes, size: int) -> Optional[str]:
    """'safetensors', 'ckpt' or 'encrypted ckpt' if the first bytes look like one, else None.

    safetensors: a u64 header length that fits the file, then '{'. `.ckpt`: a
    Checkpoint.value record (0x0a, a length) whose first field is a tag (0x0a).
    """
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if len(head) >= 4 and int.from_bytes(head[:4], "little") in ENCRYPTION_MAGICS:
        return "encrypted ckpt"
    if head[:1] == b"\x0a":
        pos = 1
        while pos < len(head) and head[pos] & 0x80:  # the record's length varint
            pos += 1
        if head[pos + 1:pos + 2] == b"\x0a":
            return "ckpt"
    return None


def hint(head: bytes, size: int, expected: str) -> str:
    """': it looks like ...' when the bytes look like another format than `expected`, else ''."""
    found = kind(head, size)
    if found is None or found == expected:
        return ""
    if found == "safetensors":
        return ": it looks like a safetensors file (name it .safetensors)"
    if found == "ckpt":
        return ": it looks like a MindSpore .ckpt checkpoint (name it .ckpt)"
    return ": it looks like an encrypted MindSpore .ckpt checkpoint"
