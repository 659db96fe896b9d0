"""``python -m prism_spec.train.campaign``: init, run, eval, plot and status of a campaign
(docs/gpu-campaign.md)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from .. import campaign
from . import CampaignConfig, init_campaign, read_state, run_campaign, status_lines
from .evaluate import evaluate_level, plot_learning_curves, replay_level
from .export import export_drafter


def main(argv=None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m prism_spec.train.campaign", description=campaign.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="start a campaign folder from a JSON config")
    i.add_argument("folder")
    i.add_argument("--config", required=True, help="JSON file of CampaignConfig fields")
    r = sub.add_parser("run", help="train the next segments within a time budget")
    r.add_argument("folder")
    r.add_argument("--time-budget", type=float, default=None, metavar="SECONDS")
    r.add_argument("--max-levels", type=int, default=None)
    r.add_argument("--precision", choices=["config", "float32"], default="config",
                   help="float32: compute this run in float32 (faster on CPUs without bf16 instructions)")
    r.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="where this machine holds the campaign's data (default: the configured paths)")
    r.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, every core); e.g. 1 beside a corpus job")
    r.add_argument("--no-shared-features", action="store_true",
                   help="HASS runs the target itself instead of reading the features EAGLE-2 left (saves disk)")
    r.add_argument("--quiet", action="store_true")
    e = sub.add_parser("eval", help="AL of the last level's drafters on the six benchmarks (prism bench)")
    e.add_argument("folder")
    e.add_argument("--questions", type=int, default=20, help="questions per benchmark (default 20)")
    e.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per answer (default 128)")
    e.add_argument("--tree", default="paper",
                   help="tree shape, as prism bench takes it: paper, serving, cpu, chain:N, TOTAL/DEPTH/TOP_K or auto (default paper)")
    e.add_argument("--temperature", type=float, action="append", default=None,
                   help="sampling temperature; repeat for several (default: 0 only)")
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto: a GPU when there is one)")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    e.add_argument("--level", type=int, default=None, help="which finished level (default: the last)")
    e.add_argument("--no-vanilla", action="store_true",
                   help="T>0 only: decode the drafters without vanilla (AL, no speedups; a quarter fewer runs)")
    e.add_argument("--replay", action="store_true",
                   help="replay acceptance from the target's own continuations (greedy at T=0, seeded samples at "
                        "T>0) instead of decoding (prism_spec.bench.replay; a fraction of the time, the same "
                        "outputs for every drafter, no speed or identity figures)")
    pl = sub.add_parser("plot", help="learning curves of the evaluated levels (AL against examples per method)")
    pl.add_argument("folder")
    pl.add_argument("-o", "--out", required=True, help="image file (.png, .svg, .pdf)")
    x = sub.add_parser("export", help="copy one level's drafter of one method into a folder of its own, "
                                      "with a README of where it came from (e.g. to ship it)")
    x.add_argument("folder")
    x.add_argument("--method", default="prism", choices=list(campaign.METHODS), help="default prism")
    x.add_argument("--level", type=int, default=None, help="which finished level (default: the last)")
    x.add_argument("-o", "--out", required=True, help="drafter folder to write (replaced if it is one)")
    s = sub.add_parser("status", help="levels, held-out accuracy, AL, what comes next")
    s.add_argument("folder")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "init":
            config = CampaignConfig.from_dict(json.loads(Path(args.config).read_text()))
            init_campaign(args.folder, config)
            print("\n".join(status_lines(read_state(args.folder), args.folder)))
        elif args.cmd == "run":
            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
            # SIGTERM / Ctrl-C: finish the current step, save the segment where it is, stop.
            from ..loop import request_stop

            signal.signal(signal.SIGTERM, request_stop)
            signal.signal(signal.SIGINT, request_stop)
            state = run_campaign(args.folder, args.time_budget, args.max_levels, quiet=args.quiet,
                                 data_paths=args.data, precision=args.precision,
                                 share_features=not args.no_shared_features)
            print("\n".join(status_lines(state, args.folder)))
        elif args.cmd == "eval":
            if args.replay:
                if args.no_vanilla:
                    raise ValueError("--no-vanilla is for decoded evaluations: a replay decodes nothing")
                for temperature in args.temperature or [0.0]:
                    replay_level(args.folder, args.questions, args.max_new_tokens, args.tree, device=args.device,
                                 threads=args.threads, level=args.level, temperature=temperature)
            else:
                evaluate_level(args.folder, args.questions, args.max_new_tokens, args.tree,
                               tuple(args.temperature or [0.0]), device=args.device, threads=args.threads,
                               level=args.level, vanilla=not args.no_vanilla)
            print("\n".join(status_lines(read_state(args.folder), args.folder)))
        elif args.cmd == "plot":
            rows = plot_learning_curves(read_state(args.folder), args.out)
            for r in rows:
                print(f"L{r['level']} {r['examples']:>7} examples  {r['evaluation']}  {r['method']:<7} T={r['temperature']:g}  "
                      f"AL {r['mean_acceptance_length']:.3f}")
            print(f"wrote {args.out}")
        elif args.cmd == "export":
            command = "python -m prism_spec.train.campaign " + " ".join(sys.argv[1:] if argv is None else argv)
            out = export_drafter(args.folder, args.out, args.method, args.level, command=command)
            print(f"wrote {out}")
        else:
            print("\n".join(status_lines(read_state(args.folder), args.folder)))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
