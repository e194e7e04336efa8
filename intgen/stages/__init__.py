"""Pipeline stages. Each has pure functions that build requests from rows and parse completions into rows."""
