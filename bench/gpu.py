"""GPU benchmark of the block-sparse kernels and fused fields against cuBLAS, torch BSR and torch.compile.

    python bench/gpu.py --out gpu.json            # full grid (a few minutes on an H100)
    python bench/gpu.py --quick --compile --out gpu.json   # a reduced grid, with torch.compile
    python bench/gpu.py --smoke --out r.json      # tiny shapes on the CPU (Triton interpreter)

Run the test suite first (bench/gpu_session.sh does both). Stages, one module each, all timed with
``jsp_fast._timing`` (round-robin over a config's providers, device synchronised in the timed call;
why not triton's do_bench: bench/gpu_common.py):

- field (gpu_fields.py): the concatsquash field (value + Hutchinson tangent) at widths <= 512 and 90%
  block sparsity, our fused engines against eager dense ``ODEnet.jvp`` (and its torch.compile);
- solve (gpu_fields.py): a fixed-step RK4 solve of (z, log-density) through the fused field, eager and
  captured in one CUDA graph, against the eager dense solve;
- e2e (gpu_e2e.py): ``jf.sparsify`` of a pruned CNF, ``sample`` and ``log_prob`` against dense;
- layers (gpu_layers.py): one block-sparse layer and its forward+JVP against cuBLAS and torch BSR.

The narrow-field stages run first (they hold the first target and take the least time) and the JSON
is rewritten after each stage, so a run stopped by a time limit keeps what it measured. Prints a table
(gpu_table.py) and writes JSON (``--out``) with every record and the targets (gpu_config.py) checked:
fused field >= 5x torch eager dense at widths <= 512 and 90% sparsity; layers of width >= 2048 at 10%
density >= 1.5x torch's Triton BSR and ahead of cuBLAS, each in the same precision.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_config  # noqa: E402
from gpu_config import check_targets, field_configs, layer_configs  # noqa: E402,F401  (used by the tests)

from jsp_fast._io import atomic_write_json  # noqa: E402


def parse_args(argv=None):
    return gpu_config.parse_args(argv, description=__doc__)


def main(argv=None) -> int:
    args = parse_args(argv)
    from gpu_common import environment, require_device  # noqa: PLC0415  (imports torch, triton)

    device = require_device(args.smoke)
    from gpu_e2e import bench_e2e  # noqa: PLC0415
    from gpu_fields import bench_fields, bench_solves  # noqa: PLC0415
    from gpu_layers import bench_layers  # noqa: PLC0415
    from gpu_table import table  # noqa: PLC0415

    out = dict(environment=environment(device),
               args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               errors={})
    records = []

    def save():  # after every stage, atomically: a run cut off by a time limit keeps what it measured
        out["records"] = [asdict(r) for r in records]
        out["targets"] = check_targets(out["records"])
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(args.out, out, indent=1)

    for title, stage in (("fused field", bench_fields), ("RK4 solve", bench_solves),
                         ("end to end (jf.sparsify)", bench_e2e), ("layers", bench_layers)):
        print(f"# {title}", flush=True)
        try:
            records += stage(args, device)
        except Exception as e:  # noqa: BLE001 - the later stages still run; the error is in the JSON
            out["errors"][title] = repr(e)[:1000]
            print(f"  {title} FAILED: {e!r}", file=sys.stderr, flush=True)
        save()
    print(table(records))
    print("\n# targets")
    print(json.dumps({k: v for k, v in out["targets"].items() if not isinstance(v, list)}, indent=1))
    if out["errors"]:
        print(f"\nstages that failed: {', '.join(out['errors'])}", file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}")
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
