"""Work done in other processes by the concurrency and kill tests (importable by spawned children)."""
import json
import os
import signal
import time


def append_record(folder, worker, barrier):
    """Open the session, wait until every worker has opened it, then record one edit."""
    from dedit_nb.session import Session
    s = Session.open(folder)
    barrier.wait()
    s.record_edit({"kind": "test", "worker": worker})


def record_until(folder, stop_file, worker):
    """Record edits from freshly opened (soon stale) sessions until ``stop_file`` appears; returns the count
    in ``<folder>/../records-<worker>.json``."""
    from dedit_nb.session import Session
    done = 0
    while not os.path.exists(stop_file):
        s = Session.open(folder)
        time.sleep(0.02)
        s.record_edit({"kind": "test", "worker": worker, "n": done})
        done += 1
    with open(os.path.join(os.path.dirname(folder), f"records-{worker}.json"), "w") as f:
        json.dump(done, f)


def finetune_then_signal(model_dir, folder, stop_file, config):
    """Finetune the session from scratch (checkpoint every step), then create ``stop_file``."""
    import torch
    torch.set_num_threads(1)
    from dedit_nb.finetune import FinetuneConfig, finetune
    from dedit_nb.models import load_model
    from dedit_nb.session import Session
    try:
        finetune(load_model(model_dir), Session.open(folder), FinetuneConfig(**config), resume=False, progress=False)
    finally:
        open(stop_file, "w").close()


def joint_finetune_killed(model_dir, folders, config, victim, when):
    """Joint finetune of ``folders`` that SIGKILLs its own process while the session.json of ``victim`` is
    being replaced with a finished checkpoint: ``when='pending'`` at the first such write, ``'current'``
    at the one that makes it the session's current weights. The temporary file is left behind."""
    import torch
    torch.set_num_threads(1)
    import dedit_nb.session as S
    from dedit_nb.finetune import FinetuneConfig, finetune
    from dedit_nb.models import load_model
    real_replace = os.replace

    def replace(src, dst):
        if os.path.abspath(dst) == os.path.abspath(os.path.join(victim, "session.json")):
            with open(src) as f:
                data = json.load(f)
            current = (data.get("finetune") or {}).get("done", False)
            pending = ((data.get("pending") or {}).get("finetune") or {}).get("done", False)
            if (when == "pending" and (pending or current)) or (when == "current" and current):
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)

    os.replace = replace
    sessions = [S.Session.open(f) for f in folders]
    finetune(load_model(model_dir), sessions[0], FinetuneConfig(**config), extra_sessions=sessions[1:],
             progress=False)
