"""EMA (model/ema.py), AdamW parameter groups and LR schedules (pipeline/train/optim.py)."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from model.ema import EMA
from pipeline.train.optim import apply_lr, build_optimizer, constant_schedule, cosine_schedule, param_groups




def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def _set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.fill_(value + i)


def test_ema_matches_hand_computed_average_after_start():
    model = small_net()
    ema = EMA(model, decay=0.9, start_step=3)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(8):
        _set_weights(model, float(step))  # stands in for an optimizer step
        ema.update(model, step)
        for n, p in model.named_parameters():
            ref[n] = p.detach().clone() if step < 3 else 0.9 * ref[n] + 0.1 * p.detach()
    for n, t in ema.shadow.items():
        torch.testing.assert_close(t, ref[n])
    assert ema.num_updates == 5
    # Hand-checked closed form for the first parameter (value = step): copies 2, then 5 averages.
    expected = 2.0
    for s in range(3, 8):
        expected = 0.9 * expected + 0.1 * s
    assert ema.shadow["0.weight"][0, 0].item() == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(7.0)  # really lags behind the weights


def test_ema_tracks_weights_before_start_step():
    model = small_net()
    ema = EMA(model, decay=0.999, start_step=100)
    for step in range(5):
        _set_weights(model, 10.0 * step)
        ema.update(model, step)
        for n, p in model.named_parameters():
            assert torch.equal(ema.shadow[n], p.detach())
    assert ema.num_updates == 0


def test_ema_update_every_skips_steps():
    model = small_net()
    _set_weights(model, 0.0)
    ema = EMA(model, decay=0.5, start_step=0, update_every=2)
    for step in range(4):
        _set_weights(model, 4.0)
        ema.update(model, step)  # averages at steps 0 and 2 only
    assert ema.num_updates == 2
    assert ema.shadow["0.weight"][0, 0].item() == pytest.approx(3.0)  # 0 -> 2 -> 3


def test_ema_state_dict_roundtrip_and_copy_to():
    model = small_net()
    ema = EMA(model, decay=0.8, start_step=0)
    for step in range(3):
        _set_weights(model, float(step + 1))
        ema.update(model, step)
    state = {k: ({n: t.clone() for n, t in v.items()} if k == "shadow" else v)
             for k, v in ema.state_dict().items()}
    fresh = EMA(small_net(), decay=0.1, start_step=50)
    fresh.load_state_dict(state)
    assert fresh.decay == 0.8 and fresh.start_step == 0 and fresh.num_updates == 3
    for n in ema.shadow:
        torch.testing.assert_close(fresh.shadow[n], ema.shadow[n])
    target = small_net()
    fresh.copy_to(target)
    for n, p in target.named_parameters():
        torch.testing.assert_close(p.detach(), ema.shadow[n])
    with pytest.raises(ValueError, match="missing"):
        fresh.load_state_dict({**state, "shadow": {"0.weight": state["shadow"]["0.weight"]}})
    with pytest.raises(ValueError, match="unexpected"):
        fresh.update(nn.Sequential(small_net(), nn.Linear(2, 2)), 1)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)


_FSDP_SCRIPT = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from model.ema import EMA
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    ema = EMA(model, decay=0.5, start_step=0)
    assert type(next(iter(ema.shadow.values()))).__name__ == "DTensor"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(2.0)
    ema.update(model, 0)
    for n, t in ema.shadow.items():
        torch.testing.assert_close(t.full_tensor(), ref[n] + 1.0)
    dist.destroy_process_group()
    print("FSDP_EMA_OK")
""")


def test_ema_on_fsdp2_sharded_params():
    # A one-rank gloo group in a child process, so this test session's torch.distributed stays untouched.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = subprocess.run([sys.executable, "-c", _FSDP_SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PORT": str(port)}, cwd=str(Path(__file__).parents[1]))
    assert "FSDP_EMA_OK" in res.stdout, res.stderr[-3000:]


class FakeMoE(nn.Module):
    """Stand-in MoE: router plus an `experts` submodule with a 3-D weight and a bias."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(4, 2, bias=False)
        self.experts = nn.Module()
        self.experts.w1 = nn.Parameter(torch.randn(2, 4, 8))
        self.experts.b1 = nn.Parameter(torch.zeros(2, 8).flatten())


def _names(model: nn.Module, group: dict) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in group["params"]}


def test_param_groups_split_with_stand_in_moe():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), FakeMoE())
    model[0].bias.requires_grad_(False)
    groups = {g["name"]: g for g in param_groups(model, 0.1, 0.5, moe_types=(FakeMoE,))}
    assert _names(model, groups["decay"]) == {"0.weight", "2.router.weight"}
    assert _names(model, groups["no_decay"]) == {"1.weight", "1.bias"}
    assert _names(model, groups["moe_experts"]) == {"2.experts.w1"}
    assert _names(model, groups["moe_experts_no_decay"]) == {"2.experts.b1"}
    assert groups["moe_experts"]["lr_scale"] == 0.5 and groups["decay"]["lr_scale"] == 1.0
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0


def test_optimizer_groups_on_microdit_debug():
    from model.microdit.config import model_config
    from model.microdit.network import MicroDiT
    from model.microdit.moe import ExpertChoiceMoE

    model = MicroDiT(model_config("MicroDiT_Debug"))
    expected_moe = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, ExpertChoiceMoE):
            expected_moe |= {f"{mod_name}.experts.{n}" for n, _ in mod.experts.named_parameters()}
    assert expected_moe, "the Debug preset has MoE blocks"

    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, moe_lr_scale=0.5)
    groups = {g["name"]: g for g in opt.param_groups}
    moe_names = set().union(*(_names(model, g) for n, g in groups.items() if n.startswith("moe")))
    assert moe_names == expected_moe
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "no parameter in two groups"
    assert set(seen) == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    assert all(p.ndim < 2 for p in groups["no_decay"]["params"])
    assert groups["moe_experts"]["lr"] == pytest.approx(5e-4) and groups["decay"]["lr"] == pytest.approx(1e-3)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8

    # LambdaLR keeps the MoE scale; apply_lr does the same by hand.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(2, 10))
    opt.step(), sched.step()
    assert groups["moe_experts"]["lr"] == pytest.approx(0.5 * groups["decay"]["lr"])
    apply_lr(opt, 2e-4)
    assert groups["moe_experts"]["lr"] == pytest.approx(1e-4) and groups["no_decay"]["lr"] == pytest.approx(2e-4)


def test_cosine_schedule_values():
    fn = cosine_schedule(warmup_steps=100, total_steps=1100, final_ratio=0.33)
    assert fn(0) == pytest.approx(0.01)
    assert fn(49) == pytest.approx(0.5)
    assert fn(99) == pytest.approx(1.0) and fn(100) == pytest.approx(1.0)
    assert fn(600) == pytest.approx(0.33 + 0.67 * 0.5)  # half way through the cosine
    assert fn(350) == pytest.approx(0.33 + 0.67 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert fn(1100) == pytest.approx(0.33) and fn(5000) == pytest.approx(0.33)
    values = [fn(s) for s in range(100, 1101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule(100, 50)


def test_constant_schedule_values():
    fn = constant_schedule(warmup_steps=500)
    assert fn(0) == pytest.approx(1 / 500) and fn(249) == pytest.approx(0.5)
    assert fn(499) == 1.0 and fn(10_000) == 1.0
    assert constant_schedule(0)(0) == 1.0
