"""Load PEM bytes into an `ssl.SSLContext` without writing a private key to disk.

`SSLContext.load_cert_chain` only takes file paths. Rather than a temporary
file (which would put the key on disk, even briefly), we hand OpenSSL an
anonymous in-memory file (`memfd_create`) through its `/proc/self/fd` path;
it disappears when we close the descriptor. Linux-only, like the mesh.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def _memory_file(name: str, data: bytes) -> Iterator[str]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        _write_all(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def load_cert_chain_pem(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """`context.load_cert_chain` from PEM bytes (leaf first, then intermediates)."""
    with _memory_file("trellis-chain", chain_pem) as chain_path, \
            _memory_file("trellis-key", key_pem) as key_path:
        try:
            context.load_cert_chain(chain_path, key_path)
        except ssl.SSLError as exc:
            raise ValueError(f"certificate chain and key do not load together: {exc}") from exc
