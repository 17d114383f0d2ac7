"""Data steps: dataset adapters (sources/), download with img2dataset, precompute of latents and caption states on Ray Data."""
