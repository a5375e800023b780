"""``avatarforcing eval``: the long-form benchmark, one video's metrics, merging runs."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AvatarForcingError
from ..stream.options import Options


def add(sub) -> None:
    e = sub.add_parser("eval", help="metrics and the long-form benchmark",
                       description="longform: every mode/ablation on the same held-out clips -> JSON, markdown, "
                                   "PNG drift curves. video: the same metrics on any MP4 (with its audio). "
                                   "merge: one result from longform runs over consecutive clip ranges.")
    e.add_argument("what", choices=["longform", "video", "merge"])
    e.add_argument("--parts", nargs="+", help="merge: longform JSONs of consecutive clip ranges (--first)")
    e.add_argument("--model", default="mini")
    e.add_argument("--clips", type=int, default=400)
    e.add_argument("--frames", type=int, default=400)
    e.add_argument("--modes", default=",".join(["avatarforcing", "ar", "teacher", "shuffled",
                                                 *(f"no-{n}" for n in Options.names())]))
    e.add_argument("--json", help="write the JSON result here")
    e.add_argument("--report", help="folder for report.md and the PNG plots")
    e.add_argument("--eval-nets", help="folder with eval_nets.safetensors (default: the shipped ones)")
    e.add_argument("--video", help="eval video: the MP4 to score")
    e.add_argument("--audio", help="eval video: the speech (default: the MP4's own audio track)")
    e.add_argument("--reference", help="eval video: the reference portrait (for identity drift)")
    e.add_argument("--syncnet-v2", help="the public SyncNet's syncnet_v2.model: adds LSE-C / LSE-D (not shipped)")
    e.add_argument("--fid-extractor", help="longform: TorchScript frame network for FID ([N, 3, 299, 299] in [-1, 1] "
                                           "-> [N, D]; default: the corpus-trained FID*)")
    e.add_argument("--fvd-extractor", help="longform: TorchScript video network for a true FVD ([N, 3, T, 224, 224] "
                                           "in [-1, 1] -> [N, D], I3D-style; default: the corpus-trained FVD*)")
    e.add_argument("--fvd-frames", type=int, default=16, help="longform: frames per window for --fvd-extractor")
    e.add_argument("--split", choices=["test", "heldout"], default="test",
                   help="longform: test (unseen speakers; the numbers claims rest on) or heldout (the development "
                        "split training choices were checked on)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch", type=int, default=1, help="longform: clips per engine run (e.g. 100 on a GPU)")
    e.add_argument("--workers", type=int, default=0, help="longform: processes synthesising clips ahead")
    e.add_argument("--voices", default="espeak", help="longform: voices, espeak or espeak,flite (flite's "
                                                     "held-out speaker slt in 40%% of the clips; needs Debian flite)")
    e.add_argument("--first", type=int, default=0, help="longform: first clip index (resume a run cut short)")
    e.add_argument("--deadline-min", type=float, help="longform: stop after the batch that passes this many minutes "
                                                     "(the JSON is rewritten after every batch)")
    e.set_defaults(func=run)


def run(args) -> int:
    from ..eval.nets import EVAL_WEIGHTS

    nets_dir = args.eval_nets or EVAL_WEIGHTS
    if args.what == "longform":
        from ..eval.longform import run_longform
        from ..eval.report import markdown_table

        res = run_longform(args.model, args.clips, args.frames, [m for m in args.modes.split(",") if m],
                           args.json, args.report, eval_nets=nets_dir, device=args.device,
                           fid_extractor=args.fid_extractor, batch=args.batch, workers=args.workers,
                           deadline_minutes=args.deadline_min, first=args.first, syncnet_v2=args.syncnet_v2,
                           voices=tuple(args.voices.split(",")), split=args.split,
                           fvd_extractor=args.fvd_extractor, fvd_frames=args.fvd_frames)
        print(markdown_table(res))
        return 0
    if args.what == "merge":
        from ..eval.longform import merge_longform
        from ..eval.report import markdown_table, write_report

        if not args.parts:
            raise AvatarForcingError("eval merge needs the JSON files of the runs: --parts A.json B.json ...")
        parts = []
        for p in args.parts:
            try:
                parts.append(json.loads(Path(p).read_text()))
            except (OSError, ValueError) as e:
                raise AvatarForcingError(f"{p}: not a readable longform JSON ({e})") from e
        try:
            res = merge_longform(parts)
        except KeyError as e:
            raise AvatarForcingError(f"eval merge: a part lacks {e}; expected `eval longform` JSON files") from e
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        if args.report:
            write_report(res, Path(args.report))
        print(markdown_table(res))
        return 0
    if not args.video:
        raise AvatarForcingError("eval video needs --video FILE.mp4")
    from ..eval.video import score_video

    res = score_video(args.video, args.audio, args.reference, nets_dir, args.syncnet_v2, args.device)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
