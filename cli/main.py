"""`microdit`: start the local stack, run the pipeline through Prefect, rerun a stage, show status, draw, run the demo.

Each command imports the pipeline modules it needs when it runs (marked "this command's own"): `microdit status`
and `microdit --help` then start in a fraction of a second instead of importing torch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cli import stack as local_stack
from cli.stack import StackError
from model import family as families

REPO = Path(__file__).resolve().parents[1]


class CLIError(RuntimeError):
    """An error shown to the user as one plain line (no traceback)."""


def _state(args) -> Path:
    return Path(args.state_dir).resolve() if args.state_dir else local_stack.default_state_dir()


def _recipe(path: str) -> str:
    """An absolute recipe path: as given, else relative to the repository (recipes/tiny.yaml works anywhere)."""
    for p in (Path(path), REPO / path):
        if p.is_file():
            return str(p.resolve())
    raise CLIError(f"recipe {path!r} not found (looked in {Path.cwd()} and {REPO})")


def cmd_up(args) -> int:
    stack = local_stack.up(_state(args), prefect_port=args.prefect_port, ray_port=args.ray_port,
                           dashboard_port=args.dashboard_port, num_cpus=args.num_cpus)
    print_where(stack)
    return 0


def cmd_down(args) -> int:
    stopped = local_stack.down(_state(args))
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _plan(args, stack=None):
    """The recipe + overrides validated here, before anything is submitted (relative storage: the stack's folder,
    else the working directory)."""
    from pipeline.checks import load_run  # this command's own (it reads the model families)

    return load_run(_recipe(args.recipe), args.set, storage_base=(stack.workdir if stack else None) or None)


def _follow(deployment: str, parameters: dict, args) -> int:
    """Validate the plan, submit it as the flow's typed `plan` parameter, and follow the run to its end."""
    from cli import follow  # this command's own (Prefect's client)

    _plan(args)  # what is wrong with the recipe is said before whether the stack is up
    stack = local_stack.require(_state(args))
    parameters = {"plan": _plan(args, stack).to_dict(), **parameters}
    state = local_stack._with_env(stack, lambda: follow.run_and_follow(deployment, parameters))
    print(f"flow run finished: {state}")
    return 0 if state == "COMPLETED" else 1


def cmd_run(args) -> int:
    return _follow("microdit/full-run", {"force": args.force}, args)


def cmd_stage(args) -> int:
    return _follow("microdit/stage", {"stage": args.name, "restart": not args.resume}, args)


def cmd_compare(args) -> int:
    return _follow("microdit/compare", {"stage": args.stage, "budget_flops": args.budget_flops,
                                        "restart": not args.resume}, args)


def cmd_status(args) -> int:
    from cli import follow, watch  # this command's own (Prefect's client)

    state_dir = _state(args)
    stack = local_stack.Stack.load(state_dir)
    if stack is None:
        raise StackError(f"the local stack is not up (no {state_dir / local_stack.STATE_FILE}); "
                         "start it with `microdit up`")
    up = {name: stack.alive(name) for name in local_stack.SERVICES}
    print(f"state dir          {state_dir}")
    print(f"prefect server     {'up' if up['prefect'] and local_stack.prefect_healthy(stack.api_url) else 'DOWN'}"
          f"  {stack.ui_url}")
    ray_ok = up["ray"] and local_stack.ray_healthy(stack.ray_address)
    print(f"ray head           {'up' if ray_ok else 'DOWN'}  {stack.ray_address}  dashboard {stack.dashboard_url}")
    print(f"deployment server  {'up' if up['serve'] else 'DOWN'}")
    if up["prefect"] and local_stack.prefect_healthy(stack.api_url):
        for line in local_stack._with_env(stack, follow.recent_runs):
            print(line)
        for line in local_stack._with_env(stack, watch.status_lines):  # the latest run's steps and figures
            print(line)
    if not all(up.values()):
        raise StackError("part of the local stack is down; `microdit up` starts what is missing")
    return 0


def cmd_generate(args) -> int:
    from pipeline.core.plan import GenerateConfig  # this command's own (the plan imports torch)
    from pipeline.generate import generate

    if bool(args.prompt) == bool(args.prompts_file):
        raise CLIError("give prompts with --prompt (repeatable) or --prompts-file, exactly one of them")
    given = {k: getattr(args, k) for k in ("steps", "guidance", "seed", "batch_size", "resolution", "use_ema",
                                           "dtype", "device")}
    cfg = GenerateConfig(**{k: v for k, v in given.items() if v is not None})  # unset: GenerateConfig's defaults
    print("\n".join(generate(args.weights, args.prompts_file or args.prompt, args.out, cfg, args.vae,
                             args.text_encoder)))
    return 0


def cmd_plan(args) -> int:
    from pipeline.planner.clusters import parse_cluster  # this command's own (torch, the families)
    from pipeline.planner.estimate import plan_run
    from pipeline.planner.render import markdown

    run = _plan(args)
    price = args.price if args.price is not None else run.report.price_per_gpu_hour
    plan = plan_run(run, parse_cluster(args.cluster, args.peak_tflops, args.gpu_memory), price, args.mfu,
                    args.images, recipe=args.recipe, mfu_basis=args.mfu_basis)
    print(markdown(plan), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(plan.to_dict(), indent=2))
    return 0 if not plan.warnings else 3


def cmd_evaluate(args) -> int:
    from pipeline.core.plan import EvalConfig  # this command's own (the plan imports torch)
    from pipeline.evaluate.evaluate import evaluate
    from pipeline.evaluate.geneval.scores import tag_table

    geneval = {"enabled": args.geneval, "per_tag": args.per_tag, "images_per_prompt": args.images_per_prompt,
               "prompts": args.geneval_prompts, "detector": args.detector, "colour_model": args.colour_model,
               "steps": args.steps}
    cfg = EvalConfig(demo=args.demo, fid=False, clip=False, steps=args.steps, device=args.device,
                     geneval={k: v for k, v in geneval.items() if v is not None})
    if not (cfg.demo or cfg.geneval.enabled):
        raise CLIError("nothing to measure: give --geneval and/or --demo")
    metrics = evaluate(args.weights, args.out, cfg)
    if "geneval" in metrics:
        for tag, ours, paper in tag_table(metrics["geneval"]):
            print(f"{tag:24s} {ours:18s} {paper}")
        print(f"results: {metrics['geneval']['folder']}/results.jsonl")
    if "demo" in metrics:
        print(f"demo caption match: {metrics['demo']['caption_match']:.1%}")
    return 0


def cmd_import_weights(args) -> int:
    from pipeline.core import storage
    from pipeline.weights import import_weights  # this command's own (torch)

    out = import_weights(args.file, args.out, args.family, args.variant)
    source = storage.read_json(storage.join(out, "config.json"))["source"]
    print(f"imported {source['file']} ({args.family} variant {source['variant']}, sha256 {source['sha256'][:12]}...) "
          f"-> {out}")
    if args.diffusers:
        _export_diffusers(out, args.diffusers, use_ema=True)
    print(f"draw with: microdit generate {out} OUT_DIR --prompt '...'")
    return 0


def _export_diffusers(export: str, out: str, use_ema: bool, vae: str | None = None, text: str | None = None) -> None:
    from pipeline.export.diffusers_folder import export_diffusers  # this command's own (diffusers, torch)

    export_diffusers(export, out, use_ema=use_ema, vae_spec=vae, text_spec=text)
    print(f"diffusers folder -> {out}\n  DiffusionPipeline.from_pretrained({out!r}, trust_remote_code=True)")


def cmd_export_diffusers(args) -> int:
    _export_diffusers(args.export, args.out, not args.no_ema, args.vae, args.text_encoder)
    return 0


def cmd_push(args) -> int:
    """Upload a diffusers folder to the Hub: one huggingface_hub call (needs a token: `hf auth login` or HF_TOKEN)."""
    from huggingface_hub import HfApi  # this command's own

    folder = Path(args.folder)
    if not (folder / "model_index.json").is_file():
        raise CLIError(f"{folder} has no model_index.json: write it with `microdit export-diffusers` first")
    api = HfApi()
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    info = api.upload_folder(repo_id=args.repo_id, folder_path=str(folder), ignore_patterns=["_SUCCESS"],
                             commit_message=args.message)
    print(f"pushed {folder} -> {info}")
    return 0


# The CPU demo recipe of each model family (`microdit demo --family emmdit`).
DEMO_RECIPES = {"microdit": "recipes/tiny.yaml", "emmdit": "recipes/emmdit_tiny.yaml"}


def demo_recipe(args) -> str:
    """The demo's recipe: --family's tiny recipe, else --recipe (both at once only when they agree)."""
    family = getattr(args, "family", None)
    if not family:
        return args.recipe
    if args.recipe not in (DEMO_RECIPES["microdit"], DEMO_RECIPES[family]):
        raise CLIError(f"give --family or --recipe, not both (--family {family} runs {DEMO_RECIPES[family]})")
    return DEMO_RECIPES[family]


def cmd_demo(args) -> int:
    """Start the stack if needed, run the tiny recipe end to end, print where everything is."""
    from pipeline.core import storage
    from pipeline.core.layout import Layout

    args.recipe = demo_recipe(args)
    start = time.monotonic()
    stack = local_stack.up(_state(args), num_cpus=args.num_cpus)
    cfg = _plan(args, stack)  # bad recipes fail before the run
    params = {"plan": cfg.to_dict(), "force": args.force}
    rc = local_stack._with_env(stack, lambda: _demo_follow(params))
    print(f"\n== microdit demo ({'done' if rc == 0 else 'FAILED'} in {(time.monotonic() - start) / 60:.1f} min) ==")
    print(f"run folder         {cfg.storage}")
    paths = Layout(cfg.storage)
    for label, uri in (("sample grid", storage.join(paths.samples(), "grid.png")), ("report", paths.report),
                       ("report (html)", paths.uri("report", "report.html")),
                       ("eval metrics", paths.metrics), ("resolved config", paths.config)):
        print(f"{label:<18} {uri}{'' if storage.exists(uri) else '  (missing)'}")
    metrics = paths.metrics
    if storage.exists(metrics):
        demo = storage.read_json(metrics).get("demo") or {}
        if "caption_match" in demo:
            print(f"caption match      {demo['caption_match']:.2f} (colour and shape right; chance "
                  f"{demo.get('chance', {}).get('caption_match', float('nan')):.2f})")
    print_where(stack)
    return rc


def _demo_follow(params: dict) -> int:
    from cli import follow  # this command's own (Prefect's client)

    state = follow.run_and_follow("microdit/full-run", params)
    print(f"flow run finished: {state}")
    return 0 if state == "COMPLETED" else 1


def print_where(stack: local_stack.Stack) -> None:
    print(f"Prefect UI         {stack.ui_url}")
    print(f"Ray dashboard      {stack.dashboard_url}  (token auth: the dashboard asks for the token in "
          f"{local_stack.ray_token_path()}; `ray get-auth-token` prints it)")
    print(f"Ray address        {stack.ray_address}")
    print(f"use from a shell   export PREFECT_API_URL={stack.api_url} PREFECT_HOME={stack.prefect_home} "
          f"RAY_ADDRESS={stack.ray_address}")


def generate_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `microdit generate`; what is not given takes GenerateConfig's defaults (pipeline/core/plan)
    and the export's sampler."""
    p.add_argument("weights", help="export folder ({root}/train/{stage}/export) or a .safetensors file in one")
    p.add_argument("out", help="output folder or s3:// URI")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the export's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale, 1 = none (default: the export's)")
    p.add_argument("--seed", type=int, default=None, help="base seed; image i uses seed + i (default 0)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--no-ema", dest="use_ema", action="store_false", default=None,
                   help="use model.safetensors, not EMA")
    p.add_argument("--dtype", default=None, help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--vae", default=None, help="VAE spec (default: the export config's)")
    p.add_argument("--text-encoder", default=None, help="text encoder spec (default: the export config's)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="microdit", description=__doc__)
    p.add_argument("--state-dir", help="where the local stack keeps its state (default $MICRODIT_HOME or "
                                       "./runs/.stack)")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start Prefect server, Ray head and the deployment server")
    up.add_argument("--prefect-port", type=int, default=4200)
    up.add_argument("--ray-port", type=int, default=6379)
    up.add_argument("--dashboard-port", type=int, default=8265)
    up.add_argument("--num-cpus", type=int, default=None, help="CPUs the Ray head offers (default: all)")
    up.set_defaults(fn=cmd_up)

    sub.add_parser("down", help="stop what `up` started").set_defaults(fn=cmd_down)
    sub.add_parser("status", help="services up? last flow runs; the latest run's steps and their progress") \
        .set_defaults(fn=cmd_status)

    def recipe_args(q):
        q.add_argument("--recipe", default="recipes/tiny.yaml")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="recipe override, e.g. stages.stage1.steps=10 or stages.stage1.optim.lr=1e-4")

    run = sub.add_parser("run", help="run microdit/full-run and follow it")
    recipe_args(run)
    run.add_argument("--force", action="append", default=[], metavar="STEP",
                     help="rerun a finished step (and everything after it): download, precompute, a stage "
                          "name, sample, evaluate, report, or all")
    run.set_defaults(fn=cmd_run)

    stage = sub.add_parser("stage", help="rerun one training stage from cached latents (microdit/stage)")
    stage.add_argument("name")
    recipe_args(stage)
    stage.add_argument("--resume", action="store_true",
                       help="continue the stage from its last checkpoint instead of retraining it")
    stage.set_defaults(fn=cmd_stage)

    compare = sub.add_parser("compare", help="one stage with and without masking at equal compute, from cached "
                                              "latents, reported side by side (microdit/compare)")
    compare.add_argument("--stage", default="stage1")
    recipe_args(compare)
    compare.add_argument("--budget-flops", type=float, default=None,
                         help="training FLOPs per arm (default: what the recipe's stage costs)")
    compare.add_argument("--resume", action="store_true",
                         help="continue each arm from its checkpoints instead of retraining it")
    compare.set_defaults(fn=cmd_compare)

    gen = sub.add_parser("generate", help="images from a stage's export (no stack needed)")
    generate_args(gen)
    gen.set_defaults(fn=cmd_generate)

    plan = sub.add_parser("plan", help="predict time, memory, storage and cost of a recipe on a named cluster, "
                                       "before renting it (exit 3 when a stage does not fit)")
    plan.add_argument("recipe", nargs="?", default="recipes/tiny.yaml")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    plan.add_argument("--cluster", default="8xH100", help="COUNTxKIND: H100, H200, A100, MI300X, L40S, A10")
    plan.add_argument("--price", type=float, default=None, help="dollars per GPU-hour (default: the recipe's report "
                                                                  "price)")
    plan.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation to assume (default: the GPU "
                                                               "suite's for that GPU, else the MicroDiT paper's)")
    plan.add_argument("--mfu-basis", default="executed",
                      help="which FLOPs --mfu counts: 'executed', those the network runs (default; what training "
                           "reports), or '6nd', 6 x all parameters x kept tokens (the paper's run is ~34%% in it)")
    plan.add_argument("--peak-tflops", type=float, default=None, help="another GPU: its dense bf16 TFLOP/s")
    plan.add_argument("--gpu-memory", type=float, default=None, help="another GPU: its memory in GiB")
    plan.add_argument("--images", type=int, default=None, help="size storage for this many images")
    plan.add_argument("--json", default=None, help="also write the plan as JSON here")
    plan.set_defaults(fn=cmd_plan)

    ev = sub.add_parser("evaluate", help="measure an export or a diffusers folder: GenEval, the demo metric "
                                         "(no stack needed; FID on COCO runs in the flow's evaluate step)")
    ev.add_argument("weights", help="an export folder or a diffusers folder")
    ev.add_argument("out", help="where eval/ is written (a run root, local or s3://)")
    ev.add_argument("--geneval", action="store_true", default=None, help="run GenEval")
    ev.add_argument("--per-tag", type=int, default=None, help="GenEval smoke run: the first N prompts of each tag")
    ev.add_argument("--geneval-prompts", type=int, nargs="+", default=None, help="GenEval prompt indices")
    ev.add_argument("--images-per-prompt", type=int, default=None)
    ev.add_argument("--detector", default=None, help="Mask2Former spec (default: the Hub's Swin-S COCO instance)")
    ev.add_argument("--colour-model", default=None, help="open_clip spec (default: ViT-L-14/openai)")
    ev.add_argument("--demo", action="store_true", help="the synthetic caption-match metric (tiny recipes)")
    ev.add_argument("--steps", type=int, default=None)
    ev.add_argument("--device", default="auto")
    ev.set_defaults(fn=cmd_evaluate)

    imp = sub.add_parser("import-weights", help="a released checkpoint (MicroDiT .pt, E-MMDiT .safetensors) as an "
                                                 "export that generate and training stages use")
    imp.add_argument("file", help="the downloaded release file")
    imp.add_argument("out", help="export folder to write (local or s3://)")
    imp.add_argument("--family", required=True, choices=sorted(families.REGISTRY))
    imp.add_argument("--variant", default=None,
                     help="microdit: 22M, 37M, 16ch, 0.5B; emmdit: 512px, 512px-dist (default: from the file name)")
    imp.add_argument("--diffusers", metavar="OUT", default=None,
                     help="also write the export as a diffusers folder at OUT (see export-diffusers)")
    imp.set_defaults(fn=cmd_import_weights)

    exp = sub.add_parser("export-diffusers", help="an export as a diffusers folder (model_index.json, components, "
                                                  "code, model card) that loads without microdit")
    exp.add_argument("export", help="an export folder (a stage's train/<stage>/export, or import-weights' output)")
    exp.add_argument("out", help="the folder to write (local or s3://)")
    exp.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    exp.add_argument("--vae", default=None, help="VAE spec (default: the export's)")
    exp.add_argument("--text-encoder", default=None, help="text encoder spec (default: the export's)")
    exp.set_defaults(fn=cmd_export_diffusers)

    push = sub.add_parser("push", help="upload a diffusers folder to the Hugging Face Hub (huggingface_hub)")
    push.add_argument("folder", help="a folder written by export-diffusers")
    push.add_argument("repo_id", help="user/name on the Hub")
    push.add_argument("--private", action="store_true")
    push.add_argument("--message", default="Upload microdit model")
    push.set_defaults(fn=cmd_push)

    demo = sub.add_parser("demo", help="`up` if needed, then the tiny recipe end to end on CPU")
    recipe_args(demo)
    demo.add_argument("--force", action="append", default=[], metavar="STEP")
    demo.add_argument("--num-cpus", type=int, default=None)
    demo.add_argument("--family", choices=sorted(families.REGISTRY), default=None,
                      help="run that model family's tiny recipe (microdit: recipes/tiny.yaml, emmdit: "
                           "recipes/emmdit_tiny.yaml)")
    demo.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (StackError, CLIError, FileNotFoundError, ValueError) as e:
        print(f"microdit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("microdit: interrupted (the flow run, if any, goes on in the deployment server)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
