"""A run that stops early: what it can save, and how it says which actor died and why.

A checkpoint labelled N holds exactly N updates: a stop saves step N only when the learner is alive and holds
exactly that step's update; otherwise the newest complete checkpoint stays the one to resume from, and the message
says which.
"""

from __future__ import annotations


class ActorDiedError(RuntimeError):
    """An engine or learner actor died mid-run; the message names it, says why, and where the run was saved."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota, a permission): the half-written one is removed,
    the message says why, how much space is left and which checkpoint a resume starts from."""


def os_error_of(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind ``exc``: itself, or the one a Ray task raised on the learner's node."""
    found = None
    for _ in range(8):  # Ray's error is an OSError too, without the errno: the one it wraps is the better account
        if exc is None:
            break
        if isinstance(exc, OSError):
            found = exc
            if exc.strerror:
                return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return found


def checkpoint_write_error(job, step: int, exc: OSError) -> CheckpointWriteError:
    import shutil

    try:
        free = f"{shutil.disk_usage(job.ckpt.root).free / 2**30:.1f} GiB free there"
    except OSError:
        free = "free space unknown"
    latest = job.ckpt.latest()
    resume = (f"the last complete checkpoint is {latest}: free some space, then continue with --resume"
              if latest else "no checkpoint yet: free some space and start again")
    why = exc.strerror or str(exc)
    return CheckpointWriteError(f"the checkpoint of step {step} could not be written to {job.ckpt.root} ({why}; "
                                f"{free}); the half-written one was removed; {resume}.")


def save_after_failure(job, step: int, learner_step: int, learner_died: bool = False) -> str:
    """Save what a stopped run can (``step``: the last step the loop finished; ``learner_step``: the step whose
    update the learner holds or is applying). Says what was saved, for the user."""
    from ray.exceptions import RayError

    if learner_died:
        reason = "the learner is gone, so nothing newer can be saved"
    elif learner_step != step:
        reason = f"step {step + 1}'s update had started, so the learner no longer holds step {step}"
    elif (saved := job.ckpt.root / f"step_{step:06d}") in job.ckpt.list():
        return f"saved step {step} to {saved}"  # already, by the regular save (a re-save would replace it)
    elif step > job.start_step or step == 0:
        try:
            return f"saved step {step} to {job.save_checkpoint(step)}"
        except (RayError, CheckpointWriteError) as exc:  # e.g. the learner died while saving, a full disk
            reason = f"saving step {step} failed ({type(exc).__name__})"
    else:
        reason = f"nothing new since step {step}"
    latest = job.ckpt.latest()
    return f"{reason}; the last checkpoint is {latest}" if latest else f"{reason}; no checkpoint yet"


def dead_actor(job, exc) -> tuple[str, str]:
    """(which actor: ``engine i`` / ``learner rank k``, why it died: Ray's account, on one line) of a
    ``RayActorError``."""
    from ray.exceptions import ActorDiedError as ActorDied

    names = {**{e._actor_id.hex(): f"engine {i}" for i, e in enumerate(job.engines)},
             **{a._actor_id.hex(): f"learner rank {k}" for k, a in enumerate(job.learner.actors)}}
    who = names.get(exc.actor_id, f"actor {exc.actor_id}")
    lines = [ln.strip() for ln in str(exc.error_msg).splitlines() if ln.strip()]
    why = "; ".join(ln for ln in lines if ln != ActorDied.BASE_ERROR_MSG
                    and not ln.startswith(("class_name:", "actor_id:", "namespace:")))
    return who, why or "Ray gave no reason"
