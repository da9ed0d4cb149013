"""Code the three services share, in two halves whose names say which a process may import.

`shared.wire` is everything a process needs to speak the gesco protocol and serve it, torch-free;
`shared.semantic` is the models and maths (codec, channels, FDS, segmenter, diffusion). Semantic
code never imports wire; wire imports only torch-free modules (of semantic, the numpy codec).
Both use `shared.limits` (the request limits every layer checks, and `SamplingOptions`) and
`shared.paths` (the repository root). Nothing here imports a service.
"""
