"""Integrations with other libraries, each an optional extra imported only by its own module:
`anomalib_model` (FiSeCLIP as an anomalib model; `pip install 'fiseclip[anomalib]'`, docs/anomalib.md)."""
