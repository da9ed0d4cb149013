"""The models and maths of generative semantic communication (sec. 3 and 4 of the paper).

`codec` turns label maps into unit-power symbols and back (numpy only, so the wire half may use
it), `rate_quality` the bandwidth ratio, budgets and the rate-quality table (standard library
only, likewise), `map_jscc` the learned map encoder, `channels` the physical channels (Sionna),
`fds` the fast denoising block, `link` and `batched_link` the whole link in process, `segmenter` and `diffusion` the networks, `data` the
CamVid data, `checkpoints` and `device` their loading. Nothing here imports `shared.wire`.
"""
