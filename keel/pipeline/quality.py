"""Data quality gate: a Great Expectations suite over a committed scrubbed snapshot, as a whole.

Checks the documents (schema, non-empty text, unique ids, no residual PII that a pattern can
see) and the run (quarantined share under `pipeline.max_quarantine_share`). A failed gate means
the downstream asset is not updated, so the chunk/embed/index DAG stays blocked.

The residual-PII patterns are deliberately strict formats (an email, a dashed SSN, a 4x4 card,
a separated US phone, an IBAN, an IPv4 address): a hit after scrubbing is a leak, not a guess.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import pyarrow as pa

from keel.pipeline.scrub import DOCS_SCHEMA

RESIDUAL_PII = {
    "EMAIL_ADDRESS": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "US_SSN": r"\b\d{3}-\d{2}-\d{4}\b",
    "CREDIT_CARD": r"\b\d{4}[ -]\d{4}[ -]\d{4}[ -]\d{3,4}\b|\b\d{15,16}\b",
    "PHONE_NUMBER": r"(?:\(\d{3}\)\s?|\b\d{3}[-.])\d{3}[-.]\d{4}\b",
    "IBAN_CODE": r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}(?: ?[A-Z0-9]{1,3})?\b",
    "IP_ADDRESS": r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b",
}


def validate(docs: pa.Table, quarantined: int, max_quarantine_share: float) -> dict[str, Any]:
    """Run the suite; returns {"success": bool, "checks": [{"check", "success", "details"}]}."""
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("keel")

    doc_suite = context.suites.add(gx.ExpectationSuite(name="scrubbed_documents"))
    for e in (
        gx.expectations.ExpectTableColumnsToMatchSet(column_set=DOCS_SCHEMA.names, exact_match=True),
        gx.expectations.ExpectColumnValuesToNotBeNull(column="doc_id"),
        gx.expectations.ExpectColumnValuesToBeUnique(column="doc_id"),
        gx.expectations.ExpectColumnValuesToNotBeNull(column="text"),
        gx.expectations.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1),
        gx.expectations.ExpectColumnValuesToNotMatchRegexList(
            column="text", regex_list=list(RESIDUAL_PII.values())
        ),
    ):
        doc_suite.add_expectation(e)
    run_suite = context.suites.add(gx.ExpectationSuite(name="scrub_run"))
    run_suite.add_expectation(
        gx.expectations.ExpectColumnMeanToBeBetween(column="quarantined", max_value=max_quarantine_share))

    docs_df = docs.to_pandas(types_mapper=None)
    records_df = pd.DataFrame({"quarantined": [0] * docs.num_rows + [1] * quarantined})
    checks = []
    for name, suite, df in (("documents", doc_suite, docs_df), ("run", run_suite, records_df)):
        batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("all")
        vd = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        result = vd.run(batch_parameters={"dataframe": df})
        for r in result.results:
            cfg = r.expectation_config  # always set on a suite's results
            check, column = (cfg.type, cfg.kwargs.get("column")) if cfg else ("expectation", None)
            details = {k: v for k, v in (r.result or {}).items()
                       if k in ("observed_value", "unexpected_count", "unexpected_percent")}
            if not r.success and "unexpected_index_list" in (r.result or {}):
                details["unexpected_rows"] = (r.result["unexpected_index_list"] or [])[:20]
            checks.append({"check": check + (f"({column})" if column else ""), "success": bool(r.success),
                           "details": _plain(details)})
    return {"success": all(c["success"] for c in checks), "checks": checks}


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item"):
        return obj.item()
    return obj
