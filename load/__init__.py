"""Load generators: a locust file for the REST path and a gRPC load client (see docs/load-testing.md)."""
