"""A tuning worker in its own process (what one pipeline task runs): ``python -m tests.tuning.worker_proc``.

Arguments: CONFIG_YAML MANIFEST FEATURES OUT ROUND STUDY WORKER_ID [PARENT_RUN_ID]. Prints
``ran=<n>`` when it finishes.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import torch

    from icmil.config import config_from_yaml
    from icmil.tracking import tracker_for
    from icmil.tuning import run_tuning_worker

    torch.set_num_threads(1)  # two workers share the machine's two cores
    cfg_path, manifest, features, out, round_index, study, worker_id = argv[:7]
    parent = argv[7] if len(argv) > 7 else ""
    cfg = config_from_yaml(Path(cfg_path).read_text())
    tracker = tracker_for(cfg, parent) if parent else None
    ran = run_tuning_worker(
        cfg, manifest, features, out, int(round_index), study, tracker=tracker, worker_id=int(worker_id)
    )
    print(f"ran={ran}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
