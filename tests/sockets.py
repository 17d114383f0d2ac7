"""Listening sockets of a set of processes, read from /proc (never found by process name): which Ray, Prefect or
training process accepts connections, and on which address."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
from pathlib import Path

# /proc/net/<file>: the state that means "accepting" (TCP LISTEN; UDP unconnected, i.e. receiving on its port)
_STATES = {"tcp": "0A", "tcp6": "0A", "udp": "07", "udp6": "07"}


def _address(hex_addr: str) -> tuple[str, int]:
    ip, port = hex_addr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # four host-order 32-bit words
    return socket.inet_ntop(socket.AF_INET6, raw), int(port, 16)


def _listening_by_inode() -> dict[int, tuple[str, str, int]]:
    out = {}
    for kind, state in _STATES.items():
        for line in Path(f"/proc/net/{kind}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == state:
                out[int(f[9])] = (kind, *_address(f[1]))
    return out


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (by /proc parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def listening_sockets(pids: list[int]) -> list[tuple[int, str, str, str, int]]:
    """(pid, command, kind, ip, port) of every listening TCP / receiving UDP socket the processes hold."""
    inodes = _listening_by_inode()
    found = set()
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:80]
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # exited meanwhile
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                found.add((pid, cmd.strip(), *inodes[int(target[8:-1])]))
    return sorted(found)


def is_loopback_ip(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # "::ffff:127.0.0.1" on a dual-stack socket
    return (mapped or addr).is_loopback


def assert_loopback_only(socks, must_include_ports=()) -> None:
    ports = {s[4] for s in socks}
    assert set(must_include_ports) <= ports, f"expected listeners on {must_include_ports}, saw {socks}"
    exposed = [s for s in socks if not is_loopback_ip(s[3])]
    assert not exposed, "listeners beyond loopback:\n" + "\n".join(map(str, exposed))


@contextlib.contextmanager
def polling(step, every: float, join_timeout: float = 30):
    """Call `step()` every `every` seconds on a thread while the block runs."""
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            step()
            stop.wait(every)

    watcher = threading.Thread(target=loop, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(timeout=join_timeout)


@contextlib.contextmanager
def watch_listeners(root_pid: int, every: float = 0.2):
    """Record, while the block runs, every listening socket of `root_pid`'s descendants and of this process:
    yields the growing set of (pid, command, kind, ip, port)."""
    seen: set = set()
    with polling(lambda: seen.update(listening_sockets(descendants(root_pid) + [os.getpid()])), every):
        yield seen
