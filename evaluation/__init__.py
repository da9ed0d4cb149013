"""Evaluation of the semantic link against classical baselines (the paper's tables on CamVid).

`evaluate` is the command line: `EvaluationConfig` holds a run's settings, `Evaluation` its data
and networks, and it sends every image through our link, its ablations, the analog and the
digital (JPEG + 5G LDPC + QAM) transmissions of `baselines`, scoring what arrives with
`image_quality`; `cache` keeps finished configurations so that a rerun resumes. `schema` names
the rows, SNR definitions and metrics of the results; `report` writes them: the acceptance checks
and their notes (`checks`), the Markdown (`markdown`) and the figures (`plots`). `rate_quality`
is the rate-quality frontier's command: every representation at several bandwidth ratios, with
the separated links of `separated`, written by `rate_quality_report` (docs/rate-quality.md).
"""
