"""The channel simulator: gRPC Channel.Transmit (`python -m channel_sim`).

`server` assembles the sender's stream, applies the requested channel
(`shared.semantic.channels`), forwards the noisy symbols to the receiver and passes its answer
back; `settings` reads GESCO_CHANNEL_*. Its Prometheus metrics are served on a port of their own.
"""
