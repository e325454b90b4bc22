"""What an audit reports: one ``Finding`` per check, each with a severity and the reason for it.

A finding says what was tried, what happened, the figures measured and whether the weakness is ``present``.
A control that held is reported too (``present=False``, severity ``info``), and so is a check that could not
run (``tested=False``, with what it would need), so a report of a hardened target lists every weakness as
absent rather than staying silent. ``exit_status`` turns the findings into a pipeline gate: non-zero when a
present finding is at or above ``audit.fail_on``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

SEVERITIES = ("info", "low", "medium", "high", "critical")
# fail_on=never: report only, never fail the pipeline.
FAIL_ON = (*SEVERITIES, "never")
GATE_FAILED = 1


class Finding(NamedTuple):
    """One check of the audit.

    check: a stable id, ``<category>.<name>`` (``authentication.unauthenticated_access``).
    present: the weakness was found. tested: the check ran (False: it could not, ``happened`` says why).
    severity: one of ``SEVERITIES``; ``reason``: why this severity. tried, happened: in words.
    figures: the numbers measured (statuses, rates, queries), JSON-serialisable.
    """

    check: str
    title: str
    present: bool
    severity: str
    reason: str
    tried: str
    happened: str
    figures: Mapping[str, Any] = {}
    tested: bool = True

    @property
    def category(self) -> str:
        return self.check.split(".", 1)[0]


def check_severity(severity: str, name: str = "severity") -> str:
    if severity not in SEVERITIES:
        raise ValueError(f"{name} must be one of {', '.join(SEVERITIES)}; got {severity!r}")
    return severity


def rank(severity: str) -> int:
    return SEVERITIES.index(check_severity(severity))


def finding(
    check: str,
    title: str,
    *,
    present: bool,
    severity: str,
    reason: str,
    tried: str,
    happened: str,
    figures: Mapping[str, Any] | None = None,
    tested: bool = True,
) -> Finding:
    """A validated ``Finding``: an absent or untested weakness is always ``info``."""
    check_severity(severity)
    if "." not in check:
        raise ValueError(f"check must be '<category>.<name>', got {check!r}")
    if not present and severity != "info":
        raise ValueError(f"{check}: a finding that is not present must be info, got {severity!r}")
    return Finding(check, title, present, severity, reason, tried, happened, dict(figures or {}), tested)


def held(check: str, title: str, tried: str, happened: str, figures=None) -> Finding:
    """A control that held: the weakness is absent."""
    return finding(
        check,
        title,
        present=False,
        severity="info",
        reason="the control held",
        tried=tried,
        happened=happened,
        figures=figures,
    )


def untested(check: str, title: str, needs: str, figures=None) -> Finding:
    """A check that could not run, and what it needs."""
    return finding(
        check,
        title,
        present=False,
        severity="info",
        reason="not tested",
        tried="nothing",
        happened=f"not tested: {needs}",
        figures=figures,
        tested=False,
    )


class Verdict(NamedTuple):
    """A check once what it tried and measured is known; its outcome is one of ``weakness`` (present),
    ``held`` or ``untested``, each a ``Finding`` carrying this check's ``tried`` and ``figures``."""

    check: str
    title: str
    tried: str = "nothing"
    figures: Mapping[str, Any] | None = None

    def weakness(self, severity: str, reason: str, happened: str, title: str | None = None, figures=None):
        """The weakness is present, rated ``severity`` for ``reason``; ``title`` and ``figures`` replace the
        check's own where given (a present weakness is often titled for what was found)."""
        return finding(
            self.check,
            title or self.title,
            present=True,
            severity=severity,
            reason=reason,
            tried=self.tried,
            happened=happened,
            figures=self.figures if figures is None else figures,
        )

    def held(self, happened: str) -> Finding:
        return held(self.check, self.title, self.tried, happened, self.figures)

    def untested(self, needs: str) -> Finding:
        return untested(self.check, self.title, needs, self.figures)


def ordered(findings: Iterable[Finding]) -> list[Finding]:
    """Present findings first, worst first; then the rest by check id."""
    return sorted(findings, key=lambda item: (not item.present, -rank(item.severity), item.check))


def worst(findings: Iterable[Finding]) -> str | None:
    """The highest severity among present findings (None when nothing is present)."""
    present = [item.severity for item in findings if item.present]
    return max(present, key=rank) if present else None


def check_fail_on(fail_on: str) -> str:
    if fail_on not in FAIL_ON:
        raise ValueError(f"audit.fail_on must be one of {', '.join(FAIL_ON)}; got {fail_on!r}")
    return fail_on


def failing(findings: Iterable[Finding], fail_on: str) -> list[Finding]:
    """The present findings at or above ``fail_on`` (none when ``fail_on`` is ``never``)."""
    if check_fail_on(fail_on) == "never":
        return []
    return [item for item in findings if item.present and rank(item.severity) >= rank(fail_on)]


def exit_status(findings: Iterable[Finding], fail_on: str) -> int:
    """0 when no present finding meets ``fail_on``; ``GATE_FAILED`` otherwise."""
    return GATE_FAILED if failing(findings, fail_on) else 0
