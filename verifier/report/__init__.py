"""Compliance outputs of a run: the certificate document, the HTML/PDF report, re-verification.

Modules: `artifacts` (the output folder's files), `certificate` (certificate.json and its
schema), `plots` and `html` (the self-contained report), `browser` (headless Chromium for PDF
and screenshots) and `verify` (recompute everything from the artifacts). Importing this package
loads none of them; matplotlib and jsonschema are imported only when used.
"""
