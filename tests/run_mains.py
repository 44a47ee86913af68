"""Run one entry script's main() once per argv, one after the other in the same process:

    deepspeed --num_gpus 2 tests/run_mains.py src/train_exo.py ARGVS.json

ARGVS.json is a list of argv lists. Under a launcher every rank runs them all, so several
runs pay the launch, the rendezvous and the imports once (a comparison of two runs, say).
"""
import json
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from utils.process_exit import run_and_exit  # noqa: E402


def run_all():
    # the deepspeed launcher adds --local_rank=N (each rank reads LOCAL_RANK from its environment)
    script, argvs_path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main = runpy.run_path(script, run_name="run_mains")["main"]
    for argv in json.loads(Path(argvs_path).read_text()):
        main(argv)


if __name__ == "__main__":
    run_and_exit(run_all)
