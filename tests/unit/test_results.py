"""A Worker's result against the output the control plane recorded (results.py): the size check that
decides between asking for more output, verifying, and failing the Run, so no result loops."""

from __future__ import annotations

import pytest

from taskrunner.results import RESULT_RESUMES, ResultRejected, more_output_owed


def test_a_result_covering_the_recorded_output_is_verified_now() -> None:
    assert more_output_owed(6, 6, 0) is False
    assert more_output_owed(0, 0, RESULT_RESUMES) is False


def test_a_result_covering_less_than_was_recorded_fails_the_run_instead_of_asking_again() -> None:
    # The Agent truncated its output.log: asking the Worker again only gets the same result again.
    with pytest.raises(ResultRejected, match=r"^result rejected: it covers 0 bytes of output, 6 were recorded "
                                             r"\(the Agent truncated its output\)$"):
        more_output_owed(6, 0, 0)


def test_a_result_covering_more_is_answered_with_resume_a_bounded_number_of_times() -> None:
    assert all(more_output_owed(3, 6, asked) for asked in range(RESULT_RESUMES))
    with pytest.raises(ResultRejected, match=f"after asking {RESULT_RESUMES} times for the rest"):
        more_output_owed(3, 6, RESULT_RESUMES)


@pytest.mark.parametrize("size", [None, "6", -1, True, 6.0])
def test_a_result_whose_size_is_not_a_byte_count_fails_the_run(size: object) -> None:
    with pytest.raises(ResultRejected, match="is not a byte count"):
        more_output_owed(6, size, 0)
