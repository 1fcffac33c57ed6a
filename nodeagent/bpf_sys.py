"""The few bpf(2) commands the eBPF redirector needs that bcc 0.26 does not offer.

bcc compiles and loads the programs; it attaches to cgroups only with the old
``BPF_PROG_ATTACH``, whose attachments cannot be pinned, and it has no tcx. So
links (``BPF_LINK_CREATE``), pins (``BPF_OBJ_PIN`` / ``BPF_OBJ_GET``) and the
small state maps are made here, straight through the syscall, with ctypes: a
pinned link is what lets an agent restart without dropping or duplicating
anything (the link, not the process, holds the program in place).

Numbers are from include/uapi/linux/bpf.h; they are ABI and never change.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_NR_BPF = 321  # x86_64
_MAP_CREATE, _MAP_LOOKUP, _MAP_UPDATE, _MAP_DELETE = 0, 1, 2, 3
_OBJ_PIN, _OBJ_GET = 6, 7
_OBJ_GET_INFO_BY_FD = 15
_PROG_QUERY = 16
_LINK_CREATE, _LINK_DETACH = 28, 34

# enum bpf_attach_type
CGROUP_SOCK_OPS = 3
CGROUP_INET4_CONNECT = 10
CGROUP_GETSOCKOPT = 21
TCX_INGRESS = 46
MAP_TYPE_ARRAY = 2

_ATTR_SIZE = 128
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) call failed; the message names the command and its object."""


def _bpf(cmd: int, attr: bytes, what: str) -> int:
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    ret = _libc.syscall(_NR_BPF, cmd, buf, _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


def link_create(prog_fd: int, target: int, attach_type: int, what: str) -> int:
    """A link fd attaching ``prog_fd`` to ``target`` (a cgroup fd, or an ifindex for
    tcx, resolved in the calling thread's network namespace)."""
    return _bpf(_LINK_CREATE, struct.pack("=IIII", prog_fd, target, attach_type, 0),
                f"attach {what}")


def link_detach(link_fd: int, what: str) -> None:
    _bpf(_LINK_DETACH, struct.pack("=I", link_fd), f"detach {what}")


def obj_pin(fd: int, path: str) -> None:
    raw = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(_OBJ_PIN, struct.pack("=QII", ctypes.addressof(raw), fd, 0), f"pin {path}")


def obj_get(path: str) -> int:
    raw = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(_OBJ_GET, struct.pack("=QII", ctypes.addressof(raw), 0, 0), f"open pin {path}")


def array_map_create(value_size: int, name: str) -> int:
    """A one-slot array map: a place in bpffs to keep a few numbers of state."""
    attr = struct.pack("=IIIII", MAP_TYPE_ARRAY, 4, value_size, 1, 0)
    attr = attr.ljust(28, b"\0") + name.encode()[:15].ljust(16, b"\0")
    return _bpf(_MAP_CREATE, attr, f"create map {name}")


def map_update(map_fd: int, key: bytes, value: bytes, what: str) -> None:
    k, v = ctypes.create_string_buffer(key), ctypes.create_string_buffer(value)
    _bpf(_MAP_UPDATE, struct.pack("=IIQQQ", map_fd, 0, ctypes.addressof(k),
                                  ctypes.addressof(v), 0), f"update {what}")


def map_lookup(map_fd: int, key: bytes, value_size: int, what: str) -> bytes | None:
    k, v = ctypes.create_string_buffer(key), ctypes.create_string_buffer(value_size)
    try:
        _bpf(_MAP_LOOKUP, struct.pack("=IIQQQ", map_fd, 0, ctypes.addressof(k),
                                      ctypes.addressof(v), 0), f"look up {what}")
    except BpfError as err:
        if err.errno == errno.ENOENT:
            return None
        raise
    return v.raw[:value_size]


def map_delete(map_fd: int, key: bytes, what: str) -> None:
    k = ctypes.create_string_buffer(key)
    try:
        _bpf(_MAP_DELETE, struct.pack("=IIQ", map_fd, 0, ctypes.addressof(k)), f"delete {what}")
    except BpfError as err:
        if err.errno != errno.ENOENT:
            raise


def prog_query(target: int, attach_type: int, what: str) -> list[int]:
    """Ids of the programs attached at ``target`` (a cgroup fd, or an ifindex in
    the calling thread's namespace for tcx): how a duplicate would show."""
    ids = (ctypes.c_uint32 * 64)()
    attr = bytearray(struct.pack("=IIIIQI", target, attach_type, 0, 0,
                                 ctypes.addressof(ids), 64))
    buf = ctypes.create_string_buffer(bytes(attr).ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    if _libc.syscall(_NR_BPF, _PROG_QUERY, buf, _ATTR_SIZE) < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"query {what}: {os.strerror(err)}")
    (count,) = struct.unpack_from("=I", buf.raw, 24)
    return [int(ids[i]) for i in range(min(count, 64))]


def link_prog_id(link_fd: int) -> int:
    """The program a link holds (struct bpf_link_info: type, id, prog_id)."""
    info = ctypes.create_string_buffer(64)
    _bpf(_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", link_fd, 64, ctypes.addressof(info)),
         f"info of link fd {link_fd}")
    return int(struct.unpack_from("=I", info.raw, 8)[0])
