"""One script per question (JSON + table, results summarised in notes/); a package so that they share code."""
