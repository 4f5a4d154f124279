"""bench/cpu_parts.py: py-spy samples go to the first part whose frames they contain."""

from bench.cpu_parts import parts


def test_samples_go_to_the_first_matching_part_and_the_rest_is_unattributed():
    lines = [
        "thread (1);Thread.run (threading.py:1);InferenceLoop._finish (workers/inference.py:2);"
        "InferenceLoop._store (workers/inference.py:3) 5\n",  # store wins over result encode
        "thread (1);InferenceLoop._run (workers/inference.py:1);InferenceLoop._predict (x:1) 3\n",
        "thread (2);something_else (y.py:1) 2\n",
        "\n",
    ]
    counts, total = parts("worker", lines)
    assert total == 10
    assert counts == {"store + ack (results pipeline)": 5, "predict": 3, "unattributed": 2}
