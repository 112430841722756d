"""Command-line tools that inspect models and configs."""
