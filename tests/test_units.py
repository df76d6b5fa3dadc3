import pytest

from lessctl.units import human_bytes


@pytest.mark.parametrize(
    "n,words",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (4096, "4.00 KiB"),
        (int(12.3 * 2**20), "12.3 MiB"),
        (int(1023.99 * 2**20), "1.00 GiB"),  # rounds up into the next unit, never "1024 MiB"
        (int(9.999 * 2**10), "10.0 KiB"),  # three significant figures after rounding
        (int(250.4 * 2**30), "250 GiB"),
        (3 * 2**40, "3.00 TiB"),
        (-2048, "-2.00 KiB"),
    ],
)
def test_human_bytes_picks_a_unit_that_fits(n, words):
    assert human_bytes(n) == words
