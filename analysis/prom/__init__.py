"""The report's tables from a Prometheus server: ``tsprobe report --prometheus URL``.

``source`` asks the server (range queries, one per table), ``tables`` turns the answers
into the report's stall and timeout tables (pure), ``phases`` rebuilds phases from the
host exporter's metrics when no run directory is given (through the same
``build_timeline``), ``render`` writes them. The run directory, when given, is read by
``analysis.analyze.load`` like every other report's.
"""
