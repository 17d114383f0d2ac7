"""build_training_model (meta device, shard, materialise per rank) equals the plain seeded build + shard, bit for
bit, on a 2-process gloo group; and the init recorder refuses what it cannot replay."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from model.microdit.config import model_config
from model.microdit.network import MicroDiT
from pipeline.train.build import materialize, record_meta_build
from model.microdit.family import FAMILY as MICRODIT

SEED = 1234


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from model.objectives.edm import EDMConfig, edm_loss
    from pipeline.train.build import build_training_model
    from pipeline.train.parallelize import build_mesh, parallelize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        cfg = model_config("MicroDiT_Debug")
        mesh = build_mesh(world, "cpu")
        # Today's loop.build_model + parallelize: the whole model on every rank, then sharded.
        torch.manual_seed(SEED)
        plain = parallelize(MicroDiT(cfg), mesh,
                            units=MICRODIT.shard_units, bf16=False, compile=False, activation_checkpointing=False)
        rng_plain = torch.get_rng_state()
        want = _full_state(plain)

        meta = build_training_model(cfg, SEED, mesh, device="cpu", family="microdit")
        assert torch.equal(torch.get_rng_state(), rng_plain), "global RNG left elsewhere than the plain build"
        got = _full_state(meta)
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert torch.equal(got[name], value), name
        for name, p in meta.named_parameters():  # each rank holds only its shard
            assert p.to_local().shape[0] <= (p.shape[0] + world - 1) // world, name
        assert torch.equal(meta.pos_embed, plain.pos_embed)

        # Same loss and gradients through both (masked, one step).
        lat, cap = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64)
        losses = []
        for model in (plain, meta):
            loss, _ = edm_loss(model, lat, cap, EDMConfig(mask_ratio=0.75), torch.Generator().manual_seed(rank))
            loss.backward()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1])
        for (name, a), b in zip(plain.named_parameters(), meta.parameters()):
            assert torch.equal(a.grad.to_local(), b.grad.to_local()), name

        # Other parallelize options do not change the values; a weights state replaces the init.
        meta_ac = build_training_model(dict(vars(cfg)), SEED, mesh, device="cpu", family="microdit", bf16=True,
                                       activation_checkpointing=True)
        for name, value in _full_state(meta_ac).items():
            assert torch.equal(value, want[name]), name
        state = {n: v + 1.0 for n, v in want.items()}
        loaded = build_training_model(cfg, SEED, mesh, device="cpu", family="microdit", init_weights_state=state)
        for name, value in _full_state(loaded).items():
            assert torch.equal(value, state[name]), name
        assert torch.equal(torch.get_rng_state(), rng_plain)
        with pytest.raises(ValueError, match="missing.*final_layer"):
            build_training_model(cfg, SEED, mesh, device="cpu", family="microdit",
                                 init_weights_state={k: v for k, v in state.items() if "final_layer" not in k})
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_meta_build_equals_plain_build_on_two_gloo_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port), nprocs=2, join=True)


def test_recorder_replays_every_parameter_and_the_rng():
    cfg = model_config("MicroDiT_Debug")
    torch.manual_seed(7)
    plain = MicroDiT(cfg)
    rng = torch.get_rng_state()
    torch.manual_seed(7)
    model, ops = record_meta_build(lambda: MicroDiT(cfg))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.is_meta for p in model.parameters())
    assert set(ops) == {n for n, _ in model.named_parameters()}
    model.to_empty(device="cpu")
    materialize(model, ops)
    assert torch.equal(torch.get_rng_state(), rng)
    for (name, a), b in zip(plain.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(plain.pos_embed, model.pos_embed)


class _PartialInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.empty(4, 4))
        with torch.no_grad():
            self.w[:2].normal_()  # a partial view: cannot be replayed as a whole-tensor op


class _FactoryInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))


@pytest.mark.parametrize("module,match", [(_PartialInit, "partial view"), (_FactoryInit, "randn")])
def test_recorder_refuses_what_it_cannot_replay(module, match):
    with pytest.raises(NotImplementedError, match=match):
        record_meta_build(module)


def test_a_network_without_init_buffers_is_refused_clearly():
    from pipeline.train.build import check_buffers

    class Tabled(torch.nn.Module):  # a buffer a meta build leaves empty, and no way to rebuild it
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.arange(4.0))

    with pytest.raises(NotImplementedError, match="init_buffers"):
        check_buffers(Tabled())
    from model import family

    for name in family.REGISTRY:  # every family's network can rebuild its buffers after a meta build
        with torch.device("meta"):
            check_buffers(family.get(name).build(next(iter(family.get(name).presets.values()))))
