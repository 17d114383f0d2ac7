"""The report step: one run's report (losses, throughput, cost, samples, metrics) and two-run comparisons."""
