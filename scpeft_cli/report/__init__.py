"""`scpeft report` internals: read finished run dirs, aggregate, write tables and a chart, apply CI gates.

This layer reads files only: it never imports torch or the model code, so a report runs anywhere in seconds.
"""
