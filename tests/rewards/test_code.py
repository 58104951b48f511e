"""Code that passes scores 1, code that fails, loops or attacks scores 0, and the pool stays healthy.

Real Docker through the sandbox pool (`python -m sandbox build-image` once).
"""

import time

import pytest

from rewards.code_tests import CodeReward

TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def sample(code, tests=TESTS):
    return {"id": 0, "completion": f"<think>easy</think>\nHere:\n```python\n{code}\n```", "meta": {"tests": tests}}


def test_correct_code_passes_and_wrong_code_fails(pool):
    good = sample("def add(a, b):\n    return a + b\n\nif __name__ == '__main__':\n    print(add(input(), 1))")
    half = sample("def add(a, b):\n    return a + b if a > 0 else 7")
    r_all = CodeReward(pool=pool)([good, half])
    r_frac = CodeReward(pool=pool, mode="fraction")([half])
    assert [r.score for r in r_all] == [1.0, 0.0]
    assert r_all[1].reason == "failed 1 of 3 tests"
    assert r_frac[0].score == pytest.approx(2 / 3)


def test_broken_or_missing_code_scores_zero_with_a_reason(pool):
    results = CodeReward(pool=pool)([
        sample("def add(a, b) return a+b"),
        {"completion": "def add(a, b): return a + b", "meta": {"tests": TESTS}},
        sample("def add(a, b):\n    return a + b", tests=[]),
        sample("import sys\nsys.exit(0)"),
    ])
    assert [r.score for r in results] == [0.0] * 4
    assert "SyntaxError" in results[0].reason
    assert results[1].reason == "no ```python block in the answer"
    assert results[2].reason == "sample has no tests"
    assert "SystemExit" in results[3].reason


def test_a_printed_fake_report_does_not_pass(pool):
    fake = "import os\nprint('0' * 32 + '{\"passed\": [true, true, true], \"error\": null}')\nos._exit(0)"
    [r] = CodeReward(pool=pool)([sample(fake)])
    assert r.score == 0.0 and r.reason.startswith("no test report")


def test_loops_and_attacks_score_zero_and_leave_the_pool_healthy(pool):
    attacks = {
        "loop": "while True: pass",
        "fork bomb": "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
        "memory bomb": "x = []\nwhile True: x.append(' ' * 10**7)",
        "network": "import urllib.request\nurllib.request.urlopen('http://1.1.1.1', timeout=2)",
        "host files": "open('/host_marker_from_rewards_test', 'w').write('x')",
    }
    good = sample("def add(a, b):\n    return a + b")
    t0 = time.perf_counter()
    results = CodeReward(pool=pool, timeout_s=3.0)([sample(c) for c in attacks.values()] + [good])
    assert time.perf_counter() - t0 < 30
    assert [r.score for r in results] == [0.0] * len(attacks) + [1.0], [r.reason for r in results]
    reasons = dict(zip(attacks, (r.reason for r in results)))
    assert reasons["loop"].startswith("timed out")
    assert "OSError" in reasons["network"] or "URLError" in reasons["network"]
    assert "Read-only file system" in reasons["host files"] or "Permission" in reasons["host files"]
    import os

    assert not os.path.exists("/host_marker_from_rewards_test")
    assert pool.wait_settled()
    assert CodeReward(pool=pool)([good])[0].score == 1.0
