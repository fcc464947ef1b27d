"""Checks of :mod:`freqvi.reporting`'s convention on a report's JSON, shared by the CLI and tour tests."""

from freqvi.reporting import STANDARD_ERRORS, UNITS

MARK = "_standard_error_"


def standard_error_keys(report, path=()) -> list[tuple[tuple[str, ...], str, str]]:
    """Every standard error in a JSON report, as ``(path of its dict, kind, unit)``, after checking that
    its key names a known kind and unit and that a number of that unit sits beside it."""
    found = []
    if isinstance(report, dict):
        for key, value in report.items():
            if key == "conventions":  # the legend itself
                continue
            if "standard_error" in key:
                kind, mark, unit = key.partition(MARK)
                assert mark and kind in STANDARD_ERRORS and unit in UNITS, (path, key)
                values = [k for k in report if k.endswith(unit) and "standard_error" not in k]
                assert values, f"{'/'.join(path)}: {key} accompanies no number in {unit}"
                assert value is None or value >= 0, (path, key, value)
                found.append((path, kind, unit))
            else:
                found += standard_error_keys(value, (*path, key))
    return found
