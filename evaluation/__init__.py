"""Evaluation of the semantic link against classical baselines (the paper's tables on CamVid).

`metrics` holds the image and segmentation metrics, `baselines` the analog and digital (JPEG +
5G LDPC + QAM) transmissions, `evaluate` the command line and `report` the JSON, Markdown, plots
and grid it writes.
"""
