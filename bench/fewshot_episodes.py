"""Episode throughput: N-way K-shot Q-query episodes on cached embeddings, batched as tensors.

    python bench/fewshot_episodes.py                  # 10,000 episodes, 2-way 5-shot 15-query, 512-d
    python bench/fewshot_episodes.py --way 5 --dim 2048

Target (issue: few-shot evaluation): 10,000 episodes of 2-way 5-shot 15-query on 512-d embeddings in
under 5 s on 2 CPU cores, sampling included. The embeddings are synthetic, shaped like BreastMNIST's
(546 train / 156 test images, 2 classes); only their shape matters for the time. Writes
bench/results/fewshot_episodes/<device>.{json,md}.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from lowshot.fewshot import CLASSIFIERS, evaluate_episodes, sample_episodes

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--episodes", type=int, default=10_000)
p.add_argument("--way", type=int, default=2)
p.add_argument("--shot", type=int, default=5)
p.add_argument("--query", type=int, default=15)
p.add_argument("--dim", type=int, default=512)
p.add_argument("--train", type=int, default=546)
p.add_argument("--test", type=int, default=156)
p.add_argument("--repeats", type=int, default=3, help="the best of this many runs is reported")
p.add_argument("--out", default="bench/results/fewshot_episodes")
args = p.parse_args()

g = torch.Generator().manual_seed(0)
n = args.train + args.test
labels = torch.arange(n) % max(args.way, 2)
feats = torch.randn(n, args.dim, generator=g) + labels[:, None].float()
support_pool, query_pool = torch.arange(args.train), torch.arange(args.train, n)
mean = feats[support_pool].mean(0)

rows = []
for clf in CLASSIFIERS:
    times = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        ep = sample_episodes(
            labels, support_pool, query_pool, args.way, args.shot, args.query, args.episodes, seed=r
        )
        t1 = time.perf_counter()
        res = evaluate_episodes(feats, labels, ep, mean, clf)
        t2 = time.perf_counter()
        times.append((t2 - t0, t1 - t0, t2 - t1))
    total, sample, evaluate = min(times)
    rows.append(
        {
            "classifier": clf,
            "seconds": total,
            "sampling_s": sample,
            "classify_s": evaluate,
            "episodes_per_s": args.episodes / total,
            "accuracy": res["accuracy"],
        }
    )
    print(
        f"{clf:<10} {total:6.2f} s  (sampling {sample:.2f} s, classifying {evaluate:.2f} s)  {args.episodes / total:9.0f} episodes/s",
        flush=True,
    )

meta = {
    "device": f"CPU ({os.cpu_count()} cores, {platform.machine()}), torch threads {torch.get_num_threads()}",
    "command": " ".join([Path(sys.executable).name, *sys.argv]),
    "git_sha": subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    or "unknown",
    "setting": f"{args.episodes} episodes, {args.way}-way {args.shot}-shot {args.query}-query, {args.dim}-d",
    "target": "prototype: < 5 s for 10,000 2-way 5-shot 15-query episodes on 512-d, 2 CPU cores",
    "versions": {"torch": torch.__version__, "python": platform.python_version()},
    "date": time.strftime("%Y-%m-%d"),
}
table = [
    f"| classifier | seconds (best of {args.repeats}) | sampling s | classifying s | episodes/s |",
    "|---|---|---|---|---|",
]
table += [
    f"| {r['classifier']} | {r['seconds']:.2f} | {r['sampling_s']:.2f} | {r['classify_s']:.2f} | {r['episodes_per_s']:.0f} |"
    for r in rows
]
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
(out / "cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
(out / "cpu.md").write_text(
    "\n".join(
        ["# Few-shot episode throughput", "", *[f"- {k}: {v}" for k, v in meta.items()], "", *table, ""]
    )
)
print("\n".join(table))
