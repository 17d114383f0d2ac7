"""The training process group, with its rendezvous listening on the address Ray gives rank 0 and nowhere else.

Ray Train's torch backend sets MASTER_ADDR/MASTER_PORT and lets torch start the c10d TCPStore on rank 0, which
listens on every interface ("::" / 0.0.0.0), so a single-machine stack whose Ray listeners all sit on loopback
still opened one port to the network while a stage trained. Here rank 0 binds the store's listening socket
itself, to the node address Ray reports (127.0.0.1 on a single-machine head, the node's own IP on a cluster),
and hands it to the store (`master_listen_fd`). On a loopback head, gloo's and NCCL's own sockets are kept on
the loopback interface too.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from pipeline.core.ray_cluster import is_loopback

_listener: socket.socket | None = None  # rank 0's bound socket, between `_listen` and `_init`


def _listen() -> tuple[str, int]:
    """On rank 0: bind a listening socket to this node's Ray address on a free port -> (address, port)."""
    global _listener
    host = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(128)
    _listener = s
    return host, s.getsockname()[1]


def _init(backend: str, host: str, port: int, world_rank: int, world_size: int, timeout_s: int) -> None:
    """On every rank: the TCPStore (rank 0 serves it on the bound socket) and the process group over it."""
    if is_loopback(host):
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(var, "lo")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, str(port)
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        assert _listener is not None, "_listen runs on rank 0 first"
        store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout,
                              master_listen_fd=_listener.detach())  # the store owns the socket from here
    else:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _BoundBackend(_TorchBackend):
    """Ray Train's torch backend with the process group set up by `_init` (shutdown is Ray's)."""

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        host, port = worker_group.execute_single(0, _listen)
        worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK, RANK, WORLD_SIZE, ...
        ray.get([worker_group.execute_single_async(i, _init, backend=backend_config.backend, host=host, port=port,
                                                   world_rank=i, world_size=len(worker_group),
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])


class BoundTorchConfig(TorchConfig):
    """TorchConfig for `TorchTrainer(torch_config=...)` whose rendezvous listens only on rank 0's Ray address."""

    @property
    def backend_cls(self):
        return _BoundBackend
