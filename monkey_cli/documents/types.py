"""Document types, sniffed from a file's first bytes (never from its name)."""

from __future__ import annotations

import codecs
import re

# Kind (as on `Page.kind`) -> the Pillow formats allowed to open it. Opening with exactly the sniffed
# plugin means a crafted file can never reach one of Pillow's rarer, less hardened decoders.
PILLOW_FORMATS: dict[str, tuple[str, ...]] = {
    "png": ("PNG",),
    "jpeg": ("JPEG", "MPO"),
    "tiff": ("TIFF",),
    "webp": ("WEBP",),
    "bmp": ("BMP",),
    "gif": ("GIF",),
    "jpeg2000": ("JPEG2000",),
    "avif": ("AVIF",),
    "pnm": ("PPM",),
}
# Pillow features an optional codec needs (a build without them reports the type as unsupported).
PILLOW_FEATURES = {"webp": "webp", "jpeg2000": "jpg_2000", "avif": "avif"}
SUPPORTED_TYPES: tuple[str, ...] = ("pdf", *PILLOW_FORMATS)
_TYPE_LABELS = {"pdf": "PDF", "jpeg2000": "JPEG 2000"}
_SUPPORTED_TEXT = ", ".join(_TYPE_LABELS.get(kind, kind.upper()) for kind in SUPPORTED_TYPES)

HEAD_BYTES = 4096  # enough for every signature below (PDF allows up to 1 KiB of junk before %PDF-)
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
_PNM_HEADER = re.compile(rb"P[1-6]\s+(?:#[^\n]*\n\s*)*\d+\s+\d+")


def sniff_type(head: bytes) -> str | None:
    """The document kind ("pdf", "png", ...) from a file's first bytes, or None when it is not supported."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    # "BM" alone would also match a list of paths starting with "BM...": check the DIB header size too.
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "bmp"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "jpeg2000"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "avif"
    if _PNM_HEADER.match(head):
        return "pnm"
    if b"%PDF-" in head[:1024]:
        return "pdf"
    return None


def describe_unsupported(head: bytes) -> str:
    if not head:
        return "empty file"
    if head.startswith(b"PK\x03\x04"):
        return "unsupported type: ZIP archive (DOCX, XLSX, ODT and EPUB are ZIP files: export them to PDF)"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"hevc", b"mif1", b"msf1"):
        return "unsupported type: HEIC/HEIF image (convert it to JPEG or PNG)"
    if head.startswith(b"%!PS"):
        return "unsupported type: PostScript (convert it to PDF)"
    what = "text" if _looks_like_text(head) else "unrecognised binary data"
    return f"unsupported type: {what} (supported: {_SUPPORTED_TEXT})"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\t\n\r\f\v" for ch in text)
