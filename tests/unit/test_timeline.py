"""The test-run timeline summary (tests/timeline.py) on a hand-made run of two workers."""

from tests.timeline import summarize


def test_summary_gives_wall_busy_and_idle_tail_per_worker():
    rows = [
        {"worker": "gw0", "test": "a.py::t1", "phase": "setup", "start": 100.0, "stop": 110.0},
        {"worker": "gw0", "test": "a.py::t1", "phase": "call", "start": 110.0, "stop": 150.0},
        {"worker": "gw1", "test": "b.py::t2", "phase": "call", "start": 101.0, "stop": 121.0},
        {"worker": "gw1", "test": "c.py::t3", "phase": "call", "start": 125.0, "stop": 130.0},
    ]
    out = summarize(rows).splitlines()
    assert out[0].startswith("wall 50 s")
    assert out[1] == "gw0: busy 50 s, from 0 s to 50 s (idle at the end 0 s)"
    assert out[2].split() == ["50.0", "s", "a.py"]
    assert out[3] == "gw1: busy 25 s, from 1 s to 30 s (idle at the end 20 s)"
    assert [line.split()[-1] for line in out[4:]] == ["b.py", "c.py"]
