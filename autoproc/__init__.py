"""The automated pipeline: Schemes engine, job runners, EMPIAR client, built-in demo data, report."""
