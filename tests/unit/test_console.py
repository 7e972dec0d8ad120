"""The quiet console: which lines of a real run reach the console, and the capture of a process and its children."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from rl.console import BENIGN_WARNINGS, LineFilter

ROOT = Path(__file__).resolve().parents[2]

# Lines as an engine, a learner and DeepSpeed print them in a 3-step CPU run (shortened), with whether a user sees them.
REAL_LINES = [
    (":actor_name:Engine", True),
    ("Triton is installed, but doesn't include CPU backend. Disabling Triton.", False),
    ("(MainProcess pid=19990) INFO 12-06 09:17:48 [model.py:733] Resolved architecture: Qwen2ForCausalLM", False),
    ("(MainProcess pid=19990) WARNING 12-06 09:17:48 [arg_utils.py:3005] This model does not officially support "
     "disabling chunked prefill. Disabling this manually may cause the engine to crash", False),
    ("(MainProcess pid=19990) WARNING 12-06 09:17:48 [vllm.py:725] Model Runner V2 requires Triton; using the V1 "
     "model runner instead.", False),
    ("(Worker pid=20216) WARNING 12-06 09:18:03 [cpu_worker.py:114] libtcmalloc is not found in LD_PRELOAD.", False),
    ("[W1206 09:18:03.262045107 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory allocation", False),
    ("Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 184.25it/s]", False),
    ("(Worker pid=20216) INFO 12-06 09:18:39 [inplace.py:91] Reloading weights inplace...", False),
    ("(Worker pid=20216) WARNING 12-06 09:18:39 [layerwise.py:266] RotaryEmbedding: Failed to load weights", False),
    ("(EngineCore pid=20171) INFO 12-06 09:18:39 [block_pool.py:861] Successfully reset prefix cache", False),
    ("[engine] vLLM model runner v1 (rollout.model_runner=auto), dtype float32, started in 42 s", True),
    ("[learner] kernels: logprob=naive attention=padded; strategy=single ranks=1", True),
    ("[2026-12-06 09:18:48,446] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. If "
     "you have GPU or other accelerator, we were unable to detect it.", False),
    # not in the benign list: a user must see these
    ("(EngineCore pid=20171) WARNING 12-06 09:20:00 [scheduler.py:1] KV cache is nearly full; preempting requests",
     True),
    ("(EngineCore pid=20171) ERROR 12-06 09:20:01 [core.py:1] EngineCore encountered a fatal error.", True),
    ("[2026-12-06 09:18:48,446] [ERROR] [engine.py:1:step] overflow", True),
    ("[E1206 09:18:03.262045107 ProcessGroupGloo.cpp:1] Gloo connectFullMesh failed", True),
    ("RuntimeError: CUDA out of memory", True),
]


def test_real_lines_shown_and_hidden():
    filt = LineFilter()
    assert [line for line, _ in REAL_LINES if filt.show(line)] == [line for line, shown in REAL_LINES if shown]
    verbose = LineFilter(verbose=True)
    assert all(verbose.show(line) for line, _ in REAL_LINES)


def test_a_traceback_is_shown_whole_and_ends_at_its_exception_line():
    filt = LineFilter()
    lines = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>', "    f()",
             "ValueError: boom", "(Worker pid=1) INFO 12-06 09:00:00 [a.py:1] after"]
    assert [filt.show(ln) for ln in lines] == [True, True, True, True, False]


def test_python_deprecation_warnings_hide_with_their_source_line_but_user_warnings_show():
    filt = LineFilter()
    lines = ["/x/dispatcher.py:138: FutureWarning: `torch.distributed.reduce_op` is deprecated",
             '  if hasattr(value, "__dict__"):',
             "/x/model.py:12: UserWarning: the tokenizer has no pad token",
             "  tok = load()"]
    assert [filt.show(ln) for ln in lines] == [False, False, True, True]


def test_colours_do_not_defeat_the_filter():
    filt = LineFilter()
    assert not filt.show("\x1b[33m(Worker pid=1) WARNING 12-06 09:18:39 [layerwise.py:266] RotaryEmbedding: Failed "
                         "to load weights\x1b[0m")
    assert filt.show("\x1b[31m(Worker pid=1) ERROR 12-06 09:18:39 [x.py:1] broken\x1b[0m")


def test_every_benign_warning_has_a_reason():
    assert all(len(reason) > 15 for reason in BENIGN_WARNINGS.values())


def test_capture_covers_the_process_and_its_children(tmp_path):
    """A process that captures its output: the log gets every line, from it and from a child that inherited its
    stdout and stderr; the original stderr gets only what the filter shows."""
    script = textwrap.dedent(f"""
        import subprocess, sys
        sys.path.insert(0, {str(ROOT)!r})
        from rl.console import capture_output, name_log
        capture_output({str(tmp_path / "logs")!r})
        name_log("engine")
        print("(MainProcess pid=1) INFO 12-06 09:00:00 [a.py:1] hidden info")
        print("[engine] shown line")
        print("(Worker pid=2) WARNING 12-06 09:00:00 [layerwise.py:266] RotaryEmbedding: Failed to load weights",
              file=sys.stderr)
        subprocess.run([sys.executable, "-c",
                        "import sys; print('(EngineCore pid=3) ERROR 12-06 09:00:00 [core.py:1] child error', "
                        "file=sys.stderr); print('child progress 50%')"], check=True)
        sys.stdout.flush(); sys.stderr.flush()
        import time; time.sleep(0.5)  # the pump thread copies the last lines
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == ["[engine] shown line",
                                        "(EngineCore pid=3) ERROR 12-06 09:00:00 [core.py:1] child error"]
    logs = list((tmp_path / "logs").glob("*.log"))
    assert len(logs) == 1 and logs[0].name.startswith("engine-")
    text = logs[0].read_text()
    for needle in ("hidden info", "[engine] shown line", "RotaryEmbedding", "child error", "child progress 50%"):
        assert needle in text


def test_setup_worker_without_a_log_dir_changes_nothing(monkeypatch):
    import rl.console as console

    monkeypatch.delenv(console.LOG_DIR_ENV, raising=False)
    console.setup_worker()
    assert console._capture is None


def test_the_setting_travels_to_workers_local_and_attached(tmp_path, monkeypatch):
    """start_ray gives every worker the set-up hook and the log folder and verbosity in its environment, on a
    local cluster and on an attached one; a job that brings its own hook keeps it."""
    import json

    import ray

    from rl import ray_init

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    ray_init.start_ray(None, 2, tmp_path / "logs", verbose=False)
    ray_init.start_ray("ray://head:10001", None, tmp_path / "logs", verbose=True)
    for kw, verbose in zip(calls, ("0", "1")):
        env = kw["runtime_env"]["env_vars"]
        assert kw["runtime_env"]["worker_process_setup_hook"] == "rl.console.setup_worker"
        assert env["RL_LOG_DIR"] == str(tmp_path / "logs") and env["RL_VERBOSE"] == verbose
    assert calls[1]["address"] == "ray://head:10001" and "num_cpus" not in calls[1]
    job = {"runtime_env": {"worker_process_setup_hook": "mypkg.setup", "env_vars": {"RL_VERBOSE": "1"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    ray_init.start_ray("auto", None, tmp_path / "logs", verbose=False)
    assert "worker_process_setup_hook" not in calls[2]["runtime_env"]
    assert "RL_VERBOSE" not in calls[2]["runtime_env"]["env_vars"]  # the job's own value reaches the workers


def test_verbose_capture_shows_everything_and_still_logs(tmp_path, monkeypatch):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        os.environ["RL_LOG_DIR"] = {str(tmp_path)!r}
        os.environ["RL_VERBOSE"] = "1"
        from rl.console import setup_worker
        setup_worker()
        print("(MainProcess pid=1) INFO 12-06 09:00:00 [a.py:1] info line")
        sys.stdout.flush()
        import time; time.sleep(0.5)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stderr.splitlines() == ["(MainProcess pid=1) INFO 12-06 09:00:00 [a.py:1] info line"]
    assert "info line" in next(tmp_path.glob("worker-*.log")).read_text()


def test_the_live_bar_keeps_its_metrics_whole_at_80_columns():
    from io import StringIO

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from rl.tracking import _BarAndInfo

    out = StringIO()
    console = Console(file=out, width=80, force_terminal=False, color_system=None)
    bar = _BarAndInfo(TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=None), console=console,
                      auto_refresh=False)
    info = "mean=0.25  accuracy=0.25  response_len_mean=10.6  policy=-0.00553  step_s=1.53  extra=123456789"
    bar.add_task("train", total=30, completed=3, info=info)
    console.print(bar.get_renderable())
    text = out.getvalue()
    assert "".join(text.split()) .find("".join(info.split())) >= 0, text  # every character, wrapped if need be
    assert all(len(line) <= 80 for line in text.splitlines())
