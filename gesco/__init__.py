"""gesco: the generated protocol stubs (`gesco.v1`, built by `make proto`) and the `gesco` command
line client (`gesco.cli`)."""
