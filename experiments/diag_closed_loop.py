"""Sequential closed-loop diagnostics: perplexity on calibration blocks *and* held-out blocks.

A refit that overfits its calibration tokens looks good on the first and bad on the second; one
that is wrong looks bad on both. Each spec is comma-separated CompressConfig overrides on top of
whitening, front-to-back, per layer, uniform ranks, 1.8x:

    python experiments/diag_closed_loop.py --calib-samples 32 objective=dense-target objective=compressed-input
    python experiments/diag_closed_loop.py --calib-samples 64 objective=dense-target,granularity=matrix,method=kfac,allocation=knapsack
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from vac.compress import load_data
from vac.config import make_config
from vac.evaluate import compare
from vac.models import load
from vac.pipeline import compress_

BASE = dict(eval_samples=16, seq_len=256, method="whiten", order="front-to-back", ratio=1.8, allocation="uniform",
            granularity="layer")


def parse_spec(spec: str) -> dict:
    out = {}
    for kv in spec.split(","):
        k, v = kv.split("=")
        out[k] = float(v) if v[0].isdigit() else (json.loads(v) if v[0] == "[" else v)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="+", help="key=value[,key=value...] overrides, one run each")
    p.add_argument("--calib-samples", type=int, default=32)
    args = p.parse_args(argv)
    loaded = load("smollm2-135m")
    dense = loaded.model.float().eval()
    base = {**BASE, "calib_samples": args.calib_samples}
    calib, held_out = load_data(make_config(base), loaded.tokenizer, dense)
    for spec in args.specs:
        cfg = make_config({**base, **parse_spec(spec)})
        model = copy.deepcopy(dense)
        t0 = time.time()
        result = compress_(model, cfg, calib, progress=False)
        stages = {k: round(v) for k, v in result.timings.items()}
        for name, blocks in (("calib", calib[:16]), ("eval", held_out)):
            r = compare({"c": model}, blocks, dense, batch_size=8, progress=False)
            ppl = r["c"]["ppl"]
            print(f"{spec} {name} ppl {ppl:.2f} ({ppl / r['dense']['ppl']:.2f}x) kl {r['c']['kl']:.3f} "
                  f"{stages} {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
