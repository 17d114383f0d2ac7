"""Mixed precision as on the GPU: FSDP2 bf16 params/compute with float32 where it matters (norms, EDM
preconditioning and output combination, loss, timestep input, sampler state), run on CPU through gloo."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.microdit.config import model_config
from model.microdit.layers import LayerNorm, layer_norm
from model.microdit.network import MicroDiT
from model.objectives.edm import EDMConfig, denoise, edm_loss
from pipeline.train.parallelize import build_mesh, parallelize
from model.microdit.family import FAMILY as MICRODIT

STEPS = 10
# Bound on |loss_bf16 - loss_fp32| / loss_fp32 at every step of the curve below; measured max 0.05 %.
REL_BOUND = 0.01


@pytest.fixture(scope="module")
def gloo():
    if dist.is_initialized():  # another module's group: FSDP only needs one
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _curve(bf16: bool) -> tuple[list[float], set]:
    """STEPS AdamW steps of the Debug model under FSDP2 (bf16 policy as on the GPU, or float32), mask 0.75."""
    cfg = model_config("MicroDiT_Debug")
    torch.manual_seed(0)
    net = MicroDiT(cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero adaLN and final layer, so the network's precision shows in the loss
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    seen = set()
    net.blocks[0].attn.qkv.register_forward_hook(lambda m, a, o: seen.add(("block", a[0].dtype)))
    net.t_embedder.register_forward_hook(lambda m, a, o: seen.add(("c_noise", a[0].dtype)))
    net.final_layer.norm.register_forward_hook(lambda m, a, o: seen.add(("norm", m.weight.dtype, o.dtype)))
    net = parallelize(net, build_mesh(1, "cpu"),
                      units=MICRODIT.shard_units, bf16=bf16, compile=False, activation_checkpointing=False)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1)
    lat, cap = torch.randn(8, 4, 16, 16, generator=data), torch.randn(8, 77, 64, generator=data)
    losses = []
    for step in range(STEPS):
        loss, per = edm_loss(net, lat, cap, EDMConfig(mask_ratio=0.75), torch.Generator().manual_seed(100 + step))
        assert loss.dtype == per.dtype == torch.float32
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, seen


def test_fsdp_bf16_loss_curve_stays_close_to_float32(gloo):
    fp32, seen32 = _curve(bf16=False)
    bf16, seen16 = _curve(bf16=True)
    assert seen32 == {("block", torch.float32), ("c_noise", torch.float32),
                      ("norm", torch.float32, torch.float32)}
    # bf16 compute in the blocks and root, but the timestep embedder gets c_noise in float32.
    assert seen16 == {("block", torch.bfloat16), ("c_noise", torch.float32),
                      ("norm", torch.bfloat16, torch.bfloat16)}
    assert fp32 != bf16  # the bf16 run really ran in bf16
    for step, (a, b) in enumerate(zip(fp32, bf16)):
        assert abs(a - b) <= REL_BOUND * a, (step, a, b)


def test_layer_norm_computes_in_float32():
    torch.manual_seed(0)
    ref = nn.LayerNorm(64, eps=1e-6, bias=False)
    ours = layer_norm(64, 1e-6)
    assert isinstance(ours, LayerNorm) and isinstance(ours, nn.LayerNorm)
    with torch.no_grad():
        ref.weight.normal_()
        ours.weight.copy_(ref.weight)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 10, 64) * 30 + 7
    assert torch.equal(ours(x), ref(x))  # float32: exactly nn.LayerNorm
    ours_bf16 = ours.to(torch.bfloat16)  # as FSDP's param_dtype casts it
    xb = x.to(torch.bfloat16)
    y = ours_bf16(xb)
    assert y.dtype == torch.bfloat16
    want = F.layer_norm(xb.float(), (64,), ours_bf16.weight.float(), None, 1e-6).to(torch.bfloat16)
    assert torch.equal(y, want)
    qk = layer_norm(64, 1e-6, affine=False).to(torch.bfloat16)
    assert torch.equal(qk(xb), F.layer_norm(xb.float(), (64,), eps=1e-6).to(torch.bfloat16))


class _DtypeNet(nn.Module):
    """Records the dtypes it is called with; answers in bf16 like a bf16 network."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones((), dtype=torch.bfloat16))
        self.seen = []

    def forward(self, x, c_noise, caption, **kw):
        self.seen.append((x.dtype, c_noise.dtype))
        return (x * self.w).to(torch.bfloat16), None


def test_preconditioning_and_combination_in_float32_for_low_precision_inputs():
    net = _DtypeNet()
    x = torch.randn(2, 4, 8, 8)
    d, _ = denoise(net, x.to(torch.bfloat16), torch.tensor([0.5, 3.0]), torch.zeros(2, 3, 8), 0.9)
    assert d.dtype == torch.float32  # c_skip x + c_out F combined in float32, not bf16
    assert net.seen[-1] == (torch.bfloat16, torch.bfloat16)  # the net still sees its own dtype
    d64, _ = denoise(net, x.double(), 2.0, torch.zeros(2, 3, 8), 0.9)
    assert d64.dtype == torch.float64  # the sampler's float64 is kept


def test_sampler_state_stays_float64_with_a_bf16_network():
    import copy

    from model.pipelines.microdit import MicroDiTPipeline
    from model.samplers.edm_heun import EDMHeunScheduler

    cfg = model_config("MicroDiT_Debug")
    torch.manual_seed(0)
    net = MicroDiT(cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    noise = torch.randn(2, 4, 16, 16, generator=g)
    cap = torch.randn(2, 77, 64, generator=g)
    seen, states = [], []
    low_net = copy.deepcopy(net).to(torch.bfloat16)
    low_net.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    scheduler = EDMHeunScheduler(sigma_data=0.9)
    step = scheduler.step
    scheduler.step = lambda *a, **k: states.append(step(*a, **k)) or states[-1]

    def draw(network, sched):
        pipe = MicroDiTPipeline(transformer=network, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt_embeds=cap, latents=noise, num_inference_steps=4, guidance_scale=2.0,
                    output_type="latent").images

    low = draw(low_net, scheduler)
    full = draw(net, EDMHeunScheduler(sigma_data=0.9))
    assert set(seen) == {torch.bfloat16}
    assert {(s.prev_sample.dtype, s.pred_original_sample.dtype) for s in states} == {(torch.float64, torch.float64)}
    assert low.dtype == full.dtype == torch.float32
    # bf16 network, float64 ODE: the samples stay close to the float32 network's.
    err = (low - full).abs().mean() / full.abs().mean()
    assert err < 0.03, err
