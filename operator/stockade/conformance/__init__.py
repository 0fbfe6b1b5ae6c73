"""The conformance runner: case files (shared/conformance/FORMAT.md) executed against an engine.

`stockade conformance run FILE --engine NAME` (see `command.py`) loads a case file
(`casefile.py`), resolves symbolic addresses (`symbols.py`) and drives an `Engine` (`engine.py`)
case by case (`runner.py`), printing one line per case and a closing `N passed, M failed`.
Part of the bench, which the runtime never imports and the images leave out.
"""
