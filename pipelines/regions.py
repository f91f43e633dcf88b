"""Decode only what a crop needs: no row below the patch.

A patch of rows y0 .. y0+s-1 needs nothing below row y0+s. The encoded formats are decoded top to
bottom, so telling the decoder that the image ends there saves the rest of the work, and the rows
it does decode are the full decode's rows bit for bit:

* PNG (not interlaced): every row is filtered against the row above it and all rows are one zlib
  stream, so the rows above the patch must be inflated and unfiltered; the rows below need not be.
  ``top_rows`` sets the IHDR height to y0+s (and its CRC): a decoder stops there. Decode cost
  follows (y0+s)/R; the columns cannot be skipped.
* JPEG (baseline or extended sequential, SOF0/SOF1): decoded in MCU rows (8 or 16 pixel rows). The
  SOF height is set to the patch's last MCU row plus one more: chroma upsampling of a row reads the
  chroma row below it, and a decoder replicates the last row at the image's end instead.
* progressive JPEG, interlaced PNG, WebP and anything unrecognised: the bytes are left as they are
  (decoded whole).

The torch backend (Pillow) decodes the cut bytes (SampleSource.decode_region). The DALI backend
feeds the bytes as stored to its ROI decoder (fn.decoders.image_slice), which for JPEG does better:
it stops after the patch's rows and also skips the inverse DCT and colour conversion of the columns
outside it (the entropy-coded data of the rows above the patch must still be read: without restart
markers there is no way to jump into it). DALI's PNG decoder decodes whole, and libpng and
libjpeg-turbo print a warning for every image with a cut header, so DALI never sees one.

Raw and latent samples are not decoded at all: a source reads only the patch's rows (and, shard format
version 4, checks each against its CRC-32; see ``ShardSet.read_region``).
"""
from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SOF_SEQUENTIAL = (0xC0, 0xC1)          # baseline, extended sequential (Huffman)
_SOF_OTHER = (0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)   # progressive, lossless, ...


def top_rows(data: bytes, encoding: str, rows: int) -> bytes:
    """``data`` with its header saying the image has only its top ``rows`` rows (for JPEG: rounded
    up to whole MCU rows, plus one), where the encoding allows it; else ``data`` unchanged."""
    if encoding == "png":
        return _png_top_rows(data, rows)
    if encoding == "jpeg":
        return _jpeg_top_rows(data, rows)
    return data


def _png_top_rows(data: bytes, rows: int) -> bytes:
    # signature (8), IHDR length (4) and type (4), 13 bytes of IHDR data, its CRC (4)
    if len(data) < 33 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or data[28] != 0:
        return data                     # not a PNG, or Adam7-interlaced (rows are spread over 7 passes)
    height = struct.unpack(">I", data[20:24])[0]
    if rows >= height:
        return data
    ihdr = data[16:20] + struct.pack(">I", rows) + data[24:29]
    return data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]


def _jpeg_top_rows(data: bytes, rows: int) -> bytes:
    i = 2
    if data[:2] != b"\xff\xd8":
        return data
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return data
        marker = data[i + 1]
        if marker == 0xFF:              # fill byte
            i += 1
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in _SOF_SEQUENTIAL:
            seg = data[i + 4:i + 2 + length]            # precision, height, width, components, ...
            height, ncomp = struct.unpack(">H", seg[1:3])[0], seg[5]
            if height == 0 or len(seg) < 6 + 3 * ncomp:  # height given later (DNL), or a short segment
                return data
            mcu = 8 * max(seg[6 + 3 * k + 1] & 0x0F for k in range(ncomp))   # largest vertical sampling
            keep = min(height, -(-rows // mcu) * mcu + mcu)
            if keep >= height:
                return data
            return data[:i + 5] + struct.pack(">H", keep) + data[i + 7:]
        if marker in _SOF_OTHER or marker == 0xDA:      # progressive & co., or scan data before any SOF
            return data
        i += 2 + length
    return data
