"""The top floor: the command line, `run` (every stage of the plan), init, status, summary, report, demo."""
