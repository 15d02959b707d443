"""The command line of the reliability trials; the subcommands are listed in the package's
docstring (``logitcache.tools.reliability``) and by ``--help``."""

from __future__ import annotations

import argparse
import sys
import time

from .. import reliability
from .crashes import cmd_capture_crash, cmd_torchrun_crash, cmd_train_crash
from .flips import cmd_flips
from .memory import cmd_rss, rss_child
from .s3 import cmd_s3

# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m logitcache.tools.reliability",
        description=(reliability.__doc__ or "").split("\n")[0],
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("flips", help="single-bit flips in shards and manifest")
    p.add_argument("--flips", type=int, default=300, help="random flips per shard")
    p.add_argument("--shards", type=int, default=3, help="shards flipped per dataset")
    p.add_argument("--manifest-flips", type=int, default=1000)
    p.add_argument("--manifest-only", action="store_true", help="only the manifest.json sweep")
    p.add_argument("--examples", type=int, default=40, help="examples per dataset")
    p.add_argument("--shard-positions", type=int, default=150, help="positions per shard")
    p.add_argument(
        "--all-footer-bits",
        action="store_true",
        help="flip every bit of one top-k shard's footer (about 10,000 flips, minutes)",
    )
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("s3", help="S3 (moto) behind a fault-injecting proxy")
    p.add_argument(
        "--no-persistent",
        dest="persistent",
        action="store_false",
        help="skip the persistent-failure runs with botocore's legacy retries (minutes)",
    )
    p = sub.add_parser("capture-crash", help="SIGKILL `logitcache build` and rerun it")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--prompts", type=int, default=1200)
    p.add_argument("--max-kills", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser(
        "torchrun-crash", help="SIGKILL one rank of a 2-rank torchrun capture and rerun it"
    )
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--prompts", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("train-crash", help="SIGKILL `logitcache train` and --resume it")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("rss", help="peak RSS streaming 1×, 10×, 100× the shuffle buffer")
    p.add_argument("--buffer", type=int, default=1024)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--shard-positions", type=int, default=1 << 16)
    p = sub.add_parser("_rss")
    p.add_argument("url")
    p.add_argument("buffer", type=int)
    p.add_argument("--no-iterate", dest="iterate", action="store_false")
    args = ap.parse_args(argv)
    if args.cmd == "_rss":
        rss_child(args.url, args.buffer, args.iterate)
        return 0
    t0 = time.perf_counter()
    {
        "flips": cmd_flips,
        "s3": cmd_s3,
        "capture-crash": cmd_capture_crash,
        "torchrun-crash": cmd_torchrun_crash,
        "train-crash": cmd_train_crash,
        "rss": cmd_rss,
    }[args.cmd](args)
    print(f"({args.cmd}: {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
