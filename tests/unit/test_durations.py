"""Go-style durations."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.durations import parse_go_duration

UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ParseGoDurationTests(SynchronousTestCase):
    def test_examples(self) -> None:
        for text, seconds in (("0", 0.0), ("30s", 30.0), ("15m", 900.0), ("72h", 259200.0), ("1h30m", 5400.0),
                              ("500ms", 0.5), ("1.5s", 1.5), (".5s", 0.5), ("+2s", 2.0), (" 10s ", 10.0),
                              ("100us", 1e-4), ("100µs", 1e-4), ("1000ns", 1e-6), ("1h1m1s1ms", 3661.001)):
            self.assertAlmostEqual(parse_go_duration(text), seconds, places=9, msg=text)

    def test_refused(self) -> None:
        for text in ("", "  ", "30", "5 s", "5S", "1d", "-1s", "s", "1e3s", "1h-30m", "abc", "1.2.3s", "--1s"):
            self.assertRaises(ValueError, parse_go_duration, text)

    def test_error_message_quotes_the_input(self) -> None:
        error = self.assertRaises(ValueError, parse_go_duration, "ten seconds")
        self.assertIn("'ten seconds'", str(error))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(sorted(UNITS))), min_size=1, max_size=4))
    def test_sum_of_parts(self, parts: list[tuple[int, str]]) -> None:
        text = "".join(f"{amount}{unit}" for amount, unit in parts)
        expected = sum(amount * UNITS[unit] for amount, unit in parts)
        self.assertApproximates(parse_go_duration(text), expected, 1e-9 * max(1.0, expected))

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=12))
    def test_only_value_error(self, text: str) -> None:
        try:
            value = parse_go_duration(text)
        except ValueError:
            return
        self.assertGreaterEqual(value, 0.0)
