"""DICOMweb's multipart/related framing (PS3.18 8.7.1), written once for every medmesh part that
speaks to a PACS: the worker's WADO-RS retrieves and the local stack's STOW-RS seeding. No I/O.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

DICOM_PART = "application/dicom"
DICOM_JSON = "application/dicom+json"
# What a WADO-RS retrieve of instances asks for: Part 10 files, each in its own part.
ACCEPT_INSTANCES = f'multipart/related; type="{DICOM_PART}"'


def multipart_related(parts: Sequence[bytes], part_type: str) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/related message of ``parts`` of ``part_type``."""
    boundary = f"medmesh-{uuid.uuid4().hex}"
    body = bytearray()
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode()
        body += part
        body += b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f'multipart/related; type="{part_type}"; boundary={boundary}'


def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of the parts of a multipart/related message; ValueError when it is not one."""
    boundary = content_type_parameter(content_type, "boundary")
    if boundary is None:
        raise ValueError("not a multipart answer (no boundary)")
    delimiter = b"--" + boundary.encode()
    parts: list[bytes] = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _head, separator, content = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise ValueError("a multipart part without a header/body separator")
        # Each part ends with the CRLF that precedes the next delimiter.
        parts.append(content[:-2] if content.endswith(b"\r\n") else content)
    return parts


def content_type_parameter(content_type: str, name: str) -> str | None:
    """A parameter of a Content-Type value (``boundary``, ``type``), unquoted; None if absent."""
    for item in content_type.split(";")[1:]:
        key, _, value = item.strip().partition("=")
        if key.strip().lower() == name:
            return value.strip().strip('"')
    return None
