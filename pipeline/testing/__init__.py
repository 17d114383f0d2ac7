"""Test and demo machinery kept out of product code: the synthetic shapes dataset and its loopback HTTP server."""
