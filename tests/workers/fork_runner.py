"""Run a worker script many times as forked children of one warm interpreter.

Importing torch costs seconds; the SIGKILL fault trials need many short-lived training
processes.  This runner imports everything once, then for each JSON argument list read
from stdin forks a child that runs ``finetune_worker.py`` (via ``runpy``, as
``__main__``).  It prints ``PID <pid>`` for each child (whose own output shares this
stdout) and ``EXIT <code>`` once the child is gone (negative: killed by that signal).
The runner itself runs no torch operations, so forking it is safe.
"""
from __future__ import annotations

import json
import os
import runpy
import sys
import traceback
from pathlib import Path

import torch

import convfx.train  # noqa: F401  (preloaded for the children)
import toy  # noqa: F401

WORKER = str(Path(__file__).with_name("finetune_worker.py"))


def main() -> None:
    torch.set_num_threads(1)
    for line in sys.stdin:
        argv = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                sys.argv = [WORKER, *argv]
                runpy.run_path(WORKER, run_name="__main__")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    main()
