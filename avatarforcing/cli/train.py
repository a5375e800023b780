"""``avatarforcing train``: the recipe's stages, the listener, robust distillation, the eval nets."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AvatarForcingError
from .common import require_corpus


def add(sub) -> None:
    t = sub.add_parser("train", help="training stages: vae, teacher, ode-generate, ode, dmd, recipe, listener, robust",
                       description="Run the mini recipe up to a stage (earlier stages are resumed or reused). "
                                   "Every stage checkpoints atomically in --out and resumes where it stopped.")
    t.add_argument("stage", choices=["vae", "teacher", "ode-generate", "ode", "dmd", "recipe", "syncnet", "listener",
                                     "robust"])
    t.add_argument("--model", default="mini", help="listener: the model whose audio rows it learns to give back; "
                                                   "robust: the model to fine-tune")
    t.add_argument("--corpus", default="data/corpus", help="corpus folder from `avatarforcing data synth` (listener: "
                                                           "several, comma-separated)")
    t.add_argument("--out", default="runs/mini", help="checkpoints, logs (JSONL) and intermediate data")
    t.add_argument("--export", help="write the trained student + VAE as a model folder here (recipe)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--smoke", action="store_true", help="a few steps of every stage (end-to-end check)")
    t.add_argument("--minutes", type=float, help="wall-clock budget; stops with a checkpoint, rerun to resume")
    t.add_argument("--config", help="recipe overrides as YAML (fields of RecipeConfig)")
    t.add_argument("--model-config", help="recipe: the model to train as YAML (`preset: mini` and the fields to "
                                          "change, e.g. benchmarks/mini_wide.yaml); default: the mini preset")
    t.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    import yaml

    from ..config import Config
    from ..train.recipe import SMOKE, RecipeConfig, run_recipe

    if args.stage == "listener":
        return _train_listener(args)
    if args.stage == "robust":
        return _train_robust(args)
    if args.stage == "syncnet":
        from ..eval.nets import EVAL_WEIGHTS, train_eval_nets

        meta = train_eval_nets(args.corpus, args.export or EVAL_WEIGHTS, steps=30 if args.smoke else 1500,
                               device=args.device)
        print(f"eval nets (SyncNet-style, mouth reader, identity): {meta}")
        return 0
    order = ["vae", "latents", "teacher", "ode-gen", "ode", "dmd", "export"]
    last = {"vae": "vae", "teacher": "teacher", "ode-generate": "ode-gen", "ode": "ode", "dmd": "dmd",
            "recipe": "export"}[args.stage]
    stages = tuple(order[: order.index(last) + 1])
    r = SMOKE if args.smoke else RecipeConfig()
    if args.config:
        r = dataclasses.replace(r, **(yaml.safe_load(Path(args.config).read_text()) or {}))
    require_corpus(args.corpus)
    try:
        times = run_recipe(args.corpus, args.out, args.device, r, stages=stages, export_to=args.export,
                           minutes=args.minutes, cfg=Config.load(args.model_config) if args.model_config else None)
    except TimeoutError as e:
        print(f"avatarforcing train: {e}")
        return 3
    print(f"train {args.stage}: done; cumulative seconds per stage: {times}")
    return 0


def _train_robust(args) -> int:
    import dataclasses

    import yaml

    from ..api import model_folder
    from ..train.recipe import SMOKE
    from ..train.robust import RobustConfig, run_robust

    smoke = RobustConfig(versions=2, workers=0, recipe=dataclasses.replace(SMOKE, decoder_steps=2, sample_every=0))
    rc = smoke if args.smoke else RobustConfig()
    if args.config:
        d = yaml.safe_load(Path(args.config).read_text()) or {}
        rc = RobustConfig.from_dict({**dataclasses.asdict(rc), **d,
                                     "recipe": {**dataclasses.asdict(rc.recipe), **d.get("recipe", {})}})
    require_corpus(args.corpus)
    try:
        info = run_robust(args.corpus, model_folder(args.model), args.out, args.device, rc, export_to=args.export,
                          minutes=args.minutes)
    except TimeoutError as e:
        print(f"avatarforcing train: {e}")
        return 3
    print(json.dumps(info, indent=1))
    return 0


def _train_listener(args) -> int:
    import dataclasses

    import yaml

    from ..api import model_folder
    from ..config import Config
    from ..train.listener import ListenerTrainConfig, train_listener

    folder = model_folder(args.model)
    cfg = Config.load(folder / "config.yaml")
    if cfg.codec.audio != "mel":
        raise AvatarForcingError(f"{folder}: the listener adapts mel rows; this model's codec.audio is "
                                 f"{cfg.codec.audio!r}")
    tcfg = ListenerTrainConfig(steps=40, batch=2, workers=0) if args.smoke else ListenerTrainConfig()
    if args.config:
        tcfg = dataclasses.replace(tcfg, **(yaml.safe_load(Path(args.config).read_text()) or {}))
    corpora = args.corpus.split(",")
    report = train_listener(corpora if len(corpora) > 1 else corpora[0], folder, args.out,
                            cfg.override({"codec.listener": "none"}), tcfg,
                            minutes=args.minutes, export=args.export)
    print(json.dumps(report, indent=1))
    return 0
