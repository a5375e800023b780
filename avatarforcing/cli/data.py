"""``avatarforcing data``: the synthetic talking-head corpus and the built-in identities."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import AvatarForcingError


def add(sub) -> None:
    d = sub.add_parser("data", help="synthetic talking-head corpus: synth | identities",
                       description="synth: render a corpus split (MP4 + wav + ground truth + training shards); "
                                   "identities: list the built-in identities (or save their portraits).")
    d.add_argument("what", choices=["synth", "identities"])
    d.add_argument("--voices", default="espeak", help="synth: espeak or espeak,flite (flite's real-speaker voices "
                                                     "for 40%% of the clips; needs Debian's flite)")
    d.add_argument("--out", help="corpus folder (synth) or folder for portrait PNGs (identities)")
    d.add_argument("--clips", type=int, default=16)
    d.add_argument("--seconds", type=float, default=16.0)
    d.add_argument("--size", type=int, default=128)
    d.add_argument("--split", choices=["train", "heldout", "test"], default="train")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=1)
    d.add_argument("--shard-size", type=int, default=16)
    d.add_argument("--preview", help="write a contact sheet PNG of the first clip here")
    d.add_argument("--shards-only", action="store_true", help="skip the per-clip MP4/wav/PNG (training only)")
    d.set_defaults(func=run)


def run(args) -> int:
    from ..identities import IDENTITIES, identity_image

    if args.what == "identities":
        for name in sorted(IDENTITIES):
            print(name)
            if args.out:
                from PIL import Image

                Path(args.out).mkdir(parents=True, exist_ok=True)
                Image.fromarray(identity_image(name, args.size)).save(Path(args.out) / f"{name}.png")
        return 0
    if not args.out:
        raise AvatarForcingError("data synth needs --out DIR")
    if args.size % 16 or args.size < 64:
        raise AvatarForcingError(f"--size must be a multiple of 16 and >= 64, got {args.size}")
    from ..data.corpus import contact_sheet, synth

    t0 = time.perf_counter()
    synth(args.out, args.clips, args.seconds, args.split, args.seed, args.size, args.workers, args.shard_size,
          clip_files=not args.shards_only, synthesisers=tuple(args.voices.split(",")))
    dt = time.perf_counter() - t0
    frames = args.clips * round(args.seconds * 25)
    print(f"{args.out}: {args.clips} {args.split} clips, {frames} frames in {dt:.1f} s ({frames / dt:.0f} frames/s)")
    if args.preview and not args.shards_only:
        contact_sheet(Path(args.out) / "clips" / f"{args.split}-00000", args.preview)
        print(f"contact sheet: {args.preview}")
    return 0
