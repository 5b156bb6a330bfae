"""Reports: an ``Analysis`` (``analysis.analyze``) rendered for people and programs.

``summary.build_summary`` makes summary.json (docs/summary-schema.md), the one source of
every figure; ``render`` writes report.html and report.md from it, with ``plots``'
pictures; ``compare`` puts runs side by side; ``study`` reports a policy study's cells
(``analysis.lab.study`` runs it). ``cli`` is ``tsprobe report``, ``compare_cli``
``tsprobe compare``.
"""
