"""Command-line tools (run as `python scripts/<name>.py`); they import one another as `scripts.<name>`."""
